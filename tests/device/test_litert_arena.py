"""Which built-in kernels see an in-place write of int8 weights (:func:`runtimes.litert_arena.stale_readers`), on
operator lists built by hand: the kernels measured to read their weights at every run pass, the ones that cache
something derived from them are named. End to end (a real model, every strategy, against a fresh interpreter on
the merged file) in tests/host/test_tflite_quant.py and tests/device/test_litert_int8.py."""

from __future__ import annotations

import pytest

from edge.format.tflite import TfliteModel, TfliteOp, TfliteTensor
from runtimes.litert_arena import stale_readers

FLOAT32, INT32, INT8 = 0, 2, 9
CONV_2D, DEPTHWISE, EMBEDDING_LOOKUP, FULLY_CONNECTED, GATHER = 3, 4, 7, 9, 36


def _model(activation: int, op: TfliteOp) -> TfliteModel:
    tensors = (
        TfliteTensor(0, "x", activation, (1, 4), (-1, 4), 0, 0, 0),
        TfliteTensor(1, "w", INT8, (8, 4), (8, 4), 1, 64, 32, scale=(0.1,) * 8, zero_point=(0,) * 8),
        TfliteTensor(2, "y", FLOAT32, (1, 8), (-1, 8), 0, 0, 0),
    )
    return TfliteModel((tensors,), (0,), (2,), {}, 128, (op,))


@pytest.mark.parametrize(
    "activation,code,asymmetric,stale",
    [
        (INT32, EMBEDDING_LOOKUP, False, None),  # int8 table dequantized row by row at every run
        (FLOAT32, DEPTHWISE, False, None),
        (INT8, DEPTHWISE, False, None),
        (FLOAT32, FULLY_CONNECTED, False, None),
        (INT8, FULLY_CONNECTED, False, None),
        (INT8, CONV_2D, False, None),
        (FLOAT32, FULLY_CONNECTED, True, "dynamic-range FULLY_CONNECTED reads 'w'"),  # per-row sums cached
        (FLOAT32, CONV_2D, False, "dynamic-range CONV_2D reads 'w'"),
        (INT32, GATHER, False, "builtin op 36 reads 'w'"),  # not measured: named, never assumed to see a write
    ],
)
def test_stale_readers_pass_the_kernels_that_read_int8_weights_at_every_run(activation, code, asymmetric, stale):
    fb = _model(activation, TfliteOp(code, (0, 1), asymmetric, (2,)))
    assert stale_readers(fb, frozenset({1})) == ([] if stale is None else [stale])
    assert stale_readers(fb, frozenset()) == []  # a model with no integer target has nothing to refuse


@pytest.mark.parametrize("strategy", ["hybrid", "builtin"])
def test_a_switch_never_writes_into_bytes_the_caller_holds(tmp_path, strategy):
    """Given the model's bytes, the backend writes into its own copy (``data + b""`` is ``data`` itself in CPython,
    so a length needing no padding once shared the caller's object); given a path, the bytes it read are its own."""
    import _tiny_tflite
    import numpy as np

    from runtimes import get_backend
    from runtimes.base import BackendOptions, WeightWrite

    path = tmp_path / "m.tflite"
    _tiny_tflite.make_mlp(path)
    data = path.read_bytes()
    assert len(data) % 16 == 0  # the case that shared it
    before = bytes(bytearray(data))
    x = {"x": np.ones((1, 10), np.float32)}
    for model in (data, path):
        b = get_backend("tflite")(model, BackendOptions(strategy=strategy, threads=1))
        y0 = b.run(x)["logits"]
        t = b.info.tensors["fc1.weight"].initializer
        b.write(b.prepare([WeightWrite(t, np.arange(20), np.full(20, 3.0, np.float32))]))
        assert b.wait_settled(30) and np.abs(b.run(x)["logits"] - y0).max() > 1e-2  # the write is seen
        b.close()
        assert data == before and path.read_bytes() == before  # neither the caller's bytes nor the file changed
