"""What ``edge quantize`` feeds the quantizer: the user's samples, checked against the model before loading.

The samples are the ``.npz`` format ``edge update`` reads (:mod:`edge.format.samples`): ``x`` for a
one-input model, else one array per input name; ``y`` is ignored. Every ``.npy`` header is read
first (nothing else) and checked against the model's inputs: names, dtype, rank, fixed dimensions
and dimensions the inputs share; the arrays are then read by :func:`edge.format.samples.read_npz`,
bounded by what the headers declared, and checked again once loaded
(:func:`edge.format.feeds.check_feeds`). Without samples, a dynamic quantization is checked on
inputs generated from the model's input specs.
"""

from __future__ import annotations

import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np

__all__ = ["generated_inputs", "load_calibration", "npz_headers"]

_CHECK_SAMPLES = 8  # generated check inputs: rows
_MAX_GENERATED = 256 << 20  # bytes of generated check inputs
_SEQ = 16  # generated check inputs: a free dimension other than the batch, when the metadata gives none


def load_calibration(path: Path, specs) -> tuple[dict, int]:
    """``({input: array [N, ...]}, N)`` from a samples ``.npz``, checked against ``specs`` before loading."""
    from edge.errors import ConfigError
    from edge.format.feeds import check_feeds
    from edge.format.samples import MAX_ARRAY_BYTES, read_npz

    declared = npz_headers(path)
    keys = _member_for_input(declared, specs, path)
    sizes: dict[str, tuple[int, str]] = {}
    rows = {declared[key][0][0] if declared[key][0] else 0 for key in keys.values()}
    if len(rows) != 1 or 0 in rows:
        raise ConfigError(f"{path}: the inputs' arrays must hold the same number (> 0) of samples, got {sorted(rows)}")
    for name, key in keys.items():
        shape, dtype = declared[key]
        spec = specs[name]
        if dtype.newbyteorder("=") != spec.dtype and not (dtype.kind in "iu" and spec.dtype.kind in "iu"):
            raise ConfigError(f"{path}: {key!r} is {dtype}; input {name!r} takes {spec.dtype} (save it as that)")
        takes = f"input {name!r} takes [N, {', '.join(str(d) for d in spec.shape[1:])}]"
        if len(shape) != len(spec.shape):
            raise ConfigError(f"{path}: {key!r} has shape {shape}; {takes}")
        for got, want in zip(shape[1:], spec.shape[1:]):
            if got == 0 or (isinstance(want, int) and got != want):
                raise ConfigError(f"{path}: {key!r} has shape {shape}; {takes}")
            if isinstance(want, str) and sizes.setdefault(want, (got, key))[0] != got:
                seen, where = sizes[want]
                raise ConfigError(
                    f"{path}: dimension {want!r} is {seen} in {where!r} but {got} in {key!r}; use one size"
                )
    total = sum(int(np.prod(s, dtype=object)) * d.itemsize for s, d in declared.values())
    if total > MAX_ARRAY_BYTES:
        raise ConfigError(f"{path}: its arrays would take {total} bytes, over the {MAX_ARRAY_BYTES} read for samples")
    arrays = read_npz(path, max_array_bytes=total)  # bounded by what the headers declared: a swapped file is refused
    free = {name: replace(spec, shape=("samples", *spec.shape[1:])) for name, spec in specs.items()}
    feeds = check_feeds({name: arrays[key] for name, key in keys.items()}, free)  # and checked again, loaded
    for name, x in feeds.items():
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise ConfigError(f"{path}: input {name!r} holds {int(x.size - np.isfinite(x).sum())} NaN or Inf values")
    return feeds, int(rows.pop())


def npz_headers(path: Path) -> dict:
    """``{member: (shape, dtype)}`` of an ``.npz`` file from its ``.npy`` headers only (nothing else is read)."""
    from edge.errors import FormatError
    from edge.format.io import open_regular
    from edge.format.samples import MAX_MEMBERS, MAX_NPZ_BYTES, npy_header

    fd, st = open_regular(path, what="calibration file")
    with open(fd, "rb") as f:
        if st.st_size > MAX_NPZ_BYTES:
            raise FormatError(f"calibration file {path} is {st.st_size} bytes, over the limit of {MAX_NPZ_BYTES}")
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, NotImplementedError) as e:
            raise FormatError(f"{path} is not an .npz (zip) file: {e}; save with np.savez(path, x=...)") from e
        with zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise FormatError(f"{path}: {len(infos)} members, more than the {MAX_MEMBERS} an .npz of samples needs")
            out = {}
            for member in infos:
                key = member.filename.removesuffix(".npy")
                if key == member.filename or key in out:
                    raise FormatError(f"{path}: member {member.filename[:80]!r} is not one .npy array")
                out[key] = npy_header(zf, member, path)
    return out


def generated_inputs(specs, info) -> dict:
    """Check inputs for a dynamic quantization without samples, from a float-input model's specs: N(0, 1), a free
    batch dimension ``_CHECK_SAMPLES`` rows, another free one the metadata's ``seq_len`` (else ``_SEQ``)."""
    from edge.errors import ConfigError

    seq = info.extra.get("seq_len")
    seq = min(int(seq), 4096) if str(seq).isdigit() else _SEQ
    shapes = {
        name: tuple(d if isinstance(d, int) else (_CHECK_SAMPLES if i == 0 else seq) for i, d in enumerate(spec.shape))
        for name, spec in specs.items()
    }
    total = sum(int(np.prod(shape, dtype=object)) * specs[name].dtype.itemsize for name, shape in shapes.items())
    if total > _MAX_GENERATED:  # shapes come from the model file: checked before anything is allocated
        raise ConfigError(
            f"inputs of shapes {list(shapes.values())} would take {total} bytes; pass --calib SAMPLES.npz"
        )
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(specs[name].dtype) for name, shape in shapes.items()}


def _member_for_input(declared: dict, specs, path: Path) -> dict[str, str]:
    """Model input name -> the ``.npz`` member feeding it: ``x`` for a one-input model, else the input's name."""
    from edge.errors import ConfigError

    names = list(specs)
    if len(names) == 1 and "x" in declared and names[0] not in declared:
        return {names[0]: "x"}
    missing = [n for n in names if n not in declared]
    if missing:
        want = "'x' (or the input's name)" if len(names) == 1 else f"one array per input {names}"
        raise ConfigError(f"{path} lacks the model input(s) {missing}; it has {sorted(declared)} (give {want})")
    return {n: n for n in names}
