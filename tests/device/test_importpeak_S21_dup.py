"""Two main-graph initializers of one name (refused by the import's check_graph, reachable by ``write_model`` and
``restore`` on their own): the held bytes of the first were matched by name, so the second (float_data, no raw_data)
was written with them too (review N21: 263,316 bytes written where SerializeToString gives 132,238). Held bytes now
go to the first initializer of their name only, and the reader holds none of a name defined twice."""

from __future__ import annotations

import io

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402

from edge.convert.onnx_source import PROTOBUF_LIMIT  # noqa: E402
from edge.convert.onnx_weights import read_model, restore  # noqa: E402
from edge.convert.onnx_write import write_model  # noqa: E402


def _model(second_first: bool) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(128 * 256, dtype=np.float32).reshape(-1, 256), "W")  # 128 KB: held alone
    small = onnx.TensorProto()
    small.CopyFrom(w)
    small.ClearField("raw_data")
    small.float_data.extend([1.0] * 4)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", 1, [1, 128])],
        [helper.make_tensor_value_info("y", 1, [1, 256])],
        [small, w] if second_first else [w, small],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("second_first", [False, True])
def test_a_name_defined_twice_is_written_and_restored_as_protobuf_parsed_it(tmp_path, second_first):
    want = _model(second_first).SerializeToString()
    src = tmp_path / "d.onnx"
    src.write_bytes(want)
    outside: dict = {}
    proto, _ = read_model(src, 1 << 30, outside, PROTOBUF_LIMIT)
    assert outside == {}  # neither is held: which one a later step means by the name is not known
    assert proto.SerializeToString() == want


def test_write_model_puts_held_bytes_in_the_first_initializer_of_their_name_only():
    model = _model(False)
    want = model.SerializeToString()
    w = model.graph.initializer[0]
    outside = {"W": memoryview(w.raw_data)}
    w.ClearField("raw_data")
    buf = io.BytesIO()
    write_model(buf, model, outside)
    assert len(buf.getvalue()) == len(want) and buf.getvalue() == want
    restore(model, outside)
    assert model.SerializeToString() == want and not model.graph.initializer[1].raw_data
