"""``edge import-onnx`` without a state dict no longer names a BatchNorm-folded weight as torch's parameter.

torch's dynamo export (onnxscript's ``FuseBatchNormIntoConv``) folds an eval BatchNorm into the Conv before it and
keeps the Conv's torch name (``0.weight``) on the folded values; the import took that name, ``edge inspect`` then
showed target ``0.weight`` with no per-channel scale, and the import summary said ``batchnorm_folded: []``. An
adapter for ``0.weight`` would have been added to the folded values unscaled. Now such a weight is left out and
said in ``skipped`` (with a state dict it is named and its scale recorded, as before).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.convert.onnx_import import import_onnx  # noqa: E402


def _cnn(path, fused: bool) -> None:
    """x[1,3,8,8] -> Conv(0.weight; BatchNorm folded when ``fused``, as the dynamo export stamps it) -> Relu ->
    Flatten -> Gemm(2.weight)."""
    rng = np.random.default_rng(0)
    w0 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "0.weight")
    b0 = numpy_helper.from_array(np.zeros(4, np.float32), "0.bias")
    w2 = numpy_helper.from_array(rng.standard_normal((5, 4 * 36)).astype(np.float32), "2.weight")
    conv = helper.make_node("Conv", ["x", "0.weight", "0.bias"], ["c"], name="conv")
    if fused:
        entry = conv.metadata_props.add()
        entry.key, entry.value = "pkg.onnxscript.rewriter.rule_name", "FuseBatchNormIntoConv"
    nodes = [
        conv,
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "2.weight"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [w0, b0, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pytorch")
    model.ir_version = 8
    onnx.save(model, path)


def test_a_batchnorm_folded_conv_weight_is_left_out_and_said(tmp_path):
    _cnn(tmp_path / "m.onnx", fused=True)
    report = import_onnx(tmp_path / "m.onnx", tmp_path / "out.onnx")
    assert sorted(report.info.tensors) == ["2.weight"]
    assert "FuseBatchNormIntoConv" in report.skipped["0.weight"] and "--state-dict" in report.skipped["0.weight"]


def test_a_conv_no_batchnorm_was_folded_into_stays_a_target(tmp_path):
    _cnn(tmp_path / "m.onnx", fused=False)
    report = import_onnx(tmp_path / "m.onnx", tmp_path / "out.onnx")
    assert sorted(report.info.tensors) == ["0.weight", "2.weight"] and "0.weight" not in report.skipped


def test_the_cli_summary_and_inspect_agree(tmp_path, capsys):
    _cnn(tmp_path / "m.onnx", fused=True)
    assert main(["import-onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "out.onnx")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["targets"] == 1 and list(summary["skipped"]) == ["0.weight"]
    assert main(["inspect", str(tmp_path / "out.onnx")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert list(shown["tensors"]) == ["2.weight"] and shown["tensors"]["2.weight"]["shape"] == [5, 144]
