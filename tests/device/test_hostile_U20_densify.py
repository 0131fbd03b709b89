"""Tensors edge import-onnx cannot store, refused by name and type before anything is allocated (before U20: sparse
STRING values crashed in the densifier with NotImplementedError and were sized at 8 bytes a string; BFLOAT16 and INT4
tensors, sparse or dense, crashed the weights' fingerprint: "cannot include dtype 'E' in a buffer"; the runtime's load
of a file holding one crashed the same way); numpy numbers taken as ``max_dense_mb``; a sparse initializer's name
given twice said as what it is."""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import FormatError  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from tests.device.test_elsewhere_onnx import _one_line  # noqa: E402

vi = helper.make_tensor_value_info
RNG = np.random.default_rng(20)
W1 = RNG.standard_normal((8, 6)).astype(np.float32)
MB = 1 << 20


def mlp(nodes=(), outs=(), sparse=(), inits=()):
    """y = relu(x @ w1), with extra nodes, outputs (of ``outs``' types), sparse and dense initializers."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["y"]), *nodes],
        "g",
        [vi("x", TensorProto.FLOAT, ["n", 8])],
        [vi("y", TensorProto.FLOAT, ["n", 6]), *(vi(o, t, None) for o, t in outs)],
        [numpy_helper.from_array(W1, "w1"), *inits],
        sparse_initializer=list(sparse),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def sparse(values, dims, name="s"):
    indices = numpy_helper.from_array(np.zeros(values.dims[0], np.int64), "")
    return helper.make_sparse_tensor(values, indices, list(dims))


def _refused(tmp_path, model, match, capsys):
    """import_onnx raises FormatError matching ``match`` having allocated under 16 MB, writes nothing, and the CLI
    says it in one line (exit 2); return the message."""
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=re.escape(match)) as e:
            import_onnx(src, tmp_path / "o.onnx")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MB, peak
    assert not (tmp_path / "o.onnx").exists()
    line = _one_line(["import-onnx", str(src), "--out", str(tmp_path / "o.onnx")], capsys)
    assert match in line
    return str(e.value)


@pytest.mark.parametrize("n", [10, 4_000_000])
def test_sparse_strings_are_refused_before_allocation(tmp_path, capsys, n):
    values = helper.make_tensor("s", TensorProto.STRING, [1], [b"a"])
    model = mlp([helper.make_node("Identity", ["s"], ["so"])], [("so", TensorProto.STRING)], [sparse(values, [n])])
    msg = _refused(tmp_path, model, "sparse tensor 's' has values of ONNX data type STRING", capsys)
    assert "edge stores sparse tensors of numbers only" in msg and "export the model with this tensor dense" in msg


@pytest.mark.parametrize("kind", [TensorProto.BFLOAT16, TensorProto.INT4, TensorProto.FLOAT8E5M2])
def test_sparse_values_numpy_has_no_buffer_for_are_refused(tmp_path, capsys, kind):
    values = helper.make_tensor("s", kind, [1], [1])
    model = mlp([helper.make_node("Identity", ["s"], ["so"])], [("so", kind)], [sparse(values, [4_000_000])])
    name = TensorProto.DataType.Name(kind)
    msg = _refused(tmp_path, model, f"sparse tensor 's' has values of ONNX data type {name}", capsys)
    assert msg.endswith("export the model with this tensor dense, in float32")


TAKES = "(it takes float16/32/64, integers of 8-64 bits, bool, complex and strings)"
FLOAT32 = "export the model in float32 (model.float() before torch.onnx.export)"


WHERE = ["initializer", "body initializer", "dead initializer"]
CASES = [(w, k) for w in WHERE for k in (TensorProto.BFLOAT16, TensorProto.INT4)] + [("weight constant", 16)]


@pytest.mark.parametrize("where,kind", CASES)
def test_dense_tensors_the_fingerprint_cannot_hash_are_refused_by_name_and_type(tmp_path, capsys, where, kind):
    """What the fingerprint hashes (the initializers, a body's hoisted, a Constant hoisted as a weight) is checked
    once the import found its weights: a dead one is said to be dead, a used one to be exported in float32."""
    t = helper.make_tensor("s", kind, [4], [1, 2, 3, 4])
    name = TensorProto.DataType.Name(kind)
    how = FLOAT32
    if where == "initializer":
        model = mlp([helper.make_node("Identity", ["s"], ["so"])], [("so", kind)], inits=[t])
    elif where == "dead initializer":
        model, how = mlp(inits=[t]), "it is used by no node: remove it, or export the model again"
    elif where == "weight constant":  # Constant -> Cast -> MatMul: hoisted into an initializer (a float one)
        t = helper.make_tensor("c", kind, [6, 4], np.ones(24).tolist())
        cast = helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT)
        nodes = [
            helper.make_node("Constant", [], ["s"], value=t),
            cast,
            helper.make_node("MatMul", ["y", "sf"], ["so"]),
        ]
        model = mlp(nodes, [("so", TensorProto.FLOAT)])
    else:
        body = helper.make_graph([helper.make_node("Identity", ["s"], ["o"])], "b", [], [vi("o", kind, None)], [t])
        cond = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True), ""))
        model = mlp([cond, helper.make_node("If", ["c"], ["so"], then_branch=body, else_branch=body)], [("so", kind)])
    dims = [6, 4] if where == "weight constant" else [4]
    msg = _refused(tmp_path, model, f"initializer 's' of dims {dims} is of ONNX data type {name}", capsys)
    assert msg == (
        f"ONNX model 'm': initializer 's' of dims {dims} is of ONNX data type {name}, which edge cannot store or "
        f"fingerprint {TAKES}; {how}"
    )


def test_the_runtime_refuses_such_a_file_instead_of_crashing(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(mlp().SerializeToString())
    import_onnx(src, tmp_path / "o.onnx")
    with Runtime(tmp_path / "o.onnx") as rt:
        assert rt.run({"x": np.ones((1, 8), np.float32)})["y"].shape == (1, 6)
    m = onnx.load(tmp_path / "o.onnx")
    m.graph.initializer.append(helper.make_tensor("s", TensorProto.BFLOAT16, [4], [1.0, 2, 3, 4]))
    m.graph.node.append(helper.make_node("Identity", ["s"], ["so"]))
    m.graph.output.append(vi("so", TensorProto.BFLOAT16, None))
    (tmp_path / "bad.onnx").write_bytes(m.SerializeToString())
    with pytest.raises(FormatError) as e:
        Runtime(tmp_path / "bad.onnx")
    assert str(e.value) == (  # at load float16 is right: a float16 initializer is stored, fingerprinted and loads
        f"model 'm': initializer 's' of dims [4] is of ONNX data type BFLOAT16, which edge cannot store or fingerprint "
        f"{TAKES}; convert it to float32 or float16 (or int8 with edge quantize) and export the model again"
    )


def test_numpy_numbers_are_a_cap_and_complex_sparse_values_still_import(tmp_path):
    values = numpy_helper.from_array(np.array([1 + 2j], np.complex64), "s")
    model = mlp([helper.make_node("Identity", ["s"], ["so"])], [("so", TensorProto.COMPLEX64)], [sparse(values, [5])])
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    for i, cap in enumerate((np.int64(512), np.float32(512), np.float64(0.5))):
        import_onnx(tmp_path / "m.onnx", tmp_path / f"o{i}.onnx", max_dense_mb=cap)
        s = next(t for t in onnx.load(tmp_path / f"o{i}.onnx").graph.initializer if t.name == "s")
        assert numpy_helper.to_array(s).tolist() == [1 + 2j, 0, 0, 0, 0]


@pytest.mark.parametrize("dense", [False, True])
def test_a_name_given_twice_says_what_it_names(tmp_path, capsys, dense):
    one = numpy_helper.from_array(np.ones(1, np.float32), "dup")
    inits = [numpy_helper.from_array(np.ones(4, np.float32), "dup")] if dense else []
    model = mlp(
        [helper.make_node("Identity", ["dup"], ["so"])],
        [("so", TensorProto.FLOAT)],
        [sparse(one, [4])] * (1 if dense else 2),
        inits,
    )
    said = "a sparse initializer and a dense one" if dense else "two sparse initializers"
    msg = _refused(tmp_path, model, f"'dup' names {said}", capsys)
    assert "each tensor of a model needs a name of its own" in msg and "both an initializer" not in msg
