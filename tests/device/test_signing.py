"""Signed adapters: with trusted keys, unsigned or wrongly signed files are refused before parsing."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest
from _tiny import make_mlp, random_adapter

from edge.cli import main
from edge.errors import ConfigError, EdgeError, SignatureError
from edge.format.signing import (
    SignaturePolicy,
    generate_key,
    key_id,
    load_public_key,
    sign_file,
    signature_path,
    verify_bytes,
)
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


@pytest.mark.parametrize(
    "case", ["unsigned", "untrusted key", "tampered file", "garbage sig", "other file's sig", "extra key"]
)
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
    elif case == "extra key":  # a valid signature with a field the format does not have
        sig = json.loads(sign_file(adapter, tmp / "good.pem").read_text())
        signature_path(adapter).write_text(json.dumps({**sig, "v": 2}))
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


# -- one policy, applied everywhere; keys that would accept forgeries are refused -----------------------------------
SMALL_ORDER = [  # the eight encodings of points of order 1, 2, 4 and 8 (RFC 8032 curve, canonical y)
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
]
NON_CANONICAL = [  # y >= p: p itself (y = 0 again), p + 1 (y = 1 again), and 2^255 - 1
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]


def _forged(key_hex: str) -> bytes:
    """A signature nobody wrote: R = identity, s = 0, naming the given key."""
    raw = bytes.fromhex("01" + "00" * 31) + bytes(32)
    sig = {
        "format": "edge.signature",
        "version": 1,
        "alg": "ed25519",
        "key": key_id(bytes.fromhex(key_hex)),
        "signature": base64.b64encode(raw).decode(),
    }
    return json.dumps(sig).encode()


@pytest.mark.parametrize("key", SMALL_ORDER + NON_CANONICAL)
def test_small_order_and_non_canonical_keys_are_refused(setup, key):
    model, _, adapter, _, _ = setup
    with pytest.raises(ConfigError, match="small order|canonical"):
        load_public_key(key)
    with pytest.raises(ConfigError):
        SignaturePolicy.resolve([key])
    with pytest.raises(ConfigError):
        Runtime(model, trusted_keys=[key])
    with pytest.raises(SignatureError):  # even handed to the verifier directly, the forgery does not verify
        verify_bytes(adapter.read_bytes(), _forged(key), [bytes.fromhex(key)])


def test_real_keys_pass_the_point_checks(tmp_path):
    for i in range(20):
        pub = generate_key(tmp_path / f"k{i}.pem")
        assert len(load_public_key(pub)) == 32


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe\x00binary", b"", b"zz" * 32, b"ab" * 31, ("ab" * 32 + "\n") * 200],
    ids=["binary", "empty", "not hex", "31 bytes", "too long"],
)
def test_bad_key_files_are_config_errors(tmp_path, content):
    path = tmp_path / "k.pub"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError):
        load_public_key(path)


@pytest.mark.parametrize("kind", ["fifo", "dev zero", "folder", "huge"])
def test_hostile_signature_files_are_refused_without_reading_them(setup, kind):
    model, _, adapter, pub, tmp = setup
    sig = signature_path(adapter)
    if kind == "fifo":
        os.mkfifo(sig)
    elif kind == "dev zero":
        sig.symlink_to("/dev/zero")
    elif kind == "folder":
        sig.mkdir()
    else:
        sig.write_bytes(b" " * 100_000)
    with Runtime(model, trusted_keys=[pub]) as rt, pytest.raises(EdgeError):
        rt.load_adapter(adapter)


def test_profile_applies_the_device_trusted_keys(setup):
    """`edge profile --device P` refuses an adapter P's runtime would refuse (unsigned), and takes a signed one."""
    from edge.profiling import ProfileConfig, profile_model

    model, _, adapter, pub, tmp = setup
    import yaml

    root = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((root / "devices" / "x86-dev.yaml").read_text())
    data.update(name="signed", trusted_keys=[pub.read_text().strip()])
    device = tmp / "signed.yaml"
    device.write_text(yaml.safe_dump(data))
    fast = ProfileConfig(runs=2, warmup=0, switches=1, progress=False)
    with pytest.raises(SignatureError, match="unsigned"):
        profile_model(model, device, adapters=[adapter], config=fast)
    sign_file(adapter, tmp / "good.pem")
    assert profile_model(model, device, adapters=[adapter], config=fast)["adapters"][0]["name"] == "a"
