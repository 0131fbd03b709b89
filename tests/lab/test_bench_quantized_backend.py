"""``edge bench quantized``: the static recipe's calibration set and the ``--backend tflite`` dispatch (no models)."""

from __future__ import annotations

import sys
import types
from argparse import Namespace

import numpy as np
import pytest

pytest.importorskip("torch")

import lab.bench_quantized as bq  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from lab.datasets import Domain  # noqa: E402


def _domains():
    rng = np.random.default_rng(0)
    out = {}
    for i, name in enumerate(["clean", "rotate", "invert"]):
        x = (rng.random((50, 1, 8, 8)) + 10 * i).astype(np.float32)  # each domain's values in its own band
        out[name] = Domain(name, x, np.zeros(50, np.int64), x[:5] + 100, np.zeros(5, np.int64))
    return out


def test_calibration_draws_evenly_from_every_domain_training_split_only():
    domains = _domains()
    clean = bq.calibration_set(domains, "clean", n=30)
    np.testing.assert_array_equal(clean, domains["clean"].x_train[:30])
    mixed = bq.calibration_set(domains, "domains", n=30)
    assert mixed.shape == (30, 1, 8, 8) and mixed.flags.c_contiguous
    band = (mixed.reshape(30, -1).min(1) // 10).astype(int)
    assert sorted(np.bincount(band).tolist()) == [10, 10, 10]  # ten from each domain, none from a test split
    np.testing.assert_array_equal(mixed, bq.calibration_set(domains, "domains", n=30))  # deterministic
    with pytest.raises(ConfigError, match="known clean, domains"):
        bq.calibration_set(domains, "test")


def _row(base, acc, infer, plain, switch):
    return {
        "model": "digits-vit",
        "base": base,
        "bytes": 1,
        "mean_acc_base": 0.3,
        "mean_acc_adapted": acc,
        "infer_ms_p50": infer,
        "static_infer_ms_p50": plain,
        "switch_ms_p50": switch,
        "load_1m": 1.0,
    }


def test_tflite_backend_runs_the_litert_bench_and_judges_its_rows_by_the_same_goals(monkeypatch):
    rows = [_row("fp32", 0.85, 1.0, 1.0, 0.1), _row("int8-static", 0.845, 1.02, 1.0, 0.09)]
    seen = {}

    def run_litert(args):
        seen["args"] = args
        return {"rows": rows, "backend": "tflite"}

    fake = types.ModuleType("fake_litert_bench")
    fake.run_litert = run_litert
    monkeypatch.setitem(sys.modules, "fake_litert_bench", fake)
    monkeypatch.setattr(bq, "LITERT_BENCH", "fake_litert_bench")
    args = Namespace(backend="tflite")
    result = bq.litert_result(bq.litert_module(), args)
    assert seen["args"] is args
    g = result["goals"]["digits-vit/int8-static"]
    assert g["acc_gap_points"]["value"] == 0.5 and g["acc_gap_points"]["met"]
    assert g["infer_overhead_pct"]["value"] == 2.0  # computed from infer / static when the row does not carry it
    fake.run_litert = lambda args: {"rows": [{"base": "fp32"}]}
    with pytest.raises(ConfigError, match="shape"):
        bq.litert_result(fake, args)


def test_a_missing_litert_bench_or_backend_is_named(monkeypatch):
    monkeypatch.setattr(bq, "LITERT_BENCH", "lab.no_such_bench_module")
    with pytest.raises(ConfigError, match="lab.no_such_bench_module"):
        bq.litert_module()
    monkeypatch.setitem(sys.modules, "lab.empty_bench", types.ModuleType("lab.empty_bench"))
    monkeypatch.setattr(bq, "LITERT_BENCH", "lab.empty_bench")
    with pytest.raises(ConfigError, match="run_litert"):
        bq.litert_module()
    with pytest.raises(ConfigError, match="known backends onnxruntime, tflite"):
        bq.cli(Namespace(backend="coreml"))


def test_per_family_values_resolve_to_each_demo_family_and_others_pass_through():
    opts = {"mode": "static", "headroom": {"vit": 4.0, "cnn": 2.0}, "extra_options": {"ActivationSymmetric": True}}
    assert bq.family_options(opts, "cnn") == {"mode": "static", "headroom": 2.0, "extra_options": opts["extra_options"]}
    assert bq.family_options(opts, "vit")["headroom"] == 4.0
    assert bq.family_options(None, "vit") is None
    for family in bq.DEMO_FAMILIES:  # every static demo recipe resolves to plain quantize_onnx options
        resolved = bq.family_options(bq.BASES["int8-static"]["demo"], family)
        assert not any(isinstance(v, dict) for v in resolved.values())
