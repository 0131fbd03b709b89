"""A writable weight stored as ``float_data`` whose values do not fill its dims is a FormatError at load.

``runtimes.onnx_file.writable_dtypes`` bounds a ``float_data`` tensor's dims by its bytes (at least one a value:
no arena larger than the file), but a list shorter than the dims still passed that bound, and numpy's
``cannot reshape`` ``ValueError`` escaped the load untyped (a traceback on the command line).
"""

from __future__ import annotations

import _tiny
import numpy as np
import onnx
import pytest

from edge.errors import FormatError
from edge.runtime import Runtime


def _values(path, tensor: str, keep: float) -> int:
    """Store ``tensor`` as float_data holding ``keep`` of its values (its dims unchanged); return how many."""
    m = onnx.load(path)
    t = next(t for t in m.graph.initializer if t.name == tensor)
    values = onnx.numpy_helper.to_array(t).reshape(-1)
    n = int(len(values) * keep)
    t.ClearField("raw_data")
    t.float_data.extend(np.resize(values, n).tolist())
    onnx.save(m, path)
    return n


@pytest.mark.parametrize("keep", [0.4, 1.5], ids=["short", "long"])
def test_float_data_that_does_not_fill_the_dims_is_a_format_error_naming_the_tensor(tmp_path, keep):
    path = tmp_path / "m.onnx"
    _tiny.make_mlp(path, sizes=(16, 32, 4))  # fc2.weight [4, 32]: 128 values, 512 bytes as float_data
    n = _values(path, "fc2.weight", keep)
    assert n != 128
    with pytest.raises(FormatError, match=rf"initializer 'fc2.weight': its stored values do not fill its shape "
                                          rf"\[4, 32\] \({n} values for 128\)"):  # fmt: skip
        Runtime(path, backend="onnxruntime", strategy="bound")


def test_float_data_that_fills_the_dims_still_loads_the_same_values(tmp_path):
    path, ref = tmp_path / "m.onnx", tmp_path / "ref.onnx"
    _tiny.make_mlp(path, sizes=(16, 32, 4))
    _tiny.make_mlp(ref, sizes=(16, 32, 4))
    assert _values(path, "fc2.weight", 1.0) == 128
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    with Runtime(path, backend="onnxruntime", strategy="bound") as a, Runtime(ref, backend="onnxruntime") as b:
        np.testing.assert_array_equal(a.run(x)["logits"], b.run(x)["logits"])
