"""External data that is a symbolic link (a Hugging Face hub snapshot links every file into ``blobs/``) is refused,
and the refusal says how to get a loadable copy; a resolved copy then imports."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.convert.onnx_source import read_onnx
from edge.errors import FormatError


def test_symlinked_external_data_is_refused_naming_cp_rL(tmp_path):
    w = numpy_helper.from_array(np.ones((16, 16), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    onnx.save(model, blobs / "m.onnx", save_as_external_data=True, location="m.onnx_data", size_threshold=0)
    (blobs / "m.onnx_data").rename(blobs / "0123abcd")
    (blobs / "m.onnx").rename(snap / "m.onnx")
    os.symlink("../../blobs/0123abcd", snap / "m.onnx_data")
    with pytest.raises(FormatError, match=r"symbolic link.*cp -rL"):
        read_onnx(snap / "m.onnx")
    copy = tmp_path / "copy"
    shutil.copytree(snap, copy, symlinks=False)  # what cp -rL does
    assert read_onnx(copy / "m.onnx").graph.initializer[0].name == "w"
