"""What a ``.tflite`` file must satisfy beyond its flatbuffer layout before LiteRT sees it.

LiteRT's Python interpreter does not verify a model: an operator missing a required input, a
quantization scale of 0 or NaN, or a tensor read before any operator computes it crashes the
process (SIGSEGV, SIGABRT) or fails later at ``invoke``. :func:`edge.format.tflite.read_tflite`
applies these checks while it reads, so a hostile file is a :class:`~edge.errors.FormatError`.
"""

from __future__ import annotations

import math

import numpy as np

from edge.errors import FormatError

__all__ = [
    "MAX_TENSOR_BYTES",
    "OPTIONAL_INPUTS",
    "REQUIRED_INPUTS",
    "check_indices",
    "check_operator",
    "check_quant",
    "check_tensor_sizes",
]

#: BuiltinOperator -> how many inputs it takes at least (schema.fbs and the kernels). A listed operator may leave
#: out (-1) only the inputs :data:`OPTIONAL_INPUTS` names: LiteRT's kernels dereference the others and crash the
#: process (RESHAPE's shape, TRANSPOSE's permutation). Operators not listed: unchecked.
REQUIRED_INPUTS = {
    c: n
    for n, codes in (
        (1, (1, 5, 6, 14, 17, 19, 21, 22, 25, 26, 28, 43, 47, 50, 53, 59, 66, 73, 75, 76, 77, 98, 101, 108, 109, 114)),
        (1, (117, 150)),
        (2, (0, 3, 4, 7, 9, 18, 23, 34, 36, 39, 40, 41, 42, 49, 55, 56, 57, 58, 61, 69, 70, 71, 74, 78, 82, 99, 107)),
        (2, (126, 128, 130)),
        (3, (37, 38, 65, 67, 123)),
        (4, (45,)),
        (1, (2, 83, 106)),
    )
    for c in codes
}
#: the inputs an operator of the table may leave out (-1): the bias of FULLY_CONNECTED, CONV_2D,
#: DEPTHWISE_CONV_2D and TRANSPOSE_CONV
OPTIONAL_INPUTS = {9: (2,), 3: (2,), 4: (2,), 67: (3,)}
MAX_TENSOR_BYTES = (1 << 31) - 1  # LiteRT's flatbuffers stop at 2 GB; no tensor of a device model is larger
_ZERO_POINTS = {9: (-128, 127), 3: (0, 255), 7: (-32768, 32767), 17: (-8, 7)}  # int8, uint8, int16, int4
_TINY = float(np.finfo(np.float32).tiny)  # the least positive normal float32


def check_indices(what: str, indices: tuple[int, ...], count: int, *, optional: bool) -> None:
    """Every tensor index names a tensor of a subgraph of ``count`` (``optional``: -1, none, is allowed)."""
    low = -1 if optional else 0
    bad = [i for i in indices if not low <= i < count]
    if bad:
        raise FormatError(f"{what} name tensors {bad[:3]} of a subgraph with {count} tensors")


def check_operator(k: int, code: int, reads: tuple[int, ...], writes: tuple[int, ...], count: int, ready: set[int]):
    """Operator ``k`` (builtin ``code``) names tensors that exist, has its required inputs, and reads only tensors in
    ``ready`` (constants, variables, subgraph inputs, outputs of earlier operators: LiteRT runs them in file order);
    its outputs join ``ready``."""
    check_indices(f"operator {k}", reads + writes, count, optional=True)
    need = REQUIRED_INPUTS.get(code)
    absent = [p for p, i in enumerate(reads) if i == -1 and p not in OPTIONAL_INPUTS.get(code, ())]
    if need is not None and (len(reads) < need or absent):
        raise FormatError(f"operator {k} (builtin {code}) lacks a required input: {list(reads)[:8]}")
    if set(reads) - ready:
        raise FormatError(f"operator {k} reads tensors {sorted(set(reads) - ready)[:5]} computed by none before it")
    ready |= set(writes)


def check_quant(i: int, ttype: int, shape: tuple[int, ...], scale: tuple, zero: tuple, dim: int) -> None:
    """Tensor ``i``'s quantization parameters (``ttype``: its TensorType), checked as LiteRT's kernels need them."""
    if not all(math.isfinite(x) and x >= _TINY for x in scale):  # LiteRT aborts the process on some of these
        raise FormatError(f"tensor {i} has quantization scales {list(scale)[:4]}; a scale is a positive normal float")
    if len(scale) != len(zero) and (scale or zero):  # one without the other aborts LiteRT as well
        raise FormatError(f"tensor {i} has {len(scale)} quantization scales and {len(zero)} zero points")
    low, high = _ZERO_POINTS.get(ttype, (-(1 << 63), 1 << 63))
    if not all(low <= z <= high for z in zero):  # LiteRT's int8 kernels crash on an int8 zero point of 2**31
        raise FormatError(f"tensor {i} (TensorType {ttype}) has zero points {list(zero)[:4]}, outside [{low}, {high}]")
    if len(scale) > 1 and not (0 <= dim < len(shape) and shape[dim] == len(scale)):
        raise FormatError(
            f"tensor {i} of shape {list(shape)} has {len(scale)} scales along quantized dimension {dim}; "
            "the count must equal that dimension's size"
        )


def check_tensor_sizes(tensors, memory_mb: float | None = None) -> None:
    """No tensor LiteRT would allocate (shape times item size, ``tensors``: :class:`~edge.format.tflite.TfliteTensor`)
    has a negative size or is larger than :data:`MAX_TENSOR_BYTES` or than the device's whole memory budget
    ``memory_mb``: a shape edited to ask for gigabytes is refused before the interpreter allocates its arena."""
    limit = MAX_TENSOR_BYTES if memory_mb is None else min(MAX_TENSOR_BYTES, int(memory_mb * (1 << 20)))
    for t in tensors:
        if any(d < 0 for d in t.shape):  # -1 belongs in shape_signature; LiteRT fails on it in shape
            raise FormatError(
                f"tensor {t.name[:80]!r} has shape {list(t.shape)[:8]}; sizes must not be negative (a dynamic axis "
                "is -1 in shape_signature, not in shape): the file was altered after conversion, convert it again"
            )
        size = math.prod(max(d, 1) for d in t.shape) * (np.dtype(t.dtype).itemsize if t.dtype is not None else 1)
        if size > limit:
            raise FormatError(
                f"tensor {t.name[:80]!r} of shape {list(t.shape)[:8]} would take {size} bytes, over the limit of "
                f"{limit} bytes{'' if memory_mb is None else f' (the device memory budget, {memory_mb} MB)'}"
            )
