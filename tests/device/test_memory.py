"""Memory of the onnxruntime load path (issue 16), asserted without timing anything.

The weights are held once (the arena) and never as a serialised or parsed copy; a path and the
file bytes load the same; the footprint prediction orders the strategies; ``strategy="auto"``
picks by a memory budget; an embedding table is fed from the arena rather than copied.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from _tiny import make_mlp, write_model
from onnx import TensorProto, helper, numpy_helper

from edge.errors import ConfigError, FormatError
from edge.format.modelinfo import META_KEY, ModelInfo, TensorInfo, fingerprint, onnx_info
from runtimes.base import ArenaBackend, BackendOptions, WeightWrite, model_buffer
from runtimes.onnx_file import graph_bytes
from runtimes.onnxruntime import OrtBackend

STRATEGIES = OrtBackend.STRATEGIES
VOCAB, DIM, OUT = 300, 64, 8


def make_embedder(path: Path, seed: int = 0) -> ModelInfo:
    """ids[B,T] -> Gather(emb) -> MatMul(proj) -> mean over T: one table only Gather reads, one MatMul weight."""
    rng = np.random.default_rng(seed)
    stored = {
        "emb.weight": rng.standard_normal((VOCAB, DIM)).astype(np.float32),
        "proj.weight": rng.standard_normal((DIM, OUT)).astype(np.float32) * 0.1,  # stored [in, out]
    }
    nodes = [
        helper.make_node("Gather", ["emb.weight", "ids"], ["e"]),
        helper.make_node("MatMul", ["e", "proj.weight"], ["p"]),
        helper.make_node("ReduceMean", ["p"], ["y"], axes=[1], keepdims=0),
    ]
    tensors = {
        "emb.weight": TensorInfo("emb.weight", (VOCAB, DIM)),
        "proj.weight": TensorInfo("proj.weight", (OUT, DIM), transposed=True),
    }
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT])]
    return write_model(path, "embedder", nodes, inputs, outputs, stored, tensors)


IDS = {"ids": np.array([[1, 7, 299, 0, 42], [3, 3, 3, 3, 3]], np.int64)}


def reference(path: Path, weights: dict[str, np.ndarray]) -> np.ndarray:
    w = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    w.update(weights)
    return (w["emb.weight"][IDS["ids"]] @ w["proj.weight"]).mean(axis=1)


@pytest.fixture
def embedder(tmp_path):
    path = tmp_path / "embedder.onnx"
    make_embedder(path)
    return path


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_serialised_or_parsed_copy_of_the_weights_is_kept(embedder, strategy):
    weights = [numpy_helper.to_array(t).tobytes() for t in onnx.load(str(embedder)).graph.initializer]
    b = OrtBackend(embedder, BackendOptions(strategy=strategy))
    try:
        b.wait_settled(30)
        held = [v for v in vars(b).values() if isinstance(v, (bytes, bytearray, onnx.ModelProto))]
        assert not any(isinstance(v, onnx.ModelProto) for v in held)
        arena = sum(b.read(k).nbytes for k in ("emb.weight", "proj.weight"))
        for v in held:  # only the weight-less graph, kept for rebuilds
            assert len(v) < arena / 10
            assert not any(w[:256] in v for w in weights)
        assert np.shares_memory(b.read("emb.weight"), b.read("proj.weight")) is False  # disjoint views ...
        base = b.read("emb.weight").base
        while getattr(base, "base", None) is not None:
            base = base.base
        # ... of one arena holding every writable tensor once, each on a 64-byte line (padding at most 64 bytes each)
        assert arena <= base.nbytes <= arena + 64 * 3
    finally:
        b.close()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_path_and_bytes_load_the_same_and_switch(embedder, strategy):
    by_path = OrtBackend(embedder, BackendOptions(strategy=strategy))
    by_bytes = OrtBackend(embedder.read_bytes(), BackendOptions(strategy=strategy))
    try:
        np.testing.assert_allclose(by_path.run(IDS)["y"], reference(embedder, {}), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(by_path.run(IDS)["y"], by_bytes.run(IDS)["y"])
        # write the Gather-only table (fed from the arena) and the prepacked MatMul weight, right after load
        emb = np.array(by_path.read("emb.weight")) + 0.5
        proj = np.array(by_path.read("proj.weight")) * -2.0
        for b in (by_path, by_bytes):
            b.write(b.prepare([WeightWrite("emb.weight", None, emb), WeightWrite("proj.weight", None, proj)]))
        want = reference(embedder, {"emb.weight": emb, "proj.weight": proj})
        for b in (by_path, by_bytes):
            np.testing.assert_allclose(b.run(IDS)["y"], want, rtol=1e-5, atol=1e-5)
            assert b.wait_settled(30)
            np.testing.assert_allclose(b.run(IDS)["y"], want, rtol=1e-5, atol=1e-5)
    finally:
        by_path.close()
        by_bytes.close()


def test_copying_fallback_gives_the_same_results(embedder):
    b = OrtBackend(embedder, BackendOptions(strategy="rebuild"))
    try:
        assert b.shares_weights
        b.shares_weights = False  # as after onnxruntime refused to prepack from the arena in place
        proj = np.array(b.read("proj.weight")) + 1.0
        b.write(b.prepare([WeightWrite("proj.weight", None, proj)]))
        np.testing.assert_allclose(b.run(IDS)["y"], reference(embedder, {"proj.weight": proj}), rtol=1e-5, atol=1e-5)
    finally:
        b.close()


def test_conv_weights_are_copied_matmul_weights_shared(tmp_path):
    """A Conv weight (which onnxruntime's optimizers rewrite) beside a MatMul weight: both switch right."""
    rng = np.random.default_rng(0)
    stored = {
        "conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "fc.weight": rng.standard_normal((16, 3)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "fc.weight"], ["y"]),
    ]
    shape = numpy_helper.from_array(np.array([-1, 16], np.int64), "shape")
    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [*(numpy_helper.from_array(v, k) for k, v in stored.items()), shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    tensors = {k: TensorInfo(k, v.shape) for k, v in stored.items()}
    info = ModelInfo("convnet", fingerprint({**stored, "shape": numpy_helper.to_array(shape)}), tensors, ("x",), ("y",))
    helper.set_model_props(model, {META_KEY: info.to_json()})
    onnx.save(model, str(tmp_path / "c.onnx"))
    x = {"x": rng.standard_normal((1, 1, 2, 2)).astype(np.float32)}
    for strategy in ("rebuild", "hybrid"):
        b = OrtBackend(tmp_path / "c.onnx", BackendOptions(strategy=strategy))
        try:
            w = {k: np.array(b.read(k)) * 1.5 for k in stored}
            b.write(b.prepare([WeightWrite(k, None, v) for k, v in w.items()]))
            b.wait_settled(30)
            for init in model.graph.initializer:
                if init.name in w:
                    init.CopyFrom(numpy_helper.from_array(w[init.name], init.name))
            want = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
                None, x
            )[0]
            np.testing.assert_allclose(b.run(x)["y"], want, rtol=1e-5, atol=1e-5)
            assert b.shares_weights and b._shared == {"fc.weight"}  # the MatMul weight prepacked in place
        finally:
            b.close()
            model = onnx.load(str(tmp_path / "c.onnx"))


def test_embedding_tables_are_fed_not_prepacked(embedder):
    b = OrtBackend(embedder, BackendOptions(strategy="rebuild"))
    try:
        mb = 4 / 2**20
        assert b.weights_mb == pytest.approx((VOCAB * DIM + DIM * OUT) * mb)
        assert b.packed_mb == pytest.approx(DIM * OUT * mb)  # the MatMul weight only
    finally:
        b.close()


def test_predicted_footprint_orders_the_strategies(embedder, tmp_path):
    b = OrtBackend(embedder, BackendOptions(strategy="bound"))
    try:
        pred = {s: b.predicted_mb(s) for s in STRATEGIES}
        assert b.predicted_mb() == pred["bound"]
        assert b.weights_mb < pred["bound"] < pred["rebuild"] < pred["hybrid"]
        assert pred["hybrid"] - pred["bound"] == pytest.approx(pred["rebuild"] - b.weights_mb)
        for s in STRATEGIES:  # from the file alone (path or bytes), the same; from ModelInfo, an upper bound
            assert OrtBackend.footprint_mb(embedder, s) == pytest.approx(pred[s])
            assert OrtBackend.footprint_mb(embedder.read_bytes(), s) == pytest.approx(pred[s])
            assert OrtBackend.footprint_mb(b.info, s) >= pred[s] - 1e-9
        assert b.measured_mb is None or isinstance(b.measured_mb, float)
        with pytest.raises(ConfigError, match="unknown onnxruntime strategy"):
            b.predicted_mb("turbo")
    finally:
        b.close()


@pytest.mark.parametrize(
    "budget,used,want",
    [(1000.0, 100.0, "hybrid"), (150.0, 60.0, "bound"), (139.0, 0.0, "bound"), (141.0, 0.0, "hybrid")],
)
def test_auto_strategy_by_memory_budget(budget, used, want):
    predicted = {"hybrid": 140.0, "bound": 90.0, "rebuild": 134.0}
    assert OrtBackend.choose_strategy(predicted, budget, used) == want


def test_no_strategy_fits_names_the_figures():
    with pytest.raises(ConfigError) as e:
        OrtBackend.choose_strategy({"hybrid": 140.0, "bound": 90.0}, 512.0, 450.0, "all-MiniLM-L6-v2")
    msg = str(e.value)
    for figure in ("512 MB", "450 MB", "hybrid 140 MB", "bound 90 MB", "all-MiniLM-L6-v2", "budgets.memory_mb"):
        assert figure in msg


def test_auto_with_a_budget_on_load(embedder):
    with OrtBackendCtx(embedder, BackendOptions(strategy="auto", memory_mb=1e6)) as b:
        assert b.strategy == "hybrid"
        lightest = b.predicted_mb("bound")
    under = lightest * 0.9  # below every strategy's prediction, whatever the footprint model
    with pytest.raises(ConfigError, match="no onnxruntime strategy fits the memory budget of"):
        OrtBackend(embedder, BackendOptions(strategy="auto", memory_mb=under))
    with pytest.raises(ConfigError, match=rf"strategy 'bound' would take [\d.]+ MB .* memory budget of {under:g} MB"):
        OrtBackend(embedder, BackendOptions(strategy="bound", memory_mb=under))  # an explicit one over it: refused too
    with OrtBackendCtx(embedder, BackendOptions(strategy="bound", memory_mb=lightest * 1.01)) as b:
        assert b.strategy == "bound"  # one that fits is not second-guessed


def test_graph_bytes_is_the_model_without_its_weights(embedder):
    with model_buffer(embedder) as (buf, _):
        small = onnx.load_model_from_string(graph_bytes(buf))
    full = onnx.load(str(embedder))
    assert not small.graph.initializer and len(small.SerializeToString()) < 2000
    assert [n.op_type for n in small.graph.node] == [n.op_type for n in full.graph.node]
    assert [i.name for i in small.graph.input] == ["ids"] and onnx_info(small) == onnx_info(full)


def test_unreadable_inputs_raise_format_errors(tmp_path):
    for i, data in enumerate((b"", b"\xff\xff\xff", b"\x3a\x05abc")):  # empty, bad varint, truncated graph field
        with pytest.raises(FormatError):
            OrtBackend(data, BackendOptions())
        (tmp_path / f"bad{i}.onnx").write_bytes(data)
        with pytest.raises(FormatError):
            OrtBackend(tmp_path / f"bad{i}.onnx", BackendOptions())
    with pytest.raises(FormatError, match="cannot read model file"):
        OrtBackend(tmp_path / "missing.onnx", BackendOptions())
    with pytest.raises(FormatError, match="it is a folder"):
        OrtBackend(tmp_path, BackendOptions())
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(FormatError, match="not a regular file"):  # and it does not hang
        OrtBackend(tmp_path / "fifo", BackendOptions())
    path = tmp_path / "mlp.onnx"
    make_mlp(path)
    data = path.read_bytes()
    with pytest.raises(FormatError):
        OrtBackend(data[: len(data) // 2], BackendOptions())


def test_rebuild_frees_the_stale_session_before_building():
    seen = []

    class Probe(ArenaBackend):
        name = "probe"
        STRATEGIES = ("rebuild",)
        FREE_STALE_BEFORE_BUILD = True

        def __init__(self):
            self._arena = np.zeros(4, np.float32)
            self._offset, self._slots, self._strategy = {"w": 0}, set(), "rebuild"
            self._init_rebuilds(BackendOptions())
            self._static = "fresh"

        def _build_fresh(self):
            seen.append(self._static)
            return "fresh"

        run = read = strategy = providers = None

    p = Probe()
    p.write(p.prepare([WeightWrite("w", np.array([1], np.int64), np.ones(1, np.float32))]))
    assert seen == [None] and p._static == "fresh"


class OrtBackendCtx:
    def __init__(self, *args):
        self.b = OrtBackend(*args)

    def __enter__(self):
        return self.b

    def __exit__(self, *exc):
        self.b.close()
