"""Runtime(device=...): threads, providers and fallback from a profile; a profile can require signatures."""

from __future__ import annotations

import pytest
from _tiny import make_mlp, random_adapter

from edge.devices import load_profile
from edge.errors import BackendUnavailableError, SignatureError
from edge.format.signing import generate_key, sign_file
from edge.runtime import Runtime


def _profile(tmp_path, name, body):
    d = tmp_path / "profiles"
    d.mkdir(exist_ok=True)
    (d / f"{name}.yaml").write_text(body)
    return load_profile(d / f"{name}.yaml")


BASE = """
name: {name}
architecture: x86_64
threads: 1
fallback: {fallback}
budgets: {{memory_mb: 512, load_ms: 1000, latency_p95_ms: 100, switch_p95_ms: 10}}
tolerances: {{atol: 1.0e-4, rtol: 1.0e-3}}
backends:
  - backend: onnxruntime
    providers:
      - name: {provider}
      - name: CPUExecutionProvider
{extra}
"""


def test_profile_threads_and_cpu_fallback_recorded(tmp_path):
    model = tmp_path / "m.onnx"
    make_mlp(model)
    p = _profile(
        tmp_path, "gpu-box", BASE.format(name="gpu-box", fallback="cpu", provider="CUDAExecutionProvider", extra="")
    )
    with Runtime(model, device=p) as rt:
        assert rt.providers == ["CPUExecutionProvider"]
        assert rt.fallback_warning and "CUDAExecutionProvider" in rt.fallback_warning


def test_profile_fallback_error_raises(tmp_path):
    model = tmp_path / "m.onnx"
    make_mlp(model)
    p = _profile(
        tmp_path, "strict", BASE.format(name="strict", fallback="error", provider="CUDAExecutionProvider", extra="")
    )
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        Runtime(model, device=p)


def test_profile_can_require_signatures(tmp_path):
    model = tmp_path / "m.onnx"
    info = make_mlp(model)
    pub = generate_key(tmp_path / "k.pem")
    extra = f"trusted_keys: [{pub.read_text().strip()}]"
    p = _profile(
        tmp_path,
        "signed",
        BASE.replace("      - name: {provider}\n", "").format(name="signed", fallback="error", extra=extra),
    )
    a = tmp_path / "a.safetensors"
    random_adapter(info, 1, name="a").save(a)
    with Runtime(model, device=p) as rt:
        with pytest.raises(SignatureError):
            rt.load_adapter(a)
        sign_file(a, tmp_path / "k.pem")
        rt.load_adapter(a)
        assert rt.adapters == ["a"]
