"""A large initializer the piecewise reader does not hold (bfloat16 or bool, data_location set, an unknown field) was
read whole, copied into a graph record, copied again into the batch and parsed: 4x its size at peak, twice the old
whole-file path (review N21: 256 MB for 64 MB of bfloat16). It is now read once, into the buffer protobuf parses:
measured 127 MB above baseline for 64 MB, as the old path (a fresh child's VmHWM)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from edge.convert.onnx_source import PROTOBUF_LIMIT  # noqa: E402
from edge.convert.onnx_weights import read_model  # noqa: E402

MB = 1 << 20

_CHILD = r"""
import json, sys
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
import numpy, onnx
from edge.convert.onnx_source import read_onnx
import edge.convert.onnx_weights
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM reset to the current RSS
base = status("VmHWM")
outside = {}
proto = read_onnx(sys.argv[1], outside=outside)
print(json.dumps({"extra": status("VmHWM") - base, "held": sorted(outside), "n": len(proto.graph.initializer)}))
"""


def _model(path, n_bytes: int, dtype: int) -> None:
    t = TensorProto(name="W", data_type=dtype, dims=[n_bytes // 2])
    t.raw_data = np.ones(n_bytes // 2, np.uint16).tobytes()
    g = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["y"])], "g", [], [helper.make_tensor_value_info("y", dtype, None)], [t]
    )
    path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())


@pytest.mark.parametrize("size", [1 * MB, 9 * MB])  # into the batch; over the 8 MB batch, parsed where read
def test_a_large_bfloat16_initializer_is_read_as_protobuf_reads_it(tmp_path, size):
    src = tmp_path / "b.onnx"
    _model(src, size, TensorProto.BFLOAT16)
    outside: dict = {}
    proto, _ = read_model(src, 1 << 30, outside, PROTOBUF_LIMIT)
    want = onnx.ModelProto()
    want.ParseFromString(src.read_bytes())
    assert outside == {} and proto.SerializeToString() == want.SerializeToString()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_large_bfloat16_initializer_peaks_at_twice_its_size_not_four_times(tmp_path):
    src = tmp_path / "b.onnx"
    _model(src, 64 * MB, TensorProto.BFLOAT16)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(src)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["held"] == [] and got["n"] == 1  # bfloat16: kept in the message
    assert got["extra"] <= 2.4 * 64 * MB, f"{got['extra'] / MB:.0f} MB above baseline for 64 MB (old path 128)"
