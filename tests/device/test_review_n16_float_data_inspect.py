"""``edge inspect`` and ``read_model_info`` refuse a float_data weight that does not fill its shape, as a load does
(review N, session 16).

3a8c591 made a load refuse a writable ``float_data`` tensor whose values do not fill its dims, and 14869f3's README
says inspect checks a model's declared tensor sizes as a load does; but ``writable_dtypes`` (what both run before
anything is allocated) only asked for a byte a value, so ``edge inspect`` printed such a file (exit 0) as loadable.
The values are now counted from the file's fields (float_data packed or not; int32_data varints, int8 targets).
"""

from __future__ import annotations

import _tiny
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge.cli import main
from edge.errors import FormatError
from runtimes import read_model_info
from runtimes.onnx_file import _tensor


def _as_float_data(path, tensor: str, n: int) -> None:
    m = onnx.load(path)
    t = next(t for t in m.graph.initializer if t.name == tensor)
    values = onnx.numpy_helper.to_array(t).reshape(-1)
    t.ClearField("raw_data")
    t.float_data.extend(np.resize(values, n).tolist())
    onnx.save(m, path)


@pytest.mark.parametrize("n", [51, 129, 128])
def test_inspect_refuses_float_data_that_does_not_fill_its_shape(tmp_path, capsys, n):
    path = tmp_path / "m.onnx"
    _tiny.make_mlp(path, sizes=(16, 32, 4))  # fc2.weight [4, 32]: 128 values
    _as_float_data(path, "fc2.weight", n)
    if n == 128:
        assert read_model_info(path).tensors["fc2.weight"].shape == (4, 32)
        assert main(["inspect", str(path)]) == 0
        return
    says = rf"initializer 'fc2.weight': its stored values do not fill its shape \[4, 32\] \({n} values for 128\)"
    with pytest.raises(FormatError, match=says):
        read_model_info(path)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"({n} values for 128)" in err[0], err


@pytest.mark.parametrize("values", [[1, -1, 127, -128, 0], [5], []])
def test_int32_data_values_are_counted_one_a_varint(values):
    t = helper.make_tensor("w", TensorProto.INT8, [len(values)], values)  # int8 is stored as int32_data varints
    assert not t.raw_data and list(t.int32_data) == values
    buf = t.SerializeToString()
    name, stored = _tensor(memoryview(buf), 0, len(buf))
    assert name == "w" and stored.raw is None and stored.values == len(values)
    f = helper.make_tensor("f", TensorProto.FLOAT, [3], [1.0, 2.5, -3.0])
    buf = f.SerializeToString()
    assert _tensor(memoryview(buf), 0, len(buf))[1].values == 3
