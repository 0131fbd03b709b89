"""Whether this CPU's onnxruntime U8S8 kernels saturate, read from its flags, and the one warning a model at risk
gets on such a CPU (edge.cpu_int8). CPUs are simulated by their /proc/cpuinfo text or flags, so every case runs on
any machine; the real kernels are checked against the flags in tests/host/test_int8cpu_saturation.py."""

from __future__ import annotations

import logging

import _tiny
import numpy as np
import pytest

from edge.cpu_int8 import VNNI_FLAGS, cpu_flags, u8s8_risk, u8s8_saturates, warn_u8s8_saturation
from edge.machine import machine
from exporters.quantize import quantize_onnx

X86_NO_VNNI = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse4_1 avx2 fma\n\nprocessor\t: 1\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\nCPU implementer\t: 0x41\n"

#: a CPU (flags, arch) -> what u8s8_saturates says of it
CPUS = {
    "avx2": (["sse4_1", "avx2", "fma"], "x86_64", True),
    "avx512-no-vnni": (["avx2", "avx512f", "avx512bw"], "x86_64", True),
    "avx512-vnni": (["avx2", "avx512f", "avx512_vnni"], "x86_64", False),
    "avx-vnni": (["avx2", "avx_vnni"], "AMD64", False),
    "amx": (["avx2", "amx_int8", "amx_tile"], "x86_64", False),
    "aarch64-dotprod": (["asimd", "asimddp", "i8mm"], "aarch64", False),
    "aarch64-plain": (["asimd"], "aarch64", False),
    "x86-unreadable": ([], "x86_64", None),
}


def test_flags_are_read_from_cpuinfo_on_x86_and_arm_and_none_where_unreadable(tmp_path):
    (tmp_path / "x86").write_text(X86_NO_VNNI)
    (tmp_path / "arm").write_text(ARM)
    (tmp_path / "none").write_text("processor\t: 0\nmodel name\t: something\n")
    assert cpu_flags(str(tmp_path / "x86")) == {"fpu", "sse4_1", "avx2", "fma"}
    assert cpu_flags(str(tmp_path / "arm")) == {"fp", "asimd", "asimddp", "i8mm"}
    assert cpu_flags(str(tmp_path / "none")) == frozenset()
    assert cpu_flags(str(tmp_path / "missing")) is None
    assert u8s8_saturates(cpu_flags(str(tmp_path / "x86")), "x86_64") is True


@pytest.mark.parametrize("cpu", CPUS)
def test_only_x86_without_vnni_saturates_and_unknown_flags_are_unknown(cpu):
    flags, arch, want = CPUS[cpu]
    assert u8s8_saturates(flags, arch) is want


def test_machine_reports_it_for_this_cpu():
    assert machine()["u8s8_saturates"] is u8s8_saturates()
    assert set(VNNI_FLAGS) == {"avx512_vnni", "avx_vnni", "amx_int8"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> ModelInfo of a float MLP and its int8 twins (full range, 7 bits, uint8 weights)."""
    d = tmp_path_factory.mktemp("int8cpu")
    out = {"float": _tiny.make_mlp(d / "m.onnx", sizes=(10, 16, 3))}
    calib = {"x": np.random.default_rng(0).standard_normal((32, 10)).astype(np.float32)}
    recipes = {"full": {}, "seven-bit": {"reduce_range": True}, "uint8": {"weight_type": "uint8"}}
    for name, kw in recipes.items():  # min_cosine: these are about the metadata, not this CPU's sums
        out[name] = quantize_onnx(d / "m.onnx", d / f"{name}.onnx", calib=calib, min_cosine=0.5, **kw).info
    return out


@pytest.mark.parametrize("cpu", CPUS)
@pytest.mark.parametrize("model", ["float", "full", "seven-bit", "uint8"])
def test_a_full_range_int8_model_on_a_saturating_cpu_logs_one_warning_naming_the_fix(models, caplog, cpu, model):
    flags, arch, saturates = CPUS[cpu]
    info = models[model]
    assert info.extra.get("quantization", {}).get("reduce_range", None) is {"float": None, "seven-bit": True}.get(
        model, False
    )
    with caplog.at_level(logging.WARNING, logger="edge.cpu_int8"):
        why = warn_u8s8_saturation(info, "q.onnx", flags, arch)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    if model == "full" and saturates is not False:
        assert why is not None and len(warnings) == 1
        text = warnings[0].getMessage()
        assert text.startswith("q.onnx on onnxruntime: ") and why in text
        assert "reduce_range false" in text and "`edge quantize --reduce-range`" in text and "VNNI" in text
        assert ("no VNNI" in text) is bool(saturates) and ("cannot be read" in text) is (saturates is None)
    else:
        assert why is None and warnings == []
    assert u8s8_risk(info, saturates) == why
