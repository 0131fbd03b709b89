"""A signature file carrying the signature it replaces (``previous``, written by ``edge sync`` around the rename of a
signed adapter): either signature verifies the file, each only by a trusted key and over the file's exact bytes."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("cryptography")

from edge.errors import SignatureError  # noqa: E402
from edge.format.signing import generate_key, load_public_key, sign_file, verify_bytes, with_previous  # noqa: E402


@pytest.fixture
def signed(tmp_path):
    """Two versions of one adapter file, each signed by the team key, and a key nobody trusts."""
    team, other = generate_key(tmp_path / "team.pem"), generate_key(tmp_path / "other.pem")
    out = {}
    for v in ("old", "new"):
        (tmp_path / v).write_bytes(f"adapter bytes, {v} release".encode() * 10)
        out[v] = (tmp_path / v).read_bytes(), sign_file(tmp_path / v, tmp_path / "team.pem").read_bytes()
    sign_file(tmp_path / "old", tmp_path / "other.pem")
    out["old-by-other"] = (tmp_path / "old.sig").read_bytes()
    return out, [load_public_key(team)], [load_public_key(other)]


def test_either_adapter_verifies_against_the_carried_pair_and_nothing_else(signed):
    (old, old_sig), (new, new_sig) = signed[0]["old"], signed[0]["new"]
    trusted = signed[1]
    both = with_previous(new_sig, old_sig)
    assert json.loads(both)["previous"]["signature"] == json.loads(old_sig)["signature"]
    assert verify_bytes(new, both, trusted) == verify_bytes(old, both, trusted)  # the team key, for either file
    with pytest.raises(SignatureError, match="does not match the file's bytes"):  # the main signature's complaint
        verify_bytes(b"a third file", both, trusted)
    with pytest.raises(SignatureError, match="does not match"):  # without previous the old file is refused
        verify_bytes(old, new_sig, trusted)


def test_a_previous_signature_by_an_untrusted_key_does_not_verify(signed):
    (old, _), (_, new_sig) = signed[0]["old"], signed[0]["new"]
    both = with_previous(new_sig, signed[0]["old-by-other"])
    with pytest.raises(SignatureError):
        verify_bytes(old, both, signed[1])
    assert verify_bytes(old, both, signed[2])  # by the key that did sign it


@pytest.mark.parametrize(
    "previous",
    [{"key": "x"}, {"key": "x", "signature": "y", "alg": "rsa"}, ["k", "s"], {"key": 1, "signature": "y"}],
)
def test_a_malformed_previous_is_refused(signed, previous):
    (_, _), (new, new_sig) = signed[0]["old"], signed[0]["new"]
    doc = json.loads(new_sig) | {"previous": previous}
    with pytest.raises(SignatureError, match="malformed signature file"):
        verify_bytes(new, json.dumps(doc).encode(), signed[1])


def test_nothing_to_carry_leaves_the_new_signature_as_published(signed):
    new_sig = signed[0]["new"][1]
    assert with_previous(new_sig, None) == new_sig
    assert with_previous(new_sig, b"torn {") == new_sig
    assert with_previous(b"not json", signed[0]["old"][1]) == b"not json"  # a reader judges it as it is
