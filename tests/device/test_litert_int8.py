"""The LiteRT backend on int8 models, device side (no torch, no converter): the integer arena (issue 18).

A tiny dynamic-range int8 twin of ``_tiny_tflite.make_mlp`` is written with the flatbuffer object API
(``FULLY_CONNECTED`` with int8 weights, one symmetric scale per output channel, float activations; what
``exporters.quantize_tflite`` writes). On every strategy: an integer adapter lands bit-exactly and the
outputs equal a fresh interpreter over the file with those integers written in; undo restores every byte;
a fusion leaving the int8 range raises :class:`edge.SaturationError` and writes nothing; a float adapter
is requantized onto the grid. A hybrid FC that caches row sums (``asymmetric_quantize_inputs``) is
refused for the in-place strategies, and a changed scale fails the fingerprint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from _tiny_tflite import make_mlp  # noqa: E402
from ai_edge_litert import schema_py_generated as s  # noqa: E402

from edge.errors import ConfigError, FormatError, SaturationError  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.format.modelinfo import META_KEY, ModelInfo, QuantInfo, TensorInfo, fingerprint  # noqa: E402
from edge.format.tflite import aligned_buffer, fingerprint_arrays, pack_model, read_tflite, set_metadata  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from runtimes.base import BackendOptions  # noqa: E402
from runtimes.litert import LiteRTBackend, one_thread_reason  # noqa: E402
from runtimes.litert_arena import dynamic_range_ops  # noqa: E402

STRATEGIES = ("hybrid", "rebuild", "builtin")
SIZES = (10, 20, 2)
FC = s.BuiltinOperator.FULLY_CONNECTED


class Graph:
    """Just enough of the flatbuffer object API for FULLY_CONNECTED graphs with float or int8 tensors."""

    def __init__(self) -> None:
        self.m = s.ModelT()
        self.m.version, self.m.buffers = 3, [aligned_buffer(None)]
        code = s.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = FC, FC, 1
        self.m.operatorCodes = [code]
        self.sg = s.SubGraphT()
        self.sg.tensors, self.sg.operators = [], []
        self.m.subgraphs = [self.sg]

    def tensor(self, name: str, shape, data: np.ndarray | None = None, quant=None) -> int:
        t = s.TensorT()
        t.name, t.shape, t.buffer = name.encode(), list(shape), 0
        t.type = s.TensorType.FLOAT32 if data is None or data.dtype == np.float32 else s.TensorType.INT8
        if data is None:
            t.shapeSignature = [-1, *shape[1:]]
        else:
            self.m.buffers.append(aligned_buffer(np.ascontiguousarray(data).reshape(-1).view(np.uint8)))
            t.buffer = len(self.m.buffers) - 1
        if quant is not None:  # per output channel, symmetric
            t.quantization = s.QuantizationParametersT()
            t.quantization.scale, t.quantization.zeroPoint = quant, np.zeros(len(quant), np.int64)
            t.quantization.quantizedDimension = 0
        self.sg.tensors.append(t)
        return len(self.sg.tensors) - 1

    def fc(self, inputs, output: int, relu: bool, asymmetric: bool) -> None:
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = 0, list(inputs), [output]
        o.builtinOptionsType, o.builtinOptions = s.BuiltinOptions.FullyConnectedOptions, s.FullyConnectedOptionsT()
        o.builtinOptions.fusedActivationFunction = (
            s.ActivationFunctionType.RELU if relu else s.ActivationFunctionType.NONE
        )
        o.builtinOptions.asymmetricQuantizeInputs = asymmetric
        self.sg.operators.append(o)


def make_int8_mlp(path: Path, asymmetric: bool = False) -> tuple[ModelInfo, dict]:
    """x[B,10] -> FC(int8 W1) -> ReLU -> FC(int8 W2) -> logits; returns the info and {param: (q, scale)}."""
    rng = np.random.default_rng(0)
    d_in, d_hid, d_out = SIZES
    g = Graph()
    x, h, y = g.tensor("x", (1, d_in)), g.tensor("h", (1, d_hid)), g.tensor("logits", (1, d_out))
    base, tensors, index = {}, {}, {}
    for name, shape in (("fc1.weight", (d_hid, d_in)), ("fc2.weight", (d_out, d_hid))):
        w = rng.standard_normal(shape).astype(np.float32) * 0.5
        scale = (2.0 * np.abs(w).max(1) / 127).astype(np.float32)  # headroom 2: room for adapters to grow
        q = np.round(w / scale[:, None]).astype(np.int8)
        index[name] = g.tensor(name, shape, q, quant=scale)
        base[name] = (q, scale)
        quant = QuantInfo(f"{name}@scale", f"{name}@zero_point", "int8", 0)
        tensors[name] = TensorInfo(name, shape, quant=quant)
    b1 = g.tensor("fc1.bias", (d_hid,), rng.standard_normal(d_hid).astype(np.float32) * 0.1)
    g.fc([x, index["fc1.weight"], b1], h, relu=True, asymmetric=asymmetric)
    g.fc([h, index["fc2.weight"], -1], y, relu=False, asymmetric=asymmetric)
    g.sg.inputs, g.sg.outputs = [x], [y]
    info = ModelInfo(name="int8-mlp", fingerprint="", tensors=tensors, inputs=("x",), outputs=("logits",))
    data = pack_model(g.m)
    info = ModelInfo(
        name=info.name,
        fingerprint=fingerprint(fingerprint_arrays(data, read_tflite(data))),
        tensors=tensors,
        inputs=info.inputs,
        outputs=info.outputs,
    )
    set_metadata(g.m, META_KEY, info.to_json().encode())
    path.write_bytes(pack_model(g.m))
    return info, base


def int_adapter(info, base, name: str, steps: int, seed: int) -> tuple[Adapter, dict]:
    rng = np.random.default_rng(seed)
    tensors, want = {}, {}
    for k, (q, scale) in base.items():
        flat = rng.choice(q.size, size=6, replace=False)
        idx = np.stack(np.unravel_index(flat, q.shape)).astype(np.int32)
        old = q[tuple(idx)].astype(np.int64)
        new = np.clip(old + steps, -128, 127).astype(np.int8)
        tensors[k] = SparseDelta(idx, ((new - old) * scale[idx[0]]).astype(np.float32), new)
        want[k] = (idx, new)
    shapes = {k: tuple(info.tensors[k].shape) for k in tensors}
    return Adapter(name, info.fingerprint, tensors, shapes, method="shira"), want


def merged(path: Path, want: dict) -> bytes:
    data = bytearray(path.read_bytes())
    by_name = {t.name: t for t in read_tflite(bytes(data)).tensors}
    for k, (idx, new) in want.items():
        t = by_name[k]
        q = np.frombuffer(data, np.int8, t.nbytes, t.start).reshape(t.shape).copy()
        q[tuple(idx)] = new
        data[t.start : t.start + t.nbytes] = q.tobytes()
    return bytes(data)


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "q.tflite"
    info, base = make_int8_mlp(path)
    return path, info, base


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_integer_adapter_switches_exactly_and_undoes_bit_exactly(model, strategy):
    path, info, base = model
    x = np.random.default_rng(1).standard_normal((3, SIZES[0])).astype(np.float32)
    adapter, want = int_adapter(info, base, "a", 9, seed=2)
    with Runtime(path, backend="tflite", strategy=strategy) as rt:
        assert rt.backend.constant("fc1.weight@scale").dtype == np.float32
        before = rt.run({"x": x})["logits"]
        w1 = base["fc1.weight"][0].astype(np.float32) * base["fc1.weight"][1][:, None]
        w2 = base["fc2.weight"][0].astype(np.float32) * base["fc2.weight"][1][:, None]
        b1 = read_tflite(path.read_bytes())
        ref = np.maximum(x @ w1.T + _bias(path, b1), 0) @ w2.T  # the dequantized model, float activations
        np.testing.assert_allclose(before, ref, atol=0.05 * np.abs(ref).max())  # int8 activations at run time
        rt.load_adapter(adapter)
        rt.switch("a")
        for k, (idx, new) in want.items():
            assert rt.weights(k).dtype == np.int8
            np.testing.assert_array_equal(rt.weights(k)[tuple(idx)], new)
        rt.wait_settled(30)
        got = rt.run({"x": x})["logits"]
        ref_rt = LiteRTBackend(
            merged(path, want), BackendOptions(strategy="rebuild" if strategy == "hybrid" else strategy, verify=False)
        )
        np.testing.assert_array_equal(got, ref_rt.run({"x": x})["logits"])
        ref_rt.close()
        assert not np.array_equal(got, before)
        rt.switch(None)
        rt.wait_settled(30)
        for k, (q, _) in base.items():
            np.testing.assert_array_equal(rt.weights(k), q)
        np.testing.assert_array_equal(rt.run({"x": x})["logits"], before)


def _bias(path: Path, fb) -> np.ndarray:
    t = next(t for t in fb.tensors if t.name == "fc1.bias")
    return np.frombuffer(path.read_bytes(), np.float32, t.nbytes // 4, t.start)


def test_saturating_fusion_is_refused_and_a_float_adapter_is_requantized(model):
    path, info, base = model
    a, _ = int_adapter(info, base, "a", 100, seed=3)
    b, _ = int_adapter(info, base, "b", 100, seed=3)  # the same entries, pushed out again
    with Runtime(path, backend="tflite", strategy="builtin") as rt:
        rt.load_adapter(a)
        rt.load_adapter(b)
        with pytest.raises(SaturationError):
            rt.switch({"a": 1.0, "b": 1.0})
        for k, (q, _) in base.items():
            np.testing.assert_array_equal(rt.weights(k), q)  # nothing written
        idx = np.array([[0, 1], [2, 3]], np.int32)
        scale = base["fc1.weight"][1]
        delta = np.array([3.0, -2.0], np.float32) * scale[idx[0]]  # whole steps of each row's scale
        fl = Adapter("f", info.fingerprint, {"fc1.weight": SparseDelta(idx, delta)}, {"fc1.weight": (20, 10)})
        rt.load_adapter(fl)
        rt.switch("f")
        q = base["fc1.weight"][0]
        np.testing.assert_array_equal(rt.weights("fc1.weight")[tuple(idx)], q[tuple(idx)] + np.array([3, -2]))


def test_row_sum_caching_kernel_is_refused_for_in_place_strategies(tmp_path):
    path = tmp_path / "asym.tflite"
    info, base = make_int8_mlp(path, asymmetric=True)
    for strategy in ("hybrid", "builtin"):
        with pytest.raises(ConfigError, match="dynamic-range FULLY_CONNECTED reads 'fc1.weight'"):
            Runtime(path, backend="tflite", strategy=strategy)
    adapter, want = int_adapter(info, base, "a", 9, seed=2)
    x = np.ones((1, SIZES[0]), np.float32)
    with Runtime(path, backend="tflite") as rt:  # auto takes rebuild: a fresh interpreter computes them anew
        assert rt.strategy == "rebuild"
        rt.load_adapter(adapter)
        rt.switch("a")
        ref = LiteRTBackend(merged(path, want), BackendOptions(strategy="rebuild", verify=False))
        np.testing.assert_array_equal(rt.run({"x": x})["logits"], ref.run({"x": x})["logits"])
        ref.close()


def test_changed_scale_or_wrong_constant_names_are_refused(model, tmp_path):
    path, info, base = model
    raw = bytearray(path.read_bytes())
    scale = base["fc2.weight"][1]
    at = bytes(raw).find(scale.tobytes())
    raw[at : at + 4] = np.float32(scale[0] * 2).tobytes()
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="fingerprint"):
        Runtime(bad, backend="tflite")
    with Runtime(bad, backend="tflite", verify=False) as rt:  # unverified: the scale is read as stored
        assert rt.backend.constant("fc2.weight@scale")[0] == np.float32(scale[0] * 2)
        with pytest.raises(FormatError, match="not a quantization constant"):
            rt.backend.constant("fc2.weight")


def test_corrupt_int8_files_raise_format_errors_only(model):
    path, _, _ = model
    data = path.read_bytes()
    rng = np.random.default_rng(5)
    fb = read_tflite(data)
    assert [t.scale for t in fb.tensors if t.name == "fc2.weight"][0]  # quantization parameters are read
    assert [op.code for op in fb.ops] == [FC, FC]
    for _ in range(300):  # one corrupted byte in the flatbuffer's tables (quantization, operators, vectors)
        raw = bytearray(data)
        at = int(rng.integers(0, len(raw)))
        raw[at] = int(rng.integers(0, 256))
        try:
            read_tflite(bytes(raw))
        except FormatError:
            pass
    for n in (9, 64, len(data) // 2):  # truncated
        try:
            read_tflite(data[:n])
        except FormatError:
            pass


def _op(name: str, *inputs: int) -> dict:
    return {"op_name": name, "inputs": np.asarray(inputs, np.int32)}


def test_one_thread_rule_names_dynamic_range_ops_left_to_the_built_in_kernels():
    """The thread decision on op listings like ``_get_ops_details()``: a dynamic-range op whose int8 weight
    no DELEGATE node takes runs on the built-in kernels, which collapse on 2 threads; XNNPACK's do not."""
    dynamic = {1: 14, 2: 4}  # op index -> int8 weight tensor (a depthwise conv, an FC)
    dw, fc = _op("DEPTHWISE_CONV_2D", 19, 14, 9), _op("FULLY_CONNECTED", 27, 4, 2)
    ops = [_op("RESHAPE", 0, 18), dw, fc]
    everything = [*ops, _op("DELEGATE", 0, 18, 14, 9, 4, 2)]  # XNNPACK took both
    assert one_thread_reason(everything, True, frozenset(), dynamic) is None
    split = [*ops, _op("DELEGATE", 0, 18), _op("DELEGATE", 4, 2)]  # the depthwise conv is left to the built-ins
    why = one_thread_reason(split, True, frozenset(), dynamic)
    assert "DEPTHWISE_CONV_2D" in why and "FULLY_CONNECTED" not in why and "op_types" in why
    why = one_thread_reason(ops, False, frozenset(), dynamic)  # built-in kernels only: both
    assert "DEPTHWISE_CONV_2D, FULLY_CONNECTED" in why and "op_types" not in why
    assert one_thread_reason(ops, False, frozenset(), {}) is None  # a float model keeps its threads
    conv = [_op("CONV_2D", 0, 5, 6)]  # an adaptable filter under the built-in multithreaded CONV_2D
    assert "CONV_2D keeps a copy" in one_thread_reason(conv, False, frozenset({5}), {})
    assert one_thread_reason(conv, True, frozenset({5}), {}) is None  # XNNPACK is rebuilt at every write
    assert one_thread_reason([{"op_name": "DELEGATE"}], True, frozenset(), dynamic)  # no listing: assume split


def test_dynamic_range_built_in_interpreter_runs_on_one_thread_and_says_so(model, tmp_path, caplog):
    path, info, _ = model
    fb = read_tflite(path.read_bytes())
    assert sorted(dynamic_range_ops(fb).values()) == sorted(t.index for t in fb.tensors if t.type == s.TensorType.INT8)
    with caplog.at_level("WARNING", logger="edge.runtimes.litert"):
        b = LiteRTBackend(path, BackendOptions(strategy="hybrid", threads=2))
    try:  # XNNPACK takes the dynamic-range FC (keeps 2 threads); the settle window's built-in FC does not
        assert b.interpreter_threads == {"xnnpack": 2, "builtin": 1}
    finally:
        b.close()
    assert any("built-in interpreter runs on 1 thread, not 2" in r.message for r in caplog.records)
    float_path = tmp_path / "f.tflite"
    make_mlp(float_path)
    assert not dynamic_range_ops(read_tflite(float_path.read_bytes()))
    b = LiteRTBackend(float_path, BackendOptions(strategy="hybrid", threads=2))
    try:
        assert b.interpreter_threads == {"xnnpack": 2, "builtin": 2}
    finally:
        b.close()
