"""Signed adapters: with trusted keys, unsigned or wrongly signed files are refused before parsing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _tiny import make_mlp, random_adapter

from edge.cli import main
from edge.errors import SignatureError
from edge.format.signing import generate_key, sign_file, signature_path
from edge.runtime import Runtime


@pytest.fixture
def setup(tmp_path):
    model = tmp_path / "m.onnx"
    info = make_mlp(model)
    good_pub = generate_key(tmp_path / "good.pem")
    generate_key(tmp_path / "evil.pem")
    adapter = tmp_path / "a.safetensors"
    random_adapter(info, 1, name="a").save(adapter)
    return model, info, adapter, good_pub, tmp_path


def test_signed_adapter_loads(setup):
    model, _, adapter, pub, tmp = setup
    sign_file(adapter, tmp / "good.pem")
    with Runtime(model, trusted_keys=[pub]) as rt:
        rt.load_adapter(adapter)
        rt.switch("a")
        assert rt.active == {"a": 1.0}


@pytest.mark.parametrize("case", ["unsigned", "untrusted key", "tampered file", "garbage sig", "other file's sig"])
def test_refused_before_any_byte_is_applied(setup, case, monkeypatch):
    model, info, adapter, pub, tmp = setup
    other = tmp / "b.safetensors"
    random_adapter(info, 2, name="b").save(other)
    if case == "untrusted key":
        sign_file(adapter, tmp / "evil.pem")
    elif case == "tampered file":
        sign_file(adapter, tmp / "good.pem")
        data = bytearray(adapter.read_bytes())
        data[-3] ^= 0x01  # one bit in the values
        adapter.write_bytes(bytes(data))
    elif case == "garbage sig":
        signature_path(adapter).write_bytes(b"\x00" * 100)
    elif case == "other file's sig":
        sign_file(other, tmp / "good.pem")
        signature_path(adapter).write_bytes(signature_path(other).read_bytes())
    parsed = []
    import edge.format.adapter

    real = edge.format.adapter.adapter_from_bytes
    monkeypatch.setattr(edge.format.adapter, "adapter_from_bytes", lambda *a, **k: parsed.append(1) or real(*a, **k))
    with Runtime(model, trusted_keys=[pub]) as rt:
        before = rt.run(np.ones((1, 10), np.float32))["logits"]
        with pytest.raises(SignatureError):
            rt.load_adapter(adapter)
        assert not parsed, "the adapter's bytes were parsed before the signature was checked"
        assert rt.adapters == [] and rt.active == {}
        np.testing.assert_array_equal(rt.run(np.ones((1, 10), np.float32))["logits"], before)


def test_in_memory_adapter_refused_when_signatures_required(setup):
    model, info, _, pub, _ = setup
    with Runtime(model, trusted_keys=[pub]) as rt, pytest.raises(SignatureError, match="in-memory"):
        rt.load_adapter(random_adapter(info, 3))


def test_cli_keygen_and_sign(tmp_path, setup, capsys):
    _, _, adapter, _, _ = setup
    assert main(["keygen", str(tmp_path / "k.pem")]) == 0
    assert main(["sign", str(adapter), "--key", str(tmp_path / "k.pem")]) == 0
    sig = json.loads(signature_path(adapter).read_text())
    assert sig["alg"] == "ed25519" and sig["format"] == "edge.signature"
