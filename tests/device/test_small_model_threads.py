"""Default threads: all cores, but one for a tiny model (``runtimes.base.SMALL_MODEL_BYTES``), on both backends.

Handing a run of a few microseconds to a second thread costs more than it saves (measured: the digits CNN 3.6 us
on 1 thread against 6.2 us on 2 on LiteRT, 8.1 against 10.1 us on onnxruntime), so ``threads=None`` holds a tiny
model to one; an explicit ``threads`` is kept.
"""

from __future__ import annotations

import logging

import _tiny
import pytest

from runtimes.base import SMALL_MODEL_BYTES, BackendOptions


def _litert():
    pytest.importorskip("ai_edge_litert")
    import runtimes.litert as litert

    return litert


@pytest.fixture
def four_cores(monkeypatch):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 4)


def _threads(path, threads):
    litert = _litert()
    b = litert.LiteRTBackend(path, BackendOptions(strategy="hybrid", threads=threads))
    try:
        return b.interpreter_threads
    finally:
        b.close()


def test_a_tiny_tflite_model_runs_on_one_thread_unless_threads_are_given(tmp_path, four_cores, caplog):
    from _tiny_tflite import make_mlp

    _litert()
    path = tmp_path / "tiny.tflite"
    make_mlp(path)
    assert path.stat().st_size < SMALL_MODEL_BYTES
    with caplog.at_level(logging.INFO, logger="edge.runtimes.litert"):
        assert _threads(path, None) == {"xnnpack": 1, "builtin": 1}
    assert any("run on 1 thread (pass threads= for more)" in r.message for r in caplog.records)
    assert _threads(path, 2) == {"xnnpack": 2, "builtin": 2}  # asked for: kept


def test_a_tflite_model_over_the_bound_keeps_all_cores(tmp_path, four_cores):
    from _tiny_tflite import make_mlp

    _litert()
    path = tmp_path / "wide.tflite"
    make_mlp(path, sizes=(10, 16384, 10))  # 2 x 163,840 float32 weights: 1.3 MB
    assert path.stat().st_size >= SMALL_MODEL_BYTES
    assert _threads(path, None) == {"xnnpack": 4, "builtin": 4}


@pytest.mark.parametrize("strategy", ["hybrid", "bound", "rebuild"])
def test_onnxruntime_sessions_of_a_tiny_model_run_on_one_thread_unless_threads_are_given(tmp_path, caplog, strategy):
    from runtimes.onnxruntime import OrtBackend

    small, wide = tmp_path / "tiny.onnx", tmp_path / "wide.onnx"
    _tiny.make_mlp(small)
    _tiny.make_mlp(wide, sizes=(10, 16384, 10))  # 1.3 MB of writable weights
    with caplog.at_level(logging.INFO, logger="edge.runtimes.onnxruntime"):
        b = OrtBackend(small, BackendOptions(strategy=strategy))
    try:
        assert b._session_options().intra_op_num_threads == 1
    finally:
        b.close()
    assert any("run on 1 thread (pass threads= for more)" in r.message for r in caplog.records)
    for path, threads, want in ((small, 2, 2), (wide, None, 0)):  # 0: onnxruntime's default, all cores
        b = OrtBackend(path, BackendOptions(strategy=strategy, threads=threads))
        try:
            assert b._session_options().intra_op_num_threads == want
        finally:
            b.close()


def test_the_resolved_threads_are_what_a_plain_session_compared_with_the_runtime_uses(tmp_path):
    from edge.runtime import Runtime

    small, wide = tmp_path / "tiny.onnx", tmp_path / "wide.onnx"
    _tiny.make_mlp(small)
    _tiny.make_mlp(wide, sizes=(10, 16384, 10))
    with Runtime(small) as rt:
        assert rt.backend.threads == 1
    with Runtime(small, threads=2) as rt:
        assert rt.backend.threads == 2
    with Runtime(wide) as rt:
        assert rt.backend.threads is None  # onnxruntime's default: all cores
