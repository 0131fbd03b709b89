"""``lab.bench_litert --overhead``: the per-call cost of the switchable LiteRT runtime above a bare interpreter,
measured on a tiny model (the numbers themselves live in BENCHMARKS.md; here: what is measured, and the table)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _tiny_tflite  # noqa: E402

import lab.bench_litert as bl  # noqa: E402


def test_overhead_times_bare_backend_and_runtime_paired_and_writes_its_section(tmp_path):
    path = tmp_path / "m.tflite"
    _tiny_tflite.make_mlp(path)
    feeds = bl.synthetic_feeds(path)
    assert list(feeds) == ["x"] and feeds["x"].dtype == np.float32 and feeds["x"].shape == (1, 10)
    r = bl.overhead({"tiny": path}, threads=1, rounds=3, runs=20)
    m = r["models"]["tiny"]
    assert r["rounds"] == 3 and m["file"] == "m.tflite" and m["calls_per_round"] == 20
    assert m["interpreter_threads"] == {"xnnpack": 1, "builtin": 1}
    for k in ("bare", "backend", "runtime"):
        assert 0 < m[k] < 1e5, (k, m[k])  # us per call
    for k in ("backend_x_bare", "runtime_x_bare"):
        assert 0.1 < m[k] < 100, (k, m[k])
    table = bl._overhead_markdown(r)
    assert "| tiny | m.tflite | 1 |" in table and table.count("\n| ") == 2  # the header and one row
    md = tmp_path / "B.md"
    assert bl.main(["--overhead", f"tiny={path}", "--rounds", "2", "--threads", "1", "--md", str(md)]) == 0
    assert "<!-- bench:litert:overhead -->" in md.read_text() and "| tiny | m.tflite |" in md.read_text()
