"""A file of millions of tiny records (2-byte ``ir_version`` or empty graph ``doc_string`` records) took the piecewise
reader (``edge.convert.onnx_weights``) two preads and ~4 us a record: 30 s for 20 MB that protobuf parses in 0.05 s,
~50 min for a 2 GB one (review N21). Headers are now read through a window, runs of small records handed to protobuf
in one piece, and past ``_TINY`` records of under 64 bytes on average the file is parsed whole (it holds no large
weight). Checked here by counting reads and parse calls, never by timing."""

from __future__ import annotations

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import helper, numpy_helper  # noqa: E402

import edge.convert.onnx_weights as ow  # noqa: E402
from edge.convert.onnx_import import import_onnx, make_adapter_ready  # noqa: E402
from edge.convert.onnx_source import PROTOBUF_LIMIT  # noqa: E402

N = 1_000_000  # 2 MB of 2-byte records


@pytest.fixture(scope="module")
def base() -> bytes:
    w = numpy_helper.from_array(np.arange(64 * 256, dtype=np.float32).reshape(64, 256), "W")  # 64 KB: held
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", 1, [1, 64])],
        [helper.make_tensor_value_info("y", 1, [1, 256])],
        [w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def _tiny(base: bytes, where: str) -> bytes:
    if where == "top level":
        return base + b"\x08\x08" * N  # ir_version 8, a million times
    body = b"\x52\x00" * N  # GraphProto.doc_string, empty, a million times
    return base + b"\x3a" + ow.encode_varint(len(body)) + body


def _counting(monkeypatch) -> dict:
    calls = {"pread": 0}
    real = os.pread

    def pread(fd, n, offset):
        calls["pread"] += 1
        return real(fd, n, offset)

    monkeypatch.setattr(ow.os, "pread", pread)
    return calls


@pytest.mark.parametrize("where", ["top level", "graph"])
def test_tiny_records_are_read_in_few_calls_as_protobuf_reads_them(base, tmp_path, monkeypatch, where):
    data = _tiny(base, where)
    src = tmp_path / "t.onnx"
    src.write_bytes(data)
    calls = _counting(monkeypatch)
    proto, size = ow.read_model(src, 1 << 30, {}, PROTOBUF_LIMIT)
    assert size == len(data) == 2 * N + len(base) + (0 if where == "top level" else 4)
    assert calls["pread"] <= 2 * ow._TINY[0] * ow._TINY[1] // ow._WINDOW + 8  # ~4M before: two a record
    want = onnx.ModelProto()
    want.ParseFromString(data)
    assert proto.SerializeToString() == want.SerializeToString()


def test_a_run_of_small_records_is_one_read_below_the_whole_parse(base, tmp_path, monkeypatch):
    """50,000 records (under ``_TINY``): read piecewise, the large weight held, in a few dozen reads, not 100,000."""
    data = base + b"\x08\x08" * 50_000
    src = tmp_path / "t.onnx"
    src.write_bytes(data)
    calls = _counting(monkeypatch)
    outside: dict = {}
    proto, _ = ow.read_model(src, 1 << 30, outside, PROTOBUF_LIMIT)
    assert sorted(outside) == ["W"] and outside["W"].nbytes == 64 * 256 * 4
    assert calls["pread"] <= 10
    assert proto.ir_version == 8 and not proto.graph.initializer[0].HasField("raw_data")


@pytest.mark.parametrize("where", ["top level", "graph"])
def test_a_file_of_tiny_records_imports_as_the_old_path_does(base, tmp_path, where):
    src = tmp_path / "t.onnx"
    src.write_bytes(_tiny(base, where))
    import_onnx(src, tmp_path / "o.onnx", name="m")
    proto = onnx.load(str(src))
    make_adapter_ready(proto, name="m")
    assert (tmp_path / "o.onnx").read_bytes() == proto.SerializeToString()
