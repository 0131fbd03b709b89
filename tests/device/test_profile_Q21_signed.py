"""A runtime that requires signed adapters never loads bytes its keys did not sign (review O21 F1), and ``edge
profile`` with ``backend="auto"`` reads each adapter once (F3).

Before: ``SignaturePolicy.read`` returned a :class:`ReadFile`'s bytes to any policy *equal* to the one that read it,
unchecked, and anyone can build a ReadFile: ``rt.load_adapter(ReadFile(path, unsigned_bytes, rt.policy))`` (or with
a fresh policy of the same keys, even for a path that does not exist) loaded an unsigned adapter under
``trusted_keys``. Now only the very policy object that read it (identity) takes its bytes, and only after checking
them again against the signature it kept (one Ed25519 check in memory, no second read of the file); anything else
is read anew from its path. An in-memory ``Adapter`` under ``trusted_keys`` is refused (it cannot be verified).
Before F3, auto's fit check read every adapter and the load read it again; now the load takes the first read.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("cryptography")

import edge.format.signing as signing  # noqa: E402
from edge.errors import EdgeError, SignatureError  # noqa: E402
from edge.format.adapter import load_adapter  # noqa: E402
from edge.format.signing import ReadFile, SignaturePolicy, generate_key, load_public_key, sign_file  # noqa: E402
from edge.profiling import ProfileConfig, profile_model  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

DIGITS = Path.home() / ".cache" / "edge" / "digits-07d9c19ac5e7"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not (DIGITS / "encoder.onnx").is_file():
        pytest.skip("make demo has not built the digits encoder")
    tmp = tmp_path_factory.mktemp("q21signed")
    for name in ("encoder.onnx", "shira-rotate.safetensors", "shira-invert.safetensors"):
        shutil.copy(DIGITS / name, tmp / name)
    pub = generate_key(tmp / "k.pem")
    shutil.copy(tmp / "shira-rotate.safetensors", tmp / "signed.safetensors")
    sign_file(tmp / "signed.safetensors", tmp / "k.pem")
    return tmp, pub


@pytest.fixture(scope="module")
def rt(setup):
    tmp, pub = setup
    with Runtime(tmp / "encoder.onnx", backend="onnxruntime", strategy="rebuild", trusted_keys=[pub]) as r:
        yield r


def _forbidden(rt, held) -> None:
    before = rt.adapters
    with pytest.raises(EdgeError):
        rt.load_adapter(held, "forged")
    assert rt.adapters == before and "forged" not in rt.adapters


def test_a_readfile_built_by_a_caller_with_the_runtimes_own_policy_is_refused(setup, rt):
    tmp, _ = setup
    unsigned = tmp / "shira-invert.safetensors"
    data = unsigned.read_bytes()
    with pytest.raises(SignatureError, match="is unsigned"):
        rt.load_adapter(ReadFile(str(unsigned), data, rt.policy), "forged")
    sig = (tmp / "signed.safetensors.sig").read_bytes()  # another file's valid signature: not over these bytes
    with pytest.raises(SignatureError, match="does not match"):
        rt.load_adapter(ReadFile(str(unsigned), data, rt.policy, sig), "forged")
    _forbidden(rt, ReadFile(str(tmp / "signed.safetensors"), data, rt.policy, sig))  # a signed path, other bytes
    assert rt.adapters == []


def test_an_equal_policy_gets_nothing_it_did_not_read_itself(setup, rt):
    tmp, pub = setup
    equal = SignaturePolicy((load_public_key(pub),))
    assert equal == rt.policy and equal is not rt.policy
    data = (tmp / "shira-invert.safetensors").read_bytes()
    _forbidden(rt, ReadFile("/nonexistent/forged.safetensors", data, equal))  # read anew: no such file
    with pytest.raises(SignatureError, match="is unsigned"):  # read anew from its path: unsigned
        rt.load_adapter(ReadFile(str(tmp / "shira-invert.safetensors"), data, equal), "forged")
    assert rt.adapters == []


def test_a_readfile_altered_after_it_was_issued_is_refused(setup, rt):
    tmp, _ = setup
    held = rt.policy.read_file(tmp / "signed.safetensors", 1 << 24)
    unsigned = (tmp / "shira-invert.safetensors").read_bytes()
    object.__setattr__(held, "data", unsigned)  # a frozen dataclass is not immutable to a determined caller
    with pytest.raises(SignatureError, match="does not match"):
        rt.load_adapter(held, "forged")
    held = rt.policy.read_file(tmp / "signed.safetensors", 1 << 24)
    object.__setattr__(held, "data", bytearray(held.data))  # mutable bytes are never taken as verified: read anew
    assert rt.policy.read(held, 1 << 24) == (tmp / "signed.safetensors").read_bytes()
    held = rt.policy.read_file(tmp / "signed.safetensors", 1 << 24)
    object.__setattr__(held, "signature", None)  # the signed bytes without their signature: not taken on trust
    with pytest.raises(SignatureError, match="is unsigned"):
        rt.load_adapter(held, "forged")
    assert rt.adapters == []


def test_what_the_policy_issued_loads_with_one_file_read_and_two_checks(setup, rt, monkeypatch):
    tmp, _ = setup
    reads, checks = [], []
    real_read, real_verify = signing.read_bounded, signing.verify_bytes
    monkeypatch.setattr(signing, "read_bounded", lambda p, *a, **k: reads.append(os.fspath(p)) or real_read(p, *a, **k))
    monkeypatch.setattr(signing, "verify_bytes", lambda *a, **k: checks.append(1) or real_verify(*a, **k))
    held = rt.policy.read_file(tmp / "signed.safetensors", 1 << 24)
    name = rt.load_adapter(held, "signed")
    assert name == "signed" and rt.adapters == ["signed"]
    assert reads.count(str(tmp / "signed.safetensors")) == 1 and len(checks) == 2  # read once, verified twice
    rt.unload_adapter("signed")
    assert rt.adapters == []


def test_an_in_memory_adapter_is_refused_when_signatures_are_required(setup, rt):
    tmp, _ = setup
    adapter = load_adapter(tmp / "shira-invert.safetensors")  # a caller's own object: it cannot be verified
    with pytest.raises(SignatureError, match="cannot be verified"):
        rt.load_adapter(adapter, "forged")
    signed = load_adapter(tmp / "signed.safetensors")  # even one parsed from a signed file: bytes are gone
    with pytest.raises(SignatureError, match="cannot be verified"):
        rt.load_adapter(signed, "forged")
    assert rt.adapters == []


def test_profile_auto_reads_each_adapter_once(setup, monkeypatch, tmp_path):
    tmp, _ = setup
    monkeypatch.setenv("EDGE_ENGINE_CACHE", str(tmp_path / "engines"))
    reads = []
    real = signing.read_bounded
    monkeypatch.setattr(signing, "read_bounded", lambda p, *a, **k: reads.append(os.fspath(p)) or real(p, *a, **k))
    cfg = ProfileConfig(runs=2, warmup=1, switches=1, progress=False, engine_rounds=0, engine_runs=0)
    adapters = [tmp / "shira-rotate.safetensors", tmp / "shira-invert.safetensors"]
    result = profile_model(tmp / "encoder.onnx", "x86-dev", adapters=adapters, backend="auto", config=cfg)
    assert result["backend"] == "onnxruntime" and len(result["adapters"]) == 2
    assert sorted(reads) == sorted(str(a) for a in adapters)  # one read each: the fit check's, loaded as is
    assert all(a["load_ms"] > 0 and a["bytes"] == Path(a["path"]).stat().st_size for a in result["adapters"])
