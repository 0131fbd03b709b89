"""Review of this session's commits (69061e6, 8bb3242, f2d398b): what each landed change got wrong, each test
failing on the code it reviewed.

- ``edge import-onnx``: a MatMul weight that a Gather also reads along its columns was a target before 69061e6; then
  the whole model was refused ("no weights to adapt"), and a Gather on axis -2 (the rows) was said not to read rows.
- ``runtimes.onnx_quant``: an ``edge quantize`` dynamic twin whose integer product is multiplied by another scale than
  its weight's (a rewired graph the fingerprint does not see) loaded, adapters then written on the wrong grid; a
  target no node reads (its DequantizeLinear rewired to a Constant copy) loaded under ``bound``.
- ``edge profile``: the suffix given to an adapter whose name is taken could be the name of one held, which was then
  replaced without a word (the report listed one name twice; the held total left one adapter out).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import _tiny
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import FormatError  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

RNG = np.random.default_rng(11)


def _save(path: Path, nodes, inits: dict, ins, outs) -> Path:
    tensors = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    model = helper.make_model(
        helper.make_graph(nodes, "g", ins, outs, tensors), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_review_e11_a_matmul_weight_also_gathered_on_columns_stays_a_target(tmp_path):
    """Before 69061e6 the Gather on axis 1 was passed over and the MatMul's weight was adapted (an adapter writes the
    weight in place, so the Gather reads the adapted columns too); now the raise lands in ``skipped``, which drops the
    weight from the targets, and this model has no target left."""
    w = RNG.standard_normal((16, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Gather", ["w", "cols"], ["g"], axis=1)]
    ins = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16]),
        helper.make_tensor_value_info("cols", TensorProto.INT64, [3]),
    ]
    outs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16]),
        helper.make_tensor_value_info("g", TensorProto.FLOAT, [16, 3]),
    ]
    src = _save(tmp_path / "both.onnx", nodes, {"w": w}, ins, outs)
    report = import_onnx(src, tmp_path / "both.edge.onnx")
    assert [t.initializer for t in report.info.tensors.values()] == ["w"]


def test_review_e11_a_gather_on_axis_minus_two_reads_the_rows(tmp_path):
    """Axis -2 of a 2-D table is axis 0: its rows, an embedding lookup. It is skipped with a message saying it does
    not read the rows ("gathered on axis -2 ... only the rows of a 2-D embedding table are adapted")."""
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"], axis=-2), helper.make_node("MatMul", ["e", "fc"], ["y"])]
    inits = {
        "emb": RNG.standard_normal((50, 16)).astype(np.float32),
        "fc": RNG.standard_normal((16, 4)).astype(np.float32),
    }
    ins = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])]
    report = import_onnx(_save(tmp_path / "neg.onnx", nodes, inits, ins, outs), tmp_path / "neg.edge.onnx")
    assert "emb" not in report.skipped
    assert sorted(t.initializer for t in report.info.tensors.values()) == ["emb", "fc"]


def test_review_e11_an_integer_product_scaled_by_another_weights_scale_is_refused(tmp_path):
    """``check_quant_readers`` accepts a ConvInteger/MatMulInteger reader when *some* Mul anywhere reads the weight's
    scale. Rewire a dynamic twin so the MatMulInteger's product is multiplied by the conv's scale product instead of
    its own (a node edit: no initializer changes, the fingerprint matches) and it loads; a float adapter on ``fc.w``
    is then requantized with the metadata's scale while the graph applies another."""
    from exporters.quantize import quantize_onnx

    spec = importlib.util.spec_from_file_location("_qe", Path(__file__).with_name("test_quant_elsewhere.py"))
    qe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qe)
    onnx.save(qe._cnn(), tmp_path / "f.onnx")
    import_onnx(tmp_path / "f.onnx", tmp_path / "fe.onnx")
    quantize_onnx(tmp_path / "fe.onnx", tmp_path / "q.onnx", mode="dynamic", check={"x": qe.X})
    Runtime(tmp_path / "q.onnx").close()  # as written, it loads
    model = onnx.load(str(tmp_path / "q.onnx"))
    users = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    matmul = next(n for n in model.graph.node if n.op_type == "MatMulInteger" and n.input[1] == "fc.w_quantized")
    cast = users[matmul.output[0]][0]
    scale_mul = users[cast.output[0]][0]  # Mul(product, x_scale * fc.w_scale)
    conv_scales = next(n for n in users["conv.w_scale"] if n.op_type == "Mul")  # x_scale * conv.w_scale
    other = next(i for i in scale_mul.input if i != cast.output[0])
    scale_mul.input[list(scale_mul.input).index(other)] = conv_scales.output[0]  # fc.w_scale's Mul now feeds nothing
    onnx.save(model, str(tmp_path / "bad.onnx"))
    for strategy in ("bound", "hybrid", "rebuild"):
        with pytest.raises(FormatError, match="fc.w"):
            Runtime(tmp_path / "bad.onnx", strategy=strategy).close()


def _adapter(info, seed: int, name: str) -> Adapter:
    rng = np.random.default_rng(seed)
    tensors, shapes = {}, {}
    for k, t in info.tensors.items():
        size = int(np.prod(t.shape))
        flat = np.sort(rng.choice(size, max(2, size // 10), replace=False))
        idx = np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)
        tensors[k], shapes[k] = SparseDelta(idx, (rng.standard_normal(flat.size) * 1e-2).astype(np.float32)), t.shape
    return Adapter(name, info.fingerprint, tensors, shapes)


def test_review_e11_profile_never_replaces_a_held_adapter(tmp_path):
    """``edge profile`` keeps every adapter loaded; a name taken gets ``#<count>``, which may be the name an earlier
    file carries: ``load_adapter`` then replaces that one (its figures stay in the report, its bytes leave the held
    total the budget is checked against)."""
    from edge.fusion import held_bytes
    from edge.profiling import ProfileConfig, profile_model

    info = _tiny.make_mlp(tmp_path / "m.onnx", sizes=(10, 64, 3))
    _adapter(info, 7, "a#2").save(tmp_path / "c.safetensors")
    _adapter(info, 1, "a").save(tmp_path / "a.safetensors")
    files = [tmp_path / "c.safetensors", tmp_path / "a.safetensors", tmp_path / "a.safetensors"]
    config = ProfileConfig(runs=3, warmup=1, switches=1, progress=False, engine_runs=0)
    r = profile_model(tmp_path / "m.onnx", "x86-dev", adapters=files, backend="onnxruntime", config=config)
    names = [x["name"] for x in r["adapters"]]
    assert len(set(names)) == 3, names
    with Runtime(tmp_path / "m.onnx", backend="onnxruntime") as rt:
        for f, n in zip(files, names, strict=True):
            rt.load_adapter(f, name=n)
        together = rt.footprint["adapters_mb"] * 2**20  # the data (held_bytes) and the objects holding it
        assert together > sum(held_bytes(rt._adapters.values()))
    assert r["memory"]["adapters_mb"] * 2**20 == together


def test_review_e11_a_target_no_node_reads_is_refused(tmp_path):
    """The fingerprint covers initializers, not nodes: a QDQ twin rewired so its DequantizeLinear reads a Constant
    node holding the same integers (not an initializer: the fingerprint matches) leaves the target with no reader.
    With strategy bound it loads, and every adapter on it is written where nothing reads it (a switch changes no
    output); hybrid and rebuild fail with onnxruntime's own untyped error ("Failed to find existing initializer")."""
    from exporters.quantize import quantize_onnx

    spec = importlib.util.spec_from_file_location("_qe", Path(__file__).with_name("test_quant_elsewhere.py"))
    qe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qe)
    onnx.save(qe._cnn(), tmp_path / "f.onnx")
    import_onnx(tmp_path / "f.onnx", tmp_path / "fe.onnx")
    quantize_onnx(tmp_path / "fe.onnx", tmp_path / "q.onnx", mode="static", calib={"x": qe.X})
    model = onnx.load(str(tmp_path / "q.onnx"))
    dq = qe._dq_of(model, "fc.w_quantized")
    ints = next(t for t in model.graph.initializer if t.name == "fc.w_quantized")
    copy = numpy_helper.from_array(numpy_helper.to_array(ints), "fc.w_copy")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["fc.w_copy"], value=copy))
    dq.input[0] = "fc.w_copy"
    onnx.save(model, str(tmp_path / "bad.onnx"))
    for strategy in ("bound", "hybrid", "rebuild"):
        with pytest.raises(FormatError, match="fc.w"):
            Runtime(tmp_path / "bad.onnx", strategy=strategy).close()
