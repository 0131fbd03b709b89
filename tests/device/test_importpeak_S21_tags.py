"""The piecewise ONNX reader (``edge.convert.onnx_weights``) reframes three records it takes apart: the model's graph,
a held (large) initializer and its raw_data. A tag written in more than 5 bytes (or over 2**32-1) there was decoded
and replaced by a canonical one, so a file protobuf refuses ("wire format was corrupt") was imported (review N21).
Such a key now sends the file to protobuf's whole parse, which refuses it as it always did; a 5-byte tag, legal,
is still read."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402

from edge.convert.onnx_source import PROTOBUF_LIMIT  # noqa: E402
from edge.convert.onnx_weights import encode_varint as enc  # noqa: E402
from edge.convert.onnx_weights import read_model  # noqa: E402
from edge.errors import FormatError  # noqa: E402


@pytest.fixture(scope="module")
def parts():
    w = numpy_helper.from_array(np.arange(128 * 256, dtype=np.float32).reshape(-1, 256), "W")  # 128 KB: held
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", 1, [1, 128])],
        [helper.make_tensor_value_info("y", 1, [1, 256])],
        [w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    data, gb, wb = m.SerializeToString(), g.SerializeToString(), w.SerializeToString()
    return data, gb, wb


def _graph(data: bytes, gb: bytes, new_gb: bytes, graph_key: bytes = b"\x3a") -> bytes:
    old = b"\x3a" + enc(len(gb)) + gb
    assert data.count(old) == 1
    return data.replace(old, graph_key + enc(len(new_gb)) + new_gb)


def _variants(parts) -> dict[str, bytes]:
    data, gb, wb = parts
    rec = b"\x2a" + enc(len(wb)) + wb
    assert gb.count(rec) == 1 and wb.count(b"\x4a") >= 1
    i = wb.index(b"\x4a")  # raw_data's key (field 9, wire 2)
    overlong_raw = wb[:i] + b"\xca\x80\x80\x80\x80\x00" + wb[i + 1 :]
    return {
        "graph": _graph(data, gb, gb, b"\xba\x80\x80\x80\x80\x00"),
        "initializer": _graph(data, gb, gb.replace(rec, b"\xaa\x80\x80\x80\x80\x00" + enc(len(wb)) + wb)),
        "raw_data": _graph(data, gb, gb.replace(rec, b"\x2a" + enc(len(overlong_raw)) + overlong_raw)),
        "graph, 5 bytes over 2**32-1": _graph(data, gb, gb, b"\xba\x80\x80\x80\x10"),
        "graph, 5 bytes (legal)": _graph(data, gb, gb, b"\xba\x80\x80\x80\x00"),
    }


@pytest.mark.parametrize(
    "where", ["graph", "initializer", "raw_data", "graph, 5 bytes over 2**32-1", "graph, 5 bytes (legal)"]
)
def test_an_overlong_tag_is_refused_as_protobuf_refuses_it(parts, tmp_path, where):
    data = _variants(parts)[where]
    src = tmp_path / "m.onnx"
    src.write_bytes(data)
    try:
        onnx.ModelProto().ParseFromString(data)
        protobuf_takes = True
    except Exception:
        protobuf_takes = False
    assert protobuf_takes == where.endswith("(legal)")
    outside: dict = {}
    if not protobuf_takes:
        with pytest.raises(FormatError, match="is not a readable ONNX file") as e:
            read_model(src, 1 << 30, outside, PROTOBUF_LIMIT)
        assert "\n" not in str(e.value)
        return
    proto, size = read_model(src, 1 << 30, outside, PROTOBUF_LIMIT)
    assert size == len(data) and sorted(outside) == ["W"] and outside["W"].nbytes == 128 * 256 * 4
    assert np.frombuffer(outside["W"], np.float32)[-1] == 128 * 256 - 1
    assert [t.name for t in proto.graph.initializer] == ["W"] and len(proto.graph.node) == 1
