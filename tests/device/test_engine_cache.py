"""backend="auto" measures once: the choice is kept per model files, machine and libraries; a change re-measures."""

from __future__ import annotations

import json
import logging
import os

import _tiny
import numpy as np
import pytest

import edge.engine_cache as ec
from edge.runtime import Runtime

pytest.importorskip("ai_edge_litert")
import _tiny_tflite  # noqa: E402

X = {"x": np.random.default_rng(0).standard_normal((1, 10)).astype(np.float32)}


@pytest.fixture()
def pair(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_ENGINE_CACHE", str(tmp_path / "choices"))
    _tiny.make_mlp(tmp_path / "m.onnx", seed=3)
    _tiny_tflite.make_mlp(tmp_path / "m.tflite", seed=3)
    return tmp_path / "m.onnx"


def _no_measuring(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("measured although the choice was kept")

    monkeypatch.setattr(ec, "compare_engines", refuse)


def test_first_load_measures_and_keeps_the_choice_the_next_reads_it(pair, monkeypatch):
    with Runtime(pair, backend="auto") as rt:
        first = rt.engine_choice
        assert "kept in" in first.reason and first.comparison is not None
        assert rt.backend.name == first.backend
    files = list((pair.parent / "choices").glob("m-*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["format"] == ec.FORMAT and record["backend"] == first.backend
    assert {f[0] for f in record["key"]["files"]} == {"onnxruntime", "tflite"}
    _no_measuring(monkeypatch)
    with Runtime(pair, backend="auto") as rt:
        assert rt.engine_choice.backend == first.backend and rt.engine_choice.path == first.path
        assert "read from" in rt.engine_choice.reason and rt.engine_choice.comparison == record["comparison"]
        with Runtime(pair) as ref:
            np.testing.assert_allclose(rt.run(X)["logits"], ref.run(X)["logits"], atol=1e-5)


def test_a_changed_file_or_thread_count_measures_again(pair, monkeypatch):
    ec.cached_engine(pair)
    st = pair.with_suffix(".tflite").stat()
    os.utime(pair.with_suffix(".tflite"), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert "kept in" in ec.cached_engine(pair).reason
    assert "kept in" in ec.cached_engine(pair, threads=1).reason
    assert len(list((pair.parent / "choices").glob("m-*.json"))) == 3
    _no_measuring(monkeypatch)
    assert "read from" in ec.cached_engine(pair, threads=1).reason


@pytest.mark.parametrize(
    "damage",
    [
        lambda rec: b"{not json",
        lambda rec: json.dumps({**rec, "version": 99}).encode(),
        lambda rec: json.dumps({**rec, "backend": "nosuch"}).encode(),
        lambda rec: json.dumps({**rec, "key": {**rec["key"], "threads": 7}}).encode(),
        lambda rec: b" " * (2 << 20),  # over the bound: not read
    ],
)
def test_a_damaged_or_foreign_choice_is_not_used_and_says_so(pair, caplog, damage):
    ec.cached_engine(pair)
    (path,) = (pair.parent / "choices").glob("m-*.json")
    path.write_bytes(damage(json.loads(path.read_text())))
    with caplog.at_level(logging.WARNING, logger="edge.engines"):
        choice = ec.cached_engine(pair)
    assert "kept in" in choice.reason
    assert any("not used" in r.getMessage() and "measuring again" in r.getMessage() for r in caplog.records)
    assert json.loads(path.read_text())["format"] == ec.FORMAT  # rewritten whole


def test_a_choice_that_cannot_be_kept_is_used_and_says_so(pair, tmp_path, monkeypatch, caplog):
    (tmp_path / "blocked").write_text("a file, not a folder")
    with caplog.at_level(logging.WARNING, logger="edge.engines"):
        choice = ec.cached_engine(pair, folder=tmp_path / "blocked" / "sub")
    assert "not kept" in choice.reason and choice.backend in ("onnxruntime", "tflite")
    assert any("not kept" in r.getMessage() for r in caplog.records)


def test_a_strategy_one_engine_lacks_leaves_it_out_without_measuring(pair, monkeypatch):
    _no_measuring(monkeypatch)
    with Runtime(pair, backend="auto", strategy="bound") as rt:
        assert rt.backend.name == "onnxruntime" and rt.strategy == "bound"
        assert rt.engine_choice.reason == "onnxruntime: the only engine that can run it here"
        assert rt.engine_choice.skipped["tflite"].startswith("strategy 'bound' asked; tflite offers ")
    assert not (pair.parent / "choices").exists()


def test_a_named_backend_or_the_suffix_is_recorded_without_measuring(pair, monkeypatch):
    _no_measuring(monkeypatch)
    with Runtime(pair) as rt:
        assert rt.engine_choice.backend == "onnxruntime" and rt.engine_choice.path == pair
        assert rt.engine_choice.reason == "onnxruntime: the engine of .onnx files (no device profile), not measured"
    with Runtime(pair.with_suffix(".tflite")) as rt:
        assert rt.backend.name == "tflite"
        assert rt.engine_choice.reason == "tflite: the engine of .tflite files (no device profile), not measured"
    with Runtime(pair, backend="onnxruntime", device="x86-dev") as rt:
        assert rt.engine_choice.reason == "onnxruntime: backend='onnxruntime' given, not measured"
    assert not (pair.parent / "choices").exists()


def test_a_device_profile_without_a_backend_runs_the_engine_measured_fastest(pair, monkeypatch):
    with Runtime(pair, device="x86-dev") as rt:  # both files here: the default with a device is "auto"
        assert "kept in" in rt.engine_choice.reason and rt.engine_choice.comparison is not None
        assert rt.backend.name == rt.engine_choice.backend
    _no_measuring(monkeypatch)
    with Runtime(pair, device="x86-dev", backend="onnxruntime") as rt:  # a named backend is never second-guessed
        assert rt.backend.name == "onnxruntime" and "not measured" in rt.engine_choice.reason


def test_the_reason_says_when_the_chosen_file_takes_other_adapters(pair, monkeypatch):
    from edge.engines import decide as real_decide

    def tflite_wins(found, figures, skipped=None, margin=ec.MARGIN):
        for b, f in figures["engines"].items():
            f["ratio"] = 1.0 if b == "tflite" else 2.0
        return real_decide(found, figures, skipped, margin)

    monkeypatch.setattr(ec, "decide", tflite_wins)
    choice = ec.cached_engine(pair)
    assert choice.backend == "tflite"
    ours, theirs = (_fingerprint(p) for p in (pair, pair.with_suffix(".tflite")))
    assert ours != theirs  # the two files store the weights differently: each has its own fingerprint
    assert f"adapters for m.onnx ({ours}) do not apply to m.tflite ({theirs})" in choice.reason


def _fingerprint(path):
    from runtimes import read_model_info

    return read_model_info(path).fingerprint
