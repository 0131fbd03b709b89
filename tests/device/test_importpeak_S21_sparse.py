"""The import's memory check for sparse tensors counted their values and indices by their size in the file. Stored
as varints (``int64_data`` of small numbers: 1 byte each in the file), they take 8 bytes each in the message and
again in to_array's copy: 4M int64 ones at indices 0..4M-1 (an 18 MB file) were predicted to need 63 MB and took
96-125 MB beyond the check (review N21). They are now counted by their size in memory (8 bytes an int64, uint64 or
double, 4 a float or int32, raw_data's bytes, and the int64 copy of indices of another type)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.convert.onnx_densify import PEAK_HELD, PEAK_STORED, check_sparse  # noqa: E402
from edge.errors import FormatError  # noqa: E402

MB = 1 << 20


def _model(n: int, index_type: int = TensorProto.INT64) -> onnx.ModelProto:
    sp = onnx.SparseTensorProto()
    sp.dims.append(n)
    sp.values.name, sp.values.data_type = "S", TensorProto.INT64
    sp.values.dims.append(n)
    sp.values.int64_data.extend([1] * n)  # 1 byte each in the file
    sp.indices.data_type = index_type
    sp.indices.dims.append(n)
    (sp.indices.int64_data if index_type == TensorProto.INT64 else sp.indices.int32_data).extend(range(n))
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Identity", ["S"], ["z"])]
    outs = [helper.make_tensor_value_info("y", 1, [1, 64]), helper.make_tensor_value_info("z", TensorProto.INT64, None)]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 64])], outs, [w], sparse_initializer=[sp]
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _need(proto) -> int:
    with pytest.raises(FormatError) as e:
        check_sparse(proto, "m", room=(1, "a probe"), outside={})
    return int(re.search(r"\(([\d,]+) bytes with the rest", str(e.value)).group(1).replace(",", ""))


@pytest.mark.parametrize("index_type", [TensorProto.INT64, TensorProto.INT32])
def test_varint_values_and_indices_are_counted_by_their_size_in_memory(index_type):
    n = 1 << 20
    proto = _model(n, index_type)
    assert proto.graph.sparse_initializer[0].ByteSize() < 4.2 * MB  # the file's size: 4x under the memory's
    dense, values = 8 * n, 8 * n
    indices = 8 * n if index_type == TensorProto.INT64 else 4 * n + 8 * n  # int32s, then their int64 copy
    assert _need(proto) >= PEAK_HELD * dense + PEAK_STORED * (values + indices)
    with pytest.raises(FormatError, match="importing it takes about"):  # 34 MB needed; 15 MB predicted before
        check_sparse(proto, "m", room=(30 * MB, "a test"), outside={})
    assert check_sparse(proto, "m", room=(int(_need(proto) * 1.01), "a test"), outside={})


_CHILD = r"""
import json, re, sys
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
import numpy, onnx, onnxruntime
import edge.convert.onnx_import as oi, edge.convert.onnx_foldcheck, edge.convert.onnx_write, edge.format.io
import edge.convert.onnx_densify as d
from edge.errors import FormatError
real, got = d._check_bounds, {}
def probe(proto, found, sizes, name, cap, room, outside=None):
    if "rss" not in got:
        got["rss"] = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM reset to the current RSS
        try:
            real(proto, found, sizes, name, cap, (1, "a probe"), outside)
        except FormatError as e:
            got["need"] = int(re.search(r"\(([\d,]+) bytes with the rest", str(e)).group(1).replace(",", ""))
    return real(proto, found, sizes, name, cap, room, outside)
d._check_bounds = probe
oi.import_onnx(sys.argv[1], sys.argv[2])
got["peak"] = status("VmHWM")
print(json.dumps(got))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_prediction_covers_the_measured_peak(tmp_path):
    src = tmp_path / "s.onnx"
    src.write_bytes(_model(2 << 20).SerializeToString())  # 16 MB dense, 9 MB file
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(src), str(tmp_path / "o.onnx")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    extra = got["peak"] - got["rss"]
    assert extra > 32 * MB  # the values and indices (8 bytes each, 32 MB) and the dense copy: not the file's 9 MB
    assert got["need"] >= extra, f"need {got['need'] / MB:.0f} MB, measured {extra / MB:.0f} MB beyond the check"
