"""ONNX's protobuf classes for the device's load path, without the ``onnx`` package's import cost.

``import onnx`` imports ``ml_dtypes`` (for float8, int4 and bfloat16 arrays), which takes 0.7-1.2 s and about 17 MB
resident on this machine's CPU before a model is read: three quarters of a small model's cold start. The device
reads and edits a model's graph with nothing but onnx's generated protobuf classes (``onnx.onnx_ml_pb2``, which
imports only ``google.protobuf``), so this module loads that one file of the installed onnx package, under its own
name, and registers it where ``import onnx`` finds it later: the classes are onnx's own (``onnx.ModelProto is
pb2().ModelProto`` after either import order), never a second copy.

:func:`to_array` and :func:`np_dtype` read the plain numeric element types themselves and hand every other one
(float8, int4, bfloat16, strings, external data) to ``onnx.numpy_helper``, which then pays the import once: same
results, only the common case is cheap. One difference remains: after this module loaded the file and then
``import onnx`` ran, the ``onnx`` package has no ``onnx_ml_pb2`` attribute (``import onnx.onnx_ml_pb2`` and
``onnx.ModelProto`` work; nothing in onnx, onnxruntime, onnxscript or torch reads that attribute).
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path

import numpy as np

from edge.errors import BackendUnavailableError, FormatError

__all__ = ["elem_type", "is_model", "load_model", "np_dtype", "pb2", "to_array", "value_info"]

_NAME = "onnx.onnx_ml_pb2"
_lock = threading.Lock()
#: ONNX TensorProto element types read here: the numeric ones numpy holds natively
_NP = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
}
_ELEM = {np.dtype(v): k for k, v in _NP.items()}
_EXTERNAL = 1  # TensorProto.EXTERNAL


def pb2():
    """The ``onnx.onnx_ml_pb2`` module: onnx's if onnx is imported, else loaded alone (module doc)."""
    mod = sys.modules.get(_NAME)
    if mod is not None and not getattr(getattr(mod, "__spec__", None), "_initializing", False):
        return mod
    with _lock:
        if sys.modules.get(_NAME) is not None or "onnx" in sys.modules:  # onnx's own (waits for an import under way)
            return importlib.import_module(_NAME)
        return _load_alone()


def _load_alone():
    try:
        spec = importlib.util.find_spec("onnx")  # finds the package without running its __init__
    except (ImportError, ValueError) as e:
        raise BackendUnavailableError(f"reading ONNX models needs the onnx package: {e}") from e
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError("reading ONNX models needs the onnx package (pip install onnx)")
    path = Path(next(iter(spec.submodule_search_locations))) / "onnx_ml_pb2.py"
    if not path.is_file():  # an onnx whose layout changed: its own import (slower, same classes)
        return importlib.import_module(_NAME)
    sub = importlib.util.spec_from_file_location(_NAME, path)
    mod = importlib.util.module_from_spec(sub)
    try:  # run before it is registered: no other thread (ours, or onnx's own import) ever sees it half-built
        sub.loader.exec_module(mod)
    except Exception as e:  # e.g. protobuf's VersionError: a protobuf older than onnx's generated code needs
        raise BackendUnavailableError(
            f"onnx's protobuf classes do not load with the installed protobuf ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); install the protobuf version onnx "
            "requires (pip install -U protobuf)"
        ) from e
    # registered where `import onnx` finds it, unless a concurrent `import onnx` got there first with its own run of
    # the file (the same classes: the descriptor pool holds the file once); ours is complete either way
    sys.modules.setdefault(_NAME, mod)
    return mod


def load_model(data: bytes):
    """A ``ModelProto`` parsed from ``data`` (as ``onnx.load_model_from_string``); :class:`FormatError` if it is not
    one."""
    data = bytes(data)  # (a memoryview of wider items: its length in bytes)
    model = pb2().ModelProto()
    try:
        used = model.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise FormatError(f"not a readable ONNX model: {e}") from e
    if used is not None and used != len(data):
        raise FormatError(f"not a readable ONNX model: the message ends after {used} of {len(data)} bytes")
    return model


def is_model(obj) -> bool:
    """Whether ``obj`` is an ONNX ``ModelProto`` (without importing onnx when nothing has)."""
    mod = sys.modules.get(_NAME)
    return mod is not None and isinstance(obj, mod.ModelProto)


def np_dtype(elem: int) -> np.dtype:
    """The numpy dtype of ONNX element type ``elem`` (``onnx.helper.tensor_dtype_to_np_dtype``)."""
    t = _NP.get(elem)
    if t is not None:
        return np.dtype(t)
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(elem))


def elem_type(dtype) -> int:
    """The ONNX element type of numpy ``dtype`` (``onnx.helper.np_dtype_to_tensor_dtype``)."""
    e = _ELEM.get(np.dtype(dtype))
    if e is not None:
        return e
    from onnx import helper

    return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


def to_array(tensor) -> np.ndarray:
    """The values of a ``TensorProto`` as ``onnx.numpy_helper.to_array`` gives them (read-only over ``raw_data``)."""
    t = _NP.get(tensor.data_type)
    if t is None or tensor.data_location == _EXTERNAL or tensor.HasField("segment") or sys.byteorder != "little":
        from onnx import numpy_helper

        return numpy_helper.to_array(tensor)
    dims = tuple(tensor.dims)
    if tensor.HasField("raw_data"):
        return np.frombuffer(tensor.raw_data, dtype=t).reshape(dims)
    if t in (np.float16, np.int16, np.uint16):  # their bits in int32_data
        return np.array(tensor.int32_data, np.int32).view(np.uint32).astype(np.uint16).reshape(dims).view(t)
    if t is np.bool_:
        return np.array(tensor.int32_data, np.int32).view(np.uint32).astype(np.uint8).view(t).reshape(dims)
    field = {np.float32: "float_data", np.float64: "double_data", np.int64: "int64_data"}.get(t)
    if field is None:
        field = "uint64_data" if t in (np.uint32, np.uint64) else "int32_data"
    store = {"float_data": np.float32, "double_data": np.float64, "int64_data": np.int64, "uint64_data": np.uint64}
    return np.asarray(getattr(tensor, field), dtype=store.get(field, np.int32)).astype(t).reshape(dims)


def value_info(name: str, elem: int, shape):
    """A tensor ``ValueInfoProto`` (``onnx.helper.make_tensor_value_info``): ``shape`` of ints, strings (symbolic
    dims) or None (unknown dims)."""
    vi = pb2().ValueInfoProto(name=name)
    tt = vi.type.tensor_type
    tt.elem_type = elem
    if shape is not None:
        tt.shape.SetInParent()
        for d in shape:
            dim = tt.shape.dim.add()
            if isinstance(d, str):
                dim.dim_param = d
            elif d is not None:
                dim.dim_value = int(d)
    return vi
