"""A run onnxruntime fails on the values fed, when every input declares its shape: a typed one-line error naming the
node, never onnxruntime's own exception (inputs without a shape: tests/device/test_hostile_*_runfail.py)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.convert.onnx_import import import_onnx
from edge.errors import ConfigError
from edge.runtime import Runtime


def test_an_index_computed_from_the_values_out_of_range_is_a_config_error_naming_the_node(tmp_path):
    vi, c = helper.make_tensor_value_info, numpy_helper.from_array
    w = np.random.default_rng(3).standard_normal((8, 6)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=1, name="sum"),
        helper.make_node("Cast", ["s"], ["s64"], to=TensorProto.INT64, name="cast"),
        helper.make_node("Reshape", ["s64", "one"], ["k"], name="flat"),
        helper.make_node("GatherElements", ["t", "k"], ["g"], name="gather_sum"),
    ]
    inits = [c(w, "w"), c(np.arange(3, dtype=np.float32), "t"), c(np.array([1], np.int64), "one")]
    outs = [vi("y", TensorProto.FLOAT, [2, 6]), vi("g", TensorProto.FLOAT, [1])]
    g = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [2, 8])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    (tmp_path / "m.onnx").write_bytes(m.SerializeToString())
    import_onnx(tmp_path / "m.onnx", tmp_path / "e.onnx")
    with Runtime(tmp_path / "e.onnx") as rt:
        ok = rt.run({"x": np.full((2, 8), 0.0625, np.float32)}, ["g"])["g"]  # the sum is 1: index 1
        assert ok.tolist() == [1.0]
        with pytest.raises(ConfigError) as failed:
            rt.run({"x": np.ones((2, 8), np.float32)}, ["g"])  # the sum is 16: out of range
    said = str(failed.value)
    assert "GatherElements node 'gather_sum'" in said and "check the values fed" in said, said
    assert "\n" not in said and "declare no shape" not in said


def test_a_text_longer_than_the_positions_is_said_as_a_size_of_the_named_dimensions(tmp_path):
    """BERT-style: ids declare [batch, seq], positions a [1, 16] table sliced to seq: 20 tokens fail at the Add."""
    h, t, nh = helper, TensorProto, numpy_helper
    rng = np.random.default_rng(0)
    inits = [
        nh.from_array(rng.standard_normal((100, 16)).astype(np.float32), "word_emb"),
        nh.from_array(rng.standard_normal((16, 16)).astype(np.float32), "pos_emb"),
        nh.from_array(np.arange(16, dtype=np.int64)[None], "position_ids"),
        nh.from_array(np.array([0], np.int64), "zero"),
        nh.from_array(np.array([1], np.int64), "one"),
        nh.from_array(rng.standard_normal((16, 16)).astype(np.float32), "wq"),
    ]
    nodes = [
        h.make_node("Shape", ["ids"], ["shp"]),
        h.make_node("Gather", ["shp", "one"], ["seqlen"], axis=0),
        h.make_node("Slice", ["position_ids", "zero", "seqlen", "one"], ["pids"]),
        h.make_node("Gather", ["word_emb", "ids"], ["we"]),
        h.make_node("Gather", ["pos_emb", "pids"], ["pe"]),
        h.make_node("Add", ["we", "pe"], ["emb"], name="add_positions"),
        h.make_node("MatMul", ["emb", "wq"], ["y"]),
    ]
    ids = h.make_tensor_value_info("ids", t.INT64, ["batch", "seq"])
    g = h.make_graph(nodes, "bertish", [ids], [h.make_tensor_value_info("y", t.FLOAT, None)], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    (tmp_path / "m.onnx").write_bytes(m.SerializeToString())
    import_onnx(tmp_path / "m.onnx", tmp_path / "e.onnx")
    with Runtime(tmp_path / "e.onnx") as rt:
        assert rt.run({"ids": np.ones((1, 12), np.int64)})["y"].shape == (1, 12, 16)
        with pytest.raises(ConfigError) as failed:
            rt.run({"ids": np.ones((1, 20), np.int64)})
    said = str(failed.value)
    assert "Add node 'add_positions'" in said and "16 by 20" in said, said
    assert "a size the model was not made for (input(s) ids ['batch', 'seq']" in said, said
    assert "feed the sizes the model was made for" in said and "check the values" not in said, said
