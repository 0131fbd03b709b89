"""``edge bench coldstart``: each contestant in a fresh process timed from its spawn to its first answer; the JSON and
the BENCHMARKS.md section carry the measured figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import _tiny
import numpy as np
import pytest

from edge.cli import main
from edge.errors import EdgeError
from lab.bench_coldstart import CONTESTANTS, bench_coldstart, markdown

LINUX = sys.platform.startswith("linux")


def _check(r: dict, rounds: int) -> None:
    """Figures every run has, consistent with each other and with the rounds recorded."""
    c = r["contestants"]
    assert list(c) == list(CONTESTANTS) and r["rounds"] == rounds and r["file_cache"] == "warm"
    assert all(len(v) == rounds for v in r["rounds_wall_ms"].values())
    for name, f in c.items():
        assert abs(f["wall_ms"] - np.median(r["rounds_wall_ms"][name])) <= 0.06, name
        assert f["cpu_ms"] > 0 and f["modules"] > 0, name
        if LINUX:  # the parent's and the child's perf_counter are one clock: start falls inside the wall time
            assert 0 < f["start_ms"] <= f["wall_ms"] and f["hwm_mb"] >= f["rss_mb"] > 0, name
            assert f["hwm_settled_mb"] >= f["hwm_mb"], name
    assert c["python"]["heavy"] == c["python"]["heavy_imported"] == [] and c["python"]["import_ms"] is None
    assert "onnxruntime" in c["onnxruntime"]["heavy_imported"]
    for name in ("onnxruntime", "edge.Runtime"):
        f = c[name]
        assert {"numpy", "onnxruntime"} <= set(f["heavy"]) and f["modules"] >= f["modules_imported"] > 0, name
        assert min(f["import_ms"], f["construct_ms"], f["run_ms"]) > 0, name
        assert "numpy" in f["heavy_imported"] and set(f["heavy_imported"]) <= set(f["heavy"]), name
        phases = f["import_ms"] + f["inputs_ms"] + f["construct_ms"] + f["run_ms"]
        if rounds == 1:  # the child's phases fit in the parent's wall time from spawn to answer
            assert phases + (f["start_ms"] or 0) <= f["wall_ms"] + 1.0, name
    assert c["edge.Runtime"]["backend"] == "onnxruntime" and c["edge.Runtime"]["strategy"]
    rt = c["edge.Runtime"]  # rounds at full speed at the answer, rounds with no background build left by then
    assert 0 <= rt["idle_at_answer"] <= rt["settled_at_answer"] <= rounds
    assert r["bytecode"].endswith(("(as pip install does)", ": as installed"))  # edge and runtimes compiled
    for name in ("python", "edge.Runtime"):  # paired ratios to the plain session of the same round
        x = c[name]["wall_x"]
        ratios = np.asarray(r["rounds_wall_ms"][name]) / np.asarray(r["rounds_wall_ms"]["onnxruntime"])
        assert x["median"] == pytest.approx(np.median(ratios), abs=0.02), name
        assert x["ci_low"] <= x["median"] <= x["ci_high"], name
    assert "wall_x" not in c["onnxruntime"]


def test_cli_writes_json_and_a_section_of_measured_figures(tmp_path):
    _tiny.make_mlp(tmp_path / "m.onnx", seed=3)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((1, 10)).astype(np.float32))
    md, js = tmp_path / "BENCH.md", tmp_path / "out.json"
    argv = ["bench", "coldstart", "--model-file", str(tmp_path / "m.onnx"), "--inputs", str(tmp_path / "x.npz")]
    assert main([*argv, "--rounds", "2", "-q", "--md", str(md), "--json", str(js)]) == 0
    out = json.loads(js.read_text())
    (r,) = out["models"]
    _check(r, 2)
    assert r["model"] == f"{tmp_path.name}/m.onnx" and out["machine"]["cores"] > 0
    text = md.read_text()
    assert text.count("<!-- bench:coldstart -->") == 1 and "<!-- /bench:coldstart -->" in text
    assert "## Cold start: process start to first answer" in text and " at commit " in text
    assert "2 rounds of fresh processes" in text and "warm file cache" in text
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    for name, f in r["contestants"].items():  # each row's first answer, its ratio and module count, as measured
        row = rows[name]
        assert row[1] == f"{f['wall_ms']:.0f}" and row[-1] == f"{f['modules']:.0f} |", name
        assert row[-3] == (", ".join(f["heavy"]) or "none"), name
        x = f.get("wall_x")
        assert row[2] == ("1" if x is None else f"{x['median']:.2f} ({x['ci_low']:.2f}-{x['ci_high']:.2f})"), name


def test_digits_one_round():
    found = sorted(Path.home().glob(".cache/edge/digits-*/encoder.onnx"))
    found = [p for p in found if "cnn" not in p.parent.name]
    if not found:
        pytest.skip("no digits-vit in ~/.cache/edge (make demo builds it)")
    pixels = np.random.default_rng(1).random((1, 1, 8, 8), dtype=np.float32)
    try:
        r = bench_coldstart(found[0], {"pixels": pixels}, rounds=1, progress=False)
    except EdgeError as e:  # a cache from another input size: the model says what it wants
        pytest.skip(f"the cached digits model takes other inputs: {e}")
    _check(r, 1)
    assert "torch" not in r["contestants"]["edge.Runtime"]["heavy"]  # the device path never imports torch
    md = markdown(r)
    f = r["contestants"]["edge.Runtime"]
    assert f"| edge.Runtime | {f['wall_ms']:.0f} | " in md and f"strategy {f['strategy']}" in md


def test_a_failing_child_and_no_rounds_are_errors_naming_them(tmp_path):
    with pytest.raises(EdgeError, match="--rounds >= 1; given 0"):
        bench_coldstart(tmp_path / "m.onnx", {}, rounds=0)
    with pytest.raises(EdgeError, match="is not a regular file: give an .onnx"):
        bench_coldstart(tmp_path, {}, rounds=1)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(EdgeError, match=r"cold-start child onnxruntime on bad\.onnx failed \(exit code 1\): \S") as e:
        bench_coldstart(tmp_path / "bad.onnx", {"x": np.zeros((1, 10), np.float32)}, rounds=1, progress=False)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)  # the child's error, its last line
