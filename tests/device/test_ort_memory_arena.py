"""A small model's prepacked onnxruntime sessions run without onnxruntime's CPU arena (issue 18's memory on tiny
models, :mod:`runtimes.ort_session`).

The arena serves tensor allocations only; without it they go to the heap, where what a dropped prepacked session
freed is reused by the next build. The bound session keeps it (it packs its weights on every run). Measured in
``edge bench memory``'s children, not here: no timing or memory figure is asserted.
"""

from __future__ import annotations

import _tiny
import numpy as np
import onnxruntime as ort
import pytest

from runtimes.base import SMALL_MODEL_BYTES, BackendOptions, WeightWrite
from runtimes.onnxruntime import OrtBackend
from runtimes.ort_session import session_options

X = {"x": np.linspace(-1, 1, 30, dtype=np.float32).reshape(3, 10)}


def _arena(sess) -> bool:
    return sess.get_session_options().enable_cpu_mem_arena


@pytest.mark.parametrize("strategy", ["hybrid", "rebuild"])
def test_a_small_models_prepacked_sessions_have_no_cpu_arena_and_undo_stays_exact(tmp_path, strategy):
    path = tmp_path / "tiny.onnx"
    _tiny.make_mlp(path)
    assert path.stat().st_size < SMALL_MODEL_BYTES
    b = OrtBackend(path, BackendOptions(strategy=strategy))
    try:
        assert b.cpu_arena is False and _arena(b._static) is False
        before = b.run(X)["logits"]
        base = np.array(b.read("fc2.weight"))
        b.write(b.prepare([WeightWrite("fc2.weight", None, base * -1.0)]))
        assert b.wait_settled(30)
        assert _arena(b._static) is False  # the rebuilt one too
        if strategy == "hybrid":
            assert _arena(b._bound) is True  # packs B on every run: its buffers stay in its arena
        assert not np.array_equal(b.run(X)["logits"], before)
        b.write(b.prepare([WeightWrite("fc2.weight", None, base)]))
        assert b.wait_settled(30)
        np.testing.assert_array_equal(b.run(X)["logits"], before)  # bit-exact undo
    finally:
        b.close()


def test_a_model_over_the_bound_keeps_the_arena(tmp_path):
    path = tmp_path / "wide.onnx"
    _tiny.make_mlp(path, sizes=(10, 16384, 10))  # 1.3 MB of writable weights
    b = OrtBackend(path, BackendOptions(strategy="hybrid"))
    try:
        b.run({"x": X["x"]})
        assert b.cpu_arena is True and _arena(b._static) is True
    finally:
        b.close()


def test_session_options_are_the_ones_a_plain_session_can_copy():
    so = session_options(ort, 2, cpu_arena=False)
    assert so.intra_op_num_threads == 2 and so.enable_cpu_mem_arena is False and so.log_severity_level == 3
    so = session_options(ort, None)
    assert so.intra_op_num_threads == 0 and so.enable_cpu_mem_arena is True  # onnxruntime's defaults
