"""``edge bench engines``: each engine timed paired within rounds, the default's ratio to the fastest, auto's choice."""

from __future__ import annotations

import argparse
import json

import _tiny
import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
import _tiny_tflite  # noqa: E402

from lab.bench_engines import GOAL, bench_engines, cli, markdown  # noqa: E402

X = {"x": np.random.default_rng(0).standard_normal((1, 10)).astype(np.float32)}


@pytest.fixture()
def pair(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_ENGINE_CACHE", str(tmp_path / "choices"))
    _tiny.make_mlp(tmp_path / "m.onnx", seed=3)
    _tiny_tflite.make_mlp(tmp_path / "m.tflite", seed=3)
    return tmp_path / "m.onnx"


def test_both_engines_are_timed_and_the_default_is_compared_with_the_fastest(pair):
    r = bench_engines(pair, X, rounds=3, runs=5, warmup=1)
    assert set(r["engines"]) == {"onnxruntime", "tflite"} and r["skipped"] == {}
    fastest = r["fastest"]
    assert r["engines"][fastest]["x_fastest"] == 1.0
    assert all(e["x_fastest"] >= 1.0 and e["agrees"] for e in r["engines"].values())
    plain, dev = r["defaults"]["Runtime(model)"], r["defaults"]["Runtime(model, device='x86-dev')"]
    auto = r["defaults"]["Runtime(model, backend='auto')"]
    assert auto["engine"] in r["engines"] and "kept in" in auto["reason"]  # no profile: its own order, measured
    assert plain["engine"] == "onnxruntime" and "not measured" in plain["reason"]
    assert plain["x_fastest"] == r["engines"]["onnxruntime"]["x_fastest"]
    assert plain["limit"] == GOAL and plain["met"] == (plain["x_fastest"] <= GOAL)
    assert dev["engine"] in r["engines"] and "kept in" in dev["reason"]  # a profile, no backend: measured, kept
    md = markdown(r)
    assert "| onnxruntime | m.onnx | CPUExecutionProvider |" in md and "| tflite | m.tflite |" in md
    assert f"- `Runtime(model)` runs onnxruntime: {plain['x_fastest']:.3f}x the fastest" in md
    assert f"- `Runtime(model, device='x86-dev')` runs {dev['engine']}: " in md


def test_without_a_second_file_the_default_is_the_only_engine(pair):
    pair.with_suffix(".tflite").unlink()
    r = bench_engines(pair, X, rounds=2, runs=3, warmup=1)
    assert list(r["engines"]) == ["onnxruntime"]
    assert all(d["engine"] == "onnxruntime" and d["x_fastest"] == 1.0 and d["met"] for d in r["defaults"].values())
    assert r["skipped"] == {"tflite": "no m.tflite beside m.onnx"}
    assert "- tflite not compared: no m.tflite beside m.onnx" in markdown(r)


def test_cli_writes_json_and_the_engines_section(pair, tmp_path, capsys):
    np.savez(tmp_path / "x.npz", **X)
    md = tmp_path / "B.md"
    args = argparse.Namespace(
        model_file=str(pair),
        inputs=str(tmp_path / "x.npz"),
        threads=None,
        rounds=2,
        runs=3,
        json=tmp_path / "e.json",
        md=md,
        device="x86-dev",
    )
    assert cli(args) == 0
    out = json.loads((tmp_path / "e.json").read_text())
    assert out["models"][0]["model"] == "tiny-mlp" and json.loads(capsys.readouterr().out) == out
    text = md.read_text()
    assert "<!-- bench:engines -->" in text and "## Engines: the default against the fastest" in text
