"""Types the weights' fingerprint cannot hash, checked where it hashes (Y20, after W20's review of U20): a float32
model with a bfloat16 scalar Constant cast to float (no weight) imports and runs again, in the main graph as in an If
body; QDQ inside a local function is "already quantized" again, not an INT4 initializer to convert; bfloat16, float8
and uint4 weights are told to export the model in float32 (the no-weights message first, as before U20), a dead one
to be removed; a data type no ONNX version defines is refused by name, not with onnx's KeyError."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto as T  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import ConfigError, FormatError  # noqa: E402
from edge.format.modelinfo import META_KEY  # noqa: E402
from edge.format.onnx_graph import quantized_ops  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from tests.device.test_elsewhere_onnx import _one_line  # noqa: E402

vi = helper.make_tensor_value_info
W = np.random.default_rng(20).standard_normal((16, 16)).astype(np.float32)
X = np.random.default_rng(21).standard_normal((2, 16)).astype(np.float32)
NO_WEIGHTS = "ONNX model 'm' has no float32 MatMul/Gemm/Conv/Gather weight initializers to adapt"
FLOAT32 = "export the model in float32 (model.float() before torch.onnx.export)"
TAKES = "(it takes float16/32/64, integers of 8-64 bits, bool, complex and strings)"
QUANTIZED = (
    "ONNX model 'm' is already quantized (DequantizeLinear): import the float model it was made from, then make its "
    "int8 twin with `edge quantize` (exporters.quantize_onnx), which records the integer weights' grids so adapters "
    "can write them"
)


def model(nodes, inits=(), inputs=(), opset=17, functions=()):
    """x [2, 16] float -> nodes -> y float."""
    graph = helper.make_graph(
        list(nodes), "g", [vi("x", T.FLOAT, [2, 16]), *inputs], [vi("y", T.FLOAT, [2, 16])], list(inits)
    )
    ops = [helper.make_opsetid("", opset), *(helper.make_opsetid(f.domain, 1) for f in functions[:1])]
    m = helper.make_model(graph, opset_imports=ops, functions=list(functions))
    m.ir_version = 10 if opset >= 21 else 8
    return m


def refused(tmp_path, capsys, m, error=FormatError) -> str:
    """The refusal of importing ``m`` (nothing written), the same in one CLI line (exit 2)."""
    src = tmp_path / "m.onnx"
    src.write_bytes(m.SerializeToString())
    with pytest.raises(error) as e:
        import_onnx(src, tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()
    assert _one_line(["import-onnx", str(src), "--out", str(tmp_path / "o.onnx")], capsys) == f"edge: error: {e.value}"
    return str(e.value)


def scaled(where: str):
    """y = (x @ w) * cast(bf16 0.5): the Constant in the main graph, or in the then-branch of an If."""
    half = helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", T.BFLOAT16, [], [0.5]))
    scale = [half, helper.make_node("Cast", ["c"], ["cf"], to=T.FLOAT), helper.make_node("Mul", ["a", "cf"], ["y"])]
    if where == "main":
        return model([helper.make_node("MatMul", ["x", "w"], ["a"]), *scale], [numpy_helper.from_array(W, "w")])
    body = helper.make_graph(scale[:2], "then", [], [vi("cf", T.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["one"], ["cf"])], "else", [], [vi("cf", T.FLOAT, None)])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("If", ["k"], ["s"], then_branch=body, else_branch=other),
        helper.make_node("Mul", ["a", "s"], ["y"]),
    ]
    inits = [numpy_helper.from_array(W, "w"), numpy_helper.from_array(np.array(1, np.float32), "one")]
    return model(nodes, inits, [vi("k", T.BOOL, [])])


@pytest.mark.parametrize("where", ["main", "body"])
def test_a_bfloat16_constant_that_is_no_weight_imports_and_runs(tmp_path, where):
    (tmp_path / "m.onnx").write_bytes(scaled(where).SerializeToString())
    report = import_onnx(tmp_path / "m.onnx", tmp_path / "o.onnx")
    assert list(report.info.tensors) == ["w"] and report.info.tensors["w"].transposed
    feeds = {"x": X, **({"k": np.array(True)} if where == "body" else {})}
    with Runtime(tmp_path / "o.onnx") as rt:
        np.testing.assert_allclose(rt.run(feeds)["y"], X @ W * 0.5, rtol=1e-5, atol=1e-5)


def function_qdq(const: bool):
    """An int4 DequantizeLinear + MatMul inside a local function, its weight an initializer passed in or a Constant."""
    w4 = helper.make_tensor("w4", T.INT4, [16, 16], np.clip(np.round(W * 4), -8, 7).astype(int).reshape(-1).tolist())
    scale = numpy_helper.from_array(np.array(0.25, np.float32), "s")
    body = [helper.make_node("DequantizeLinear", ["w", "sc"], ["wf"]), helper.make_node("MatMul", ["a", "wf"], ["b"])]
    if const:
        consts = [
            helper.make_node("Constant", [], ["w"], value=w4),
            helper.make_node("Constant", [], ["sc"], value=scale),
        ]
        f = helper.make_function("local", "QLin", ["a"], ["b"], consts + body, [helper.make_opsetid("", 21)])
        return model([helper.make_node("QLin", ["x"], ["y"], domain="local")], opset=21, functions=[f])
    f = helper.make_function("local", "QLin", ["a", "w", "sc"], ["b"], body, [helper.make_opsetid("", 21)])
    call = helper.make_node("QLin", ["x", "w4", "s"], ["y"], domain="local")
    return model([call], [w4, scale], opset=21, functions=[f])


@pytest.mark.parametrize("const", [False, True], ids=["initializer", "constant"])
def test_qdq_inside_a_local_function_is_already_quantized(tmp_path, capsys, const):
    m = function_qdq(const)
    assert quantized_ops(m.graph) == [] and quantized_ops(m.graph, m.functions) == ["DequantizeLinear"]
    assert refused(tmp_path, capsys, m, ConfigError) == QUANTIZED


def test_qdq_inside_a_local_function_of_a_file_with_foreign_metadata_is_already_quantized(tmp_path, capsys):
    (tmp_path / "f.onnx").write_bytes(scaled("main").SerializeToString())
    import_onnx(tmp_path / "f.onnx", tmp_path / "f_o.onnx")  # this project's record (no float fingerprint)
    meta = next(p.value for p in onnx.load(tmp_path / "f_o.onnx").metadata_props if p.key == META_KEY)
    m = function_qdq(False)
    m.metadata_props.add(key=META_KEY, value=meta)
    assert refused(tmp_path, capsys, m, ConfigError) == QUANTIZED


def bf16_weight():
    """torch's model.to(torch.bfloat16) export: x cast to bf16, MatMul with a bf16 weight, cast back."""
    w = helper.make_tensor("w", T.BFLOAT16, [16, 16], W.reshape(-1).tolist())
    nodes = [
        helper.make_node("Cast", ["x"], ["xb"], to=T.BFLOAT16),
        helper.make_node("MatMul", ["xb", "w"], ["yb"]),
        helper.make_node("Cast", ["yb"], ["y"], to=T.FLOAT),
    ]
    return model(nodes, [w])


def cast_weight(kind: int, name: str, opset: int, *, fp32: bool = False):
    """A weight stored as ``kind`` (float8, uint4: weight-only storage), cast to float, read by MatMul; with
    ``fp32``, followed by a float32 Linear (a target, so the check before the fingerprint speaks)."""
    values = np.clip(np.round(W * 4) + 8, 0, 15) if kind == T.UINT4 else W
    w = helper.make_tensor(name, kind, [16, 16], values.reshape(-1).tolist())
    nodes = [helper.make_node("Cast", [name], ["wf"], to=T.FLOAT), helper.make_node("MatMul", ["x", "wf"], ["h"])]
    nodes += [helper.make_node("MatMul", ["h", "w2"], ["y"])] if fp32 else [helper.make_node("Identity", ["h"], ["y"])]
    return model(nodes, [w, *([numpy_helper.from_array(W, "w2")] if fp32 else [])], opset=opset)


def test_a_bfloat16_model_is_told_to_export_in_float32_as_before(tmp_path, capsys):
    skipped = "(1 skipped: {'w': 'stored as bfloat16 (only float32 weights are adapted)'})"
    assert refused(tmp_path, capsys, bf16_weight(), ConfigError) == (
        f"{NO_WEIGHTS} {skipped}; its weights are bfloat16: {FLOAT32}"
    )


@pytest.mark.parametrize(
    "kind,name,opset,dtype", [(T.FLOAT8E4M3FN, "w8", 19, "float8_e4m3fn"), (T.UINT4, "w4u", 21, "uint4")]
)
def test_float8_and_uint4_weights_are_told_to_export_in_float32(tmp_path, capsys, kind, name, opset, dtype):
    msg = refused(tmp_path, capsys, cast_weight(kind, name, opset), ConfigError)
    assert msg == f"{NO_WEIGHTS}; its weights are {dtype}: {FLOAT32}"
    msg = refused(tmp_path, capsys, cast_weight(kind, name, opset, fp32=True))  # a float32 target beside it
    assert msg == (
        f"ONNX model 'm': initializer {name!r} of dims [16, 16] is of ONNX data type {T.DataType.Name(kind)}, which "
        f"edge cannot store or fingerprint {TAKES}; {FLOAT32}"
    )


def test_a_dead_bfloat16_initializer_is_said_to_be_dead(tmp_path, capsys):
    dead = helper.make_tensor("dead_bf16", T.BFLOAT16, [4], [1.0, 2.0, 3.0, 4.0])
    m = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(W, "w"), dead])
    assert refused(tmp_path, capsys, m) == (
        f"ONNX model 'm': initializer 'dead_bf16' of dims [4] is of ONNX data type BFLOAT16, which edge cannot store "
        f"or fingerprint {TAKES}; it is used by no node: remove it, or export the model again"
    )


def test_a_data_type_no_onnx_defines_is_refused_by_name(tmp_path, capsys):
    m = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(W, "w")])
    odd = m.graph.initializer.add(name="odd", data_type=99, dims=[4], raw_data=b"\0" * 16)
    assert odd.data_type == 99
    assert refused(tmp_path, capsys, m) == (
        "ONNX model 'm': initializer 'odd' of dims [4] is of ONNX data type 99, which no ONNX version defines, so "
        f"edge cannot read it {TAKES}: the file is damaged or was written wrongly; export the model again"
    )


def test_a_float16_initializer_beside_float32_weights_imports_and_loads(tmp_path):
    """Why the load's refusal still offers float16: such a tensor is stored, fingerprinted and loads."""
    b = numpy_helper.from_array(np.arange(16, dtype=np.float16), "b16")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("Cast", ["b16"], ["bf"], to=T.FLOAT),
        helper.make_node("Add", ["a", "bf"], ["y"]),
    ]
    (tmp_path / "m.onnx").write_bytes(model(nodes, [numpy_helper.from_array(W, "w"), b]).SerializeToString())
    assert list(import_onnx(tmp_path / "m.onnx", tmp_path / "o.onnx").info.tensors) == ["w"]
    with Runtime(tmp_path / "o.onnx") as rt:
        np.testing.assert_allclose(rt.run({"x": X})["y"], X @ W + np.arange(16), rtol=1e-5, atol=1e-4)
