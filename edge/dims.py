"""Fixed sizes for a model's named dimensions: ``Runtime(model, dims={"batch": 1, "sequence": 128})``.

An ONNX input may declare a dimension by name (``batch``, ``sequence``, an exporter's ``unk__123`` or ``s0``): free,
so onnxruntime plans memory per call and an NPU execution provider (QNN, NNAPI, CoreML) that needs static shapes
cannot take the graph whole. ``dims`` fixes such names to sizes for every session a backend builds
(onnxruntime: ``SessionOptions.add_free_dimension_override_by_name``, which sets the graph inputs' dimensions of
that name). It is a run option, not a model change: the file, its metadata and its fingerprint are the same, so an
adapter made for the model fits it. A device profile's ``dims`` apply under ``Runtime(device=...)`` to the names
the model declares, on a backend that takes dims (:mod:`edge.dims_apply`): a profile serves every model on the
device, so a name a model lacks, or a .tflite (no named dimensions), is skipped (logged once at INFO; ``rt.dims``
shows what applies). An explicit ``dims=`` wins per name and is strict: a name the model does not declare, or a
backend that takes none, is a :class:`ConfigError`. The runtime's input specs carry the fixed sizes
(:func:`fix_specs`), so a feed of another size is refused before onnxruntime runs, naming the dimension, and the
inputs edge generates (profile, engine measuring) have the fixed sizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from edge.errors import ConfigError

__all__ = [
    "MAX_SIZE",
    "FixedDim",
    "check_dims",
    "declared",
    "fix_specs",
    "parse_dim_flags",
]

MAX_SIZE = 2**31 - 1  # onnxruntime takes an int64, NPU compilers an int32: larger is a typo, never a shape
_MAX_NAMES = 256  # a model with more named dimensions than this is not one a caller lists by hand
_HOW = "pass dims={'NAME': SIZE} (CLI: --dim NAME=SIZE; a device profile: dims: {NAME: SIZE})"


class FixedDim(int):
    """A dimension fixed by ``dims``: its size, an ``int`` everywhere a size is used, that remembers its name (a
    feed of another size is refused naming it; shapes print as ``sequence=128``)."""

    name: str

    def __new__(cls, name: str, size: int) -> FixedDim:
        self = super().__new__(cls, size)
        self.name = name
        return self

    def __repr__(self) -> str:
        return f"{self.name}={int(self)}"

    __str__ = __repr__

    def __reduce__(self):  # copies and pickles (never of user files) keep the name
        return FixedDim, (self.name, int(self))


def check_dims(dims: object, what: str = "dims") -> dict[str, int]:
    """``dims`` as a plain ``{name: size}``: a mapping of non-empty ``str`` names to ``int`` sizes from 1 to
    :data:`MAX_SIZE` (a bool, a float, a numpy float or a string is refused: ``1.0`` and ``"128"`` are typos here)."""
    if dims is None:
        return {}
    if not isinstance(dims, Mapping):
        raise ConfigError(
            f"{what} must be a mapping of dimension name to size, such as {{'batch': 1, 'sequence': 128}}; "
            f"got {type(dims).__name__} {dims!r:.80}"
        )
    if len(dims) > _MAX_NAMES:
        raise ConfigError(f"{what} names {len(dims)} dimensions; at most {_MAX_NAMES}")
    out: dict[str, int] = {}
    for name, size in dims.items():
        if not isinstance(name, str) or not name or len(name) > 1000:
            raise ConfigError(f"{what}: a dimension name must be a non-empty string, got {name!r:.80}; {_HOW}")
        name = str.__str__(name)  # a str subclass's own __eq__/__hash__ never reach onnxruntime or a lookup
        ok = not isinstance(size, bool) and hasattr(size, "__index__") and not isinstance(size, str)
        try:
            value = size.__index__() if ok else None
        except TypeError:
            value = None
        if value is None:
            raise ConfigError(
                f"{what}[{name!r}] must be an integer size from 1 to {MAX_SIZE}, got {type(size).__name__} "
                f"{size!r:.40}; {_HOW}"
            )
        if not 1 <= value <= MAX_SIZE:
            raise ConfigError(f"{what}[{name!r}] is {value}; a size is from 1 to {MAX_SIZE}")
        out[name] = int(value)
    return out


def declared(specs: Mapping) -> dict[str, list[str]]:
    """Per input, the dimensions it declares by name (an unnamed free axis, ``?1``, cannot be fixed by name)."""
    out = {}
    for name, spec in specs.items():
        shape = getattr(spec, "shape", None) or ()
        named = [d for d in shape if isinstance(d, str) and not d.startswith("?")]
        if named:
            out[name] = list(dict.fromkeys(named))
    return out


def fix_specs(specs: Mapping, dims: Mapping[str, int], model: str) -> dict:
    """``specs`` (:class:`~edge.format.feeds.InputSpec` by input) with the named dimensions in ``dims`` fixed
    (:class:`FixedDim`); a name no input declares is a :class:`ConfigError` naming each input's named dimensions."""
    if not dims:
        return dict(specs)
    by_input = declared(specs)
    known = {d for ds in by_input.values() for d in ds}
    unknown = [d for d in dims if d not in known]
    if unknown:
        shown = "; ".join(f"{k}: {v}" for k, v in list(by_input.items())[:8]) or "none (every input's shape is fixed)"
        raise ConfigError(
            f"dims {unknown[:8]} are not dimensions model {model!r} declares by name; its inputs' named dimensions: "
            f"{shown}; {_HOW} with those names"
        )
    out = {}
    for name, spec in specs.items():
        shape = spec.shape
        if shape is not None and any(isinstance(d, str) and d in dims for d in shape):
            shape = tuple(FixedDim(d, dims[d]) if isinstance(d, str) and d in dims else d for d in shape)
            spec = replace(spec, shape=shape)
        out[name] = spec
    return out


def parse_dim_flags(flags) -> dict[str, int]:
    """``--dim NAME=SIZE`` flags (repeatable) as dims; a malformed one is a :class:`ConfigError` saying the form."""
    out: dict[str, int] = {}
    for flag in flags or ():
        name, sep, size = str(flag).partition("=")
        name, size = name.strip(), size.strip()
        if not sep or not name or not size.isdigit() or not size.isascii() or len(size) > 12:
            raise ConfigError(f"--dim takes NAME=SIZE with SIZE a whole number from 1 to {MAX_SIZE}, got {flag!r:.80}")
        if name in out and out[name] != int(size):
            raise ConfigError(f"--dim {name} given twice ({out[name]} and {size}); give each name once")
        out[name] = int(size)
    return check_dims(out, "--dim")
