"""``edge bench memory`` records the kernel's part of each contestant's main-thread CPU (``ready_sys_ms``): where a
first touch of fresh memory shows (a huge-page arena on a VM whose balloon reports free blocks to the host). Real
children's figures are checked in ``test_bench_memory.py`` (one run of fresh processes serves both)."""

from __future__ import annotations

import _tiny
import numpy as np

import lab.bench_run
from lab.bench_memory import bench_memory

X = {"x": np.random.default_rng(0).standard_normal((1, 10)).astype(np.float32)}
KINDS = ["plain", "hybrid", "bound", "rebuild"]


def test_fake_children_kernel_time_is_kept_per_round_and_its_median_reported(tmp_path, monkeypatch):
    _tiny.make_mlp(tmp_path / "m.onnx", seed=3)
    sys_ms = {"plain": 4.0, "hybrid": 12.0, "bound": 8.0, "rebuild": 0.0}
    seen: dict[str, int] = {}

    def child(target, spec, *, what, timeout=900.0):
        kind = spec["kind"]
        out = {"rss_mb": 100.0, "peak_mb": 110.0}
        if kind in sys_ms:
            seen[kind] = seen.get(kind, 0) + 1
            out.update(ready_ms=20.0, ready_cpu_ms=16.0, ready_sys_ms=sys_ms[kind] * seen[kind], strategy=kind)
            out.update(rss_mb=150.0, peak_mb=160.0)
        return out

    monkeypatch.setattr(lab.bench_run, "fresh_child", child)
    r = bench_memory(tmp_path / "m.onnx", X, repeat=1, rounds=3, progress=False)
    assert list(r["ready_rounds_sys_ms"]) == KINDS
    for kind, f in [("plain", r["plain"]), *r["strategies"].items()]:
        assert r["ready_rounds_sys_ms"][kind] == [sys_ms[kind] * i for i in (1, 2, 3)], kind
        assert f["ready_sys_ms"] == sys_ms[kind] * 2, kind  # the median round


def test_children_without_it_report_no_median(tmp_path, monkeypatch):
    _tiny.make_mlp(tmp_path / "m.onnx", seed=3)

    def child(target, spec, *, what, timeout=900.0):
        if spec["kind"] not in KINDS:  # the baseline, and a plain session with the runtime's options
            return {"rss_mb": 100.0, "peak_mb": 110.0}
        return {"rss_mb": 150.0, "peak_mb": 160.0, "ready_ms": 20.0, "ready_cpu_ms": 16.0, "strategy": spec["kind"]}

    monkeypatch.setattr(lab.bench_run, "fresh_child", child)
    r = bench_memory(tmp_path / "m.onnx", X, repeat=1, rounds=1, progress=False)
    assert r["ready_rounds_sys_ms"] == {k: [None] for k in KINDS}
    assert "ready_sys_ms" not in r["plain"] and all("ready_sys_ms" not in f for f in r["strategies"].values())
