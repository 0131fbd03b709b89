"""An adapter's values given as a scalar or a 0-d array are refused saying what is wrong: the shape.

Before, a ``np.float32`` scalar as ``SparseDelta.values`` read "values must be float32, got float32", and a 0-d
float32 array "(): values for 1 indices". Now the message names what was given (a scalar, a 0-d array) and what is
allowed (a float32 array [N]), in memory (``AdapterMismatchError``) and in a file (``FormatError``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge.errors import AdapterMismatchError, FormatError
from edge.format.adapter import ADAPTER_FORMAT, ADAPTER_VERSION, Adapter, DenseDelta, SparseDelta, adapter_from_bytes

IDX = np.array([[0], [1]], np.int32)
V = r"values must be a float32 array \[N\], got "


def _sparse(indices, values) -> Adapter:
    return Adapter("a", "sha256:x", {"w": SparseDelta(indices, values)}, {"w": (2, 2)})


@pytest.mark.parametrize(
    "indices,values,message",
    [
        (IDX, np.float32(0.5), V + r"a float32 scalar \(float32\), not an array"),
        (IDX, np.array(0.5, np.float32), V + r"a float32 array of shape \(\) \(0-d"),
        (IDX, np.zeros((1, 1), np.float32), V + r"a float32 array of shape \(1, 1\)"),
        (np.int32(0), np.zeros(1, np.float32), r"indices must be an int32 array \[ndim, N\], got an int32 scalar"),
        (IDX, 0.5, V + "float, not an array"),
    ],
)
def test_deltas_shape_a_scalar_or_0d_sparse_delta_says_its_shape(indices, values, message):
    with pytest.raises(AdapterMismatchError, match=message) as e:
        _sparse(indices, values)
    assert isinstance(e.value, ValueError) and "float32, got float32" not in str(e.value)


def test_deltas_shape_a_scalar_dense_delta_says_its_shape():
    with pytest.raises(AdapterMismatchError, match=r"of shape \(2, 2\), got a float32 scalar"):
        Adapter("a", "sha256:x", {"w": DenseDelta(np.float32(1.0))}, {"w": (2, 2)}, method="lora")


def test_deltas_shape_a_file_with_0d_values_is_a_format_error_naming_the_shape():
    from safetensors.numpy import save

    meta = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "method": "shira", "name": "a"}
    meta |= {"base_fingerprint": "sha256:x", "dtype": "float32", "targets": {"w": [2, 2]}, "info": {}}
    data = save({"w.indices": IDX, "w.values": np.array(0.5, np.float32)}, metadata={"edge": json.dumps(meta)})
    with pytest.raises(FormatError, match="w: " + V + r"a float32 array of shape \(\)"):
        adapter_from_bytes(data, source="a.safetensors")
