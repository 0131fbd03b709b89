"""Sparse tensors of a hostile ONNX file: a decompression bomb is refused at import before anything is allocated.

Before: each ``sparse_initializer`` was checked alone against protobuf's 2 GB, the rest of the model not counted (a
sparse tensor of 2 GiB - 4 MiB dense beside 16 MB of weights was allocated, though the file it went into could not
be written; 257 of 8 MiB each passed one by one and allocated 2 GiB together), and sparse tensors inside If/Loop/Scan
bodies were left for onnxruntime to densify at load, unchecked. Now every sparse tensor of the file (bodies too) is
checked from its header, and their dense sizes summed with the rest of the model against protobuf's limit on the one
file edge writes, before any allocation.
"""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.convert.onnx_source import PROTOBUF_LIMIT  # noqa: E402
from edge.errors import FormatError  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from tests.device.test_elsewhere_onnx import _one_line  # noqa: E402

RNG = np.random.default_rng(19)
W1 = RNG.standard_normal((8, 6)).astype(np.float32)
W2 = RNG.standard_normal((6, 3)).astype(np.float32)


def _sparse(name: str, dims, idx, values=None, idx_type=None):
    values = np.ones(len(idx), np.float32) if values is None else values
    indices = numpy_helper.from_array(np.asarray(idx, np.int64), "")
    if idx_type is not None:
        indices.data_type = idx_type
    return helper.make_sparse_tensor(numpy_helper.from_array(values, name), indices, list(dims))


def mlp(body_const=None) -> onnx.ModelProto:
    """y = relu(x @ w1) @ w2, optionally times an If branch's Constant (both branches read ``body_const``)."""
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"])]
    if body_const is not None:
        branches = []
        for k in ("then", "else"):
            const = helper.make_node("Constant", [], [f"c_{k}"], sparse_value=body_const)
            mul = helper.make_node("Mul", ["r", f"c_{k}"], [f"o_{k}"])
            branches.append(helper.make_graph([const, mul], k, [], [vi(f"o_{k}", TensorProto.FLOAT, None)]))
        nodes += [
            helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "cond")),
            helper.make_node("If", ["cond"], ["b"], then_branch=branches[0], else_branch=branches[1]),
            helper.make_node("MatMul", ["b", "w2"], ["y"]),
        ]
    else:
        nodes.append(helper.make_node("MatMul", ["r", "w2"], ["y"]))
    inits = [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(W2, "w2")]
    graph = helper.make_graph(
        nodes, "g", [vi("x", TensorProto.FLOAT, ["n", 8])], [vi("y", TensorProto.FLOAT, ["n", 3])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _save(model, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    return src


def _refused_small(src, out, match):
    """The import raises FormatError matching ``match`` having allocated under 64 MB on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=match) as e:
            import_onnx(src, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak  # numpy's allocations are traced: nothing dense was made
    assert not out.exists()
    return str(e.value)


def test_a_tiny_file_declaring_two_gib_dense_is_refused_before_allocating(tmp_path, capsys):
    """Refused before too (as a ConfigError): now a FormatError naming its dense size, the total and the limit."""
    model = mlp()
    model.graph.sparse_initializer.append(_sparse("bomb", [65536, 8192], [5]))
    src = _save(model, tmp_path)
    assert src.stat().st_size < 1000
    msg = _refused_small(src, tmp_path / "o.onnx", "sparse tensor 'bomb' of dims")
    assert "[65536, 8192] is 2,147,483,648 bytes stored dense" in msg
    assert f"over protobuf's 2 GB limit ({PROTOBUF_LIMIT:,} bytes)" in msg and "export the model" in msg
    line = _one_line(["import-onnx", str(src), "--out", str(tmp_path / "o.onnx")], capsys)
    assert "'bomb' of dims [65536, 8192] is 2,147,483,648 bytes" in line


def test_a_sparse_tensor_under_the_limit_alone_is_refused_with_the_models_other_bytes(tmp_path, capsys):
    model = mlp()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1 << 22, np.float32), "dense16mb"))
    model.graph.sparse_initializer.append(_sparse("big", [(1 << 29) - (1 << 20)], [7]))
    src = _save(model, tmp_path)
    msg = _refused_small(src, tmp_path / "o.onnx", re.escape(f"sparse tensor 'big' of dims [{(1 << 29) - (1 << 20)}]"))
    assert (
        "is 2,143,289,344 bytes stored dense (1 sparse tensor(s): 2,143,289,344 bytes dense, with the model's " in msg
    )
    assert int(re.search(r"model's other ([\d,]+) bytes", msg)[1].replace(",", "")) > 1 << 24
    _one_line(["import-onnx", str(src), "--out", str(tmp_path / "o.onnx")], capsys)


def test_many_sparse_tensors_each_under_the_limit_are_summed(tmp_path, capsys):
    """257 of 8 MiB each: every one passed the old per-tensor check, 2,156 MB allocated together; now refused."""
    model = mlp()
    for i in range(257):
        model.graph.sparse_initializer.append(_sparse(f"s{i}", [2048, 1024], [i]))
    src = _save(model, tmp_path)
    msg = _refused_small(src, tmp_path / "o.onnx", "is 8,388,608 bytes stored dense")
    assert re.search(r"\(257 sparse tensor\(s\): 2,155,872,256 bytes dense, with the model's other [\d,]+ bytes\)", msg)
    line = _one_line(["import-onnx", str(src), "--out", str(tmp_path / "o.onnx")], capsys)
    assert "257 sparse tensor(s)" in line


def test_a_bomb_in_an_if_body_constant_is_refused_too(tmp_path, capsys):
    """A Constant's sparse_value inside an If branch: left sparse before (onnxruntime densified it at load)."""
    src = _save(mlp(_sparse("c", [1 << 20, 1 << 20], [0])), tmp_path)
    msg = _refused_small(src, tmp_path / "o.onnx", r"sparse tensor 'c' of dims \[1048576, 1048576\]")
    assert "4,398,046,511,104 bytes stored dense" in msg
    _one_line(["import-onnx", str(src), "--out", str(tmp_path / "o.onnx")], capsys)


def test_sparse_tensors_in_bodies_are_stored_dense_and_the_model_runs_the_same(tmp_path):
    """A body's sparse Constant and a body's sparse_initializer: dense in the file written, outputs unchanged."""
    scale = np.zeros(6, np.float32)
    scale[[1, 4]] = [2.0, -3.0]
    model = mlp(_sparse("c", [6], [1, 4], np.array([2.0, -3.0], np.float32)))
    then = model.graph.node[3].attribute[0].g  # a body sparse_initializer too, read by its Mul
    then.node[1].input[1] = "k"
    then.sparse_initializer.append(_sparse("k", [6], [1, 4], np.array([2.0, -3.0], np.float32)))
    src = _save(model, tmp_path)
    import_onnx(src, tmp_path / "o.onnx")
    out = onnx.load(tmp_path / "o.onnx")
    for g in (out.graph, *(a.g for n in out.graph.node for a in n.attribute if a.type == a.GRAPH)):
        assert len(g.sparse_initializer) == 0
        assert not any(a.name == "sparse_value" for n in g.node for a in n.attribute)
    assert "k" in {t.name for t in out.graph.initializer}  # hoisted from the body: in the fingerprint
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    with Runtime(tmp_path / "o.onnx") as rt:
        np.testing.assert_allclose(rt.run({"x": x})["y"], (np.maximum(x @ W1, 0) * scale) @ W2, rtol=1e-5, atol=1e-5)


BAD = {
    "negative dim": (lambda: _sparse("s", [-4, 3], [0]), "declares dims [-4, 3]: a negative dimension"),
    "float indices": (
        lambda: _sparse("s", [4, 3], [0], idx_type=TensorProto.FLOAT),
        "its indices are of ONNX data type 1, not an integer type",
    ),
    "values and indices disagree": (
        lambda: _sparse("s", [4, 3], [0, 1, 2], np.ones(2, np.float32)),
        "2 values but indices of shape [3]",
    ),
    "index past the end": (lambda: _sparse("s", [4, 3], [0, 12]), "an index is outside its 12 elements"),
    "negative index": (lambda: _sparse("s", [4, 3], [-1]), "an index is outside its 12 elements"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_sparse_header_that_lies_is_refused_in_one_line(tmp_path, case, capsys):
    make, match = BAD[case]
    model = mlp()
    model.graph.sparse_initializer.append(make())
    src = _save(model, tmp_path)
    _refused_small(src, tmp_path / "o.onnx", re.escape(match))
    assert match in _one_line(["import-onnx", str(src), "--out", str(tmp_path / "o.onnx")], capsys)
