"""Audit F14: ONNX files other toolchains write, through `edge import-onnx` and on to `edge quantize`.

A hand-written IR 3 graph (initializers listed as inputs, a Conv with its BatchNormalization unfused, Gemm with
transB=0, MatMul + Add, weights in Constant nodes, an int64 shape tensor) and recurrent heads (GRU, LSTM) as both
torch exporters write them.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.runtime import Runtime  # noqa: E402


def _old_toolchain_file(path, ir: int = 3, opset: int = 11) -> None:
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
    inits = {
        "W1": f32(4, 1, 3, 3),
        "B1": f32(4),
        "g": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "b": f32(4),
        "mu": f32(4),
        "var": rng.uniform(0.5, 2, 4).astype(np.float32),
        "G": f32(4 * 4 * 4, 8),  # Gemm transB=0 stores [in, out]
        "GB": f32(8),
        "MB": f32(3),
        "shape": np.array([-1, 64], np.int64),
    }
    nodes = [
        helper.make_node("Constant", [], ["M"], value=numpy_helper.from_array(f32(8, 3), "Mv")),  # a weight as a node
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "mu", "var"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p1", "shape"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "G", "GB"], ["d1"], transB=0, name="fc1"),
        helper.make_node("Relu", ["d1"], ["r2"]),
        helper.make_node("MatMul", ["r2", "M"], ["mm"], name="fc2"),
        helper.make_node("Add", ["mm", "MB"], ["logits"], name="fc2_bias"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])]
    inputs += [  # IR < 4: every initializer is also a graph input
        helper.make_tensor_value_info(k, TensorProto.INT64 if v.dtype == np.int64 else TensorProto.FLOAT, v.shape)
        for k, v in inits.items()
    ]
    graph = helper.make_graph(
        nodes,
        "old",
        inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="old-toolchain")
    model.ir_version = ir
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_an_ir3_file_imports_to_a_valid_file_that_edge_quantize_takes(tmp_path):
    """The import took the weights off the inputs but kept IR 3, which requires them there: onnx's checker refused
    the file, and `edge quantize` with it ("W1 in initializer but not in graph input")."""
    from exporters.quantize import quantize_onnx

    src, out = tmp_path / "old.onnx", tmp_path / "old.edge.onnx"
    _old_toolchain_file(src)
    report = import_onnx(src, out)
    assert sorted(report.info.tensors) == ["G", "M", "W1"] and report.info.tensors["G"].transposed
    proto = onnx.load(str(out))
    assert [v.name for v in proto.graph.input] == ["x"] and proto.ir_version >= 4
    onnx.checker.check_model(proto)  # raised ValidationError on the old code
    x = np.random.default_rng(1).random((4, 1, 8, 8), dtype=np.float32)
    q = quantize_onnx(out, tmp_path / "old-int8.onnx", check={"x": x})
    assert set(q.quantized) == {"G", "M", "W1"}
    with Runtime(tmp_path / "old-int8.onnx") as rt:  # the twin runs, and a float adapter lands on its integers
        y0 = rt.run({"x": x})["logits"]
        idx = np.array([[0, 1], [2, 5]], np.int32)
        rt.load_adapter(
            Adapter("a", report.info.fingerprint, {"G": SparseDelta(idx, np.float32([0.5, -0.5]))}, {"G": (8, 64)}),
            clip=True,
        )
        before = rt.weights("G")
        rt.switch("a")
        assert not np.array_equal(rt.weights("G"), before)
        rt.switch(None)
        assert rt.weights("G").tobytes() == before.tobytes()
        np.testing.assert_array_equal(rt.run({"x": x})["logits"], y0)


class _Recurrent:
    """conv features read as a sequence by a GRU or an LSTM, then a Linear: a CRNN's head."""

    @staticmethod
    def make(kind: str):
        import torch
        from torch import nn

        class CRNN(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv2d(1, 4, 3, padding=1)
                self.rnn = getattr(nn, kind)(4 * 4, 5, batch_first=True)
                self.fc = nn.Linear(5, 3)

            def forward(self, x):
                h = self.conv(x)  # [B, 4, 4, W]
                b, c, hh, w = h.shape
                out, _ = self.rnn(h.permute(0, 3, 1, 2).reshape(b, w, c * hh))
                return self.fc(out.mean(1))

        torch.manual_seed(0)
        return CRNN().eval()


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_recurrent_weights_are_said_not_targets(tmp_path, kind, dynamo):
    """A CRNN's GRU/LSTM weights were neither targets nor listed in `skipped`: left out without a word."""
    torch = pytest.importorskip("torch")
    model, x = _Recurrent.make(kind), torch.rand(2, 1, 4, 6)
    src = tmp_path / "crnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(opset_version=18) if dynamo else dict(opset_version=17, dynamic_axes={"x": {0: "b"}})
        torch.onnx.export(model, (x,), str(src), dynamo=dynamo, input_names=["x"], output_names=["y"], **kw)
    rnn = next(n for n in onnx.load(str(src)).graph.node if n.op_type == kind)
    report = import_onnx(src, tmp_path / "crnn.edge.onnx")
    assert len(report.info.tensors) == 2  # the conv filter and the Linear
    said = {k: v for k, v in report.skipped.items() if "recurrent weights" in v}
    assert set(said) == set(rnn.input[1:4]), report.skipped  # W, R and B
    assert all(kind in v and "not adapted" in v for v in said.values())


def test_edge_quantize_on_a_file_imported_as_ir3_says_to_import_again(tmp_path, capsys):
    """A file an older `edge import-onnx` wrote (IR 3, weights off the inputs): `edge quantize` said only that it is
    not a valid ONNX model; it now says what to do, and doing it gives the same fingerprint."""
    from edge.cli import main

    _old_toolchain_file(tmp_path / "old.onnx")
    report = import_onnx(tmp_path / "old.onnx", tmp_path / "new.onnx")
    proto = onnx.load(str(tmp_path / "new.onnx"))
    proto.ir_version = 3  # as the import wrote it before
    onnx.save(proto, str(tmp_path / "was.onnx"))
    assert main(["quantize", str(tmp_path / "was.onnx"), "--out", str(tmp_path / "q.onnx")]) == 2
    err = capsys.readouterr().err
    assert "not a valid ONNX model" in err and "import the original again" in err, err
    assert not (tmp_path / "q.onnx").exists()
    with Runtime(tmp_path / "was.onnx") as was, Runtime(tmp_path / "new.onnx") as new:
        assert was.info.fingerprint == new.info.fingerprint == report.info.fingerprint
