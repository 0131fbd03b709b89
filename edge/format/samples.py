"""Labelled samples and model inputs from ``.npz`` files, read as hostile data.

An ``.npz`` is a zip of ``.npy`` members. Before any array is loaded, each member's
``.npy`` header (``numpy.lib.format``) is read for its dtype and shape: object dtypes
are refused (nothing is ever unpickled), and the bytes the arrays will take, summed
over the file (or the folder), must stay under a limit, so a zip bomb is refused
before it expands. The zip's own size claims bound every read. On a device, the limit comes
from its profile (:func:`sample_limit`: a share of the memory budget the update leaves). Arrays in the
other byte order are converted to this machine's. Every refusal is a
:class:`~edge.errors.FormatError` (a damaged file) or :class:`~edge.errors.ConfigError`
(a readable file with the wrong contents).
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge.errors import ConfigError, FormatError
from edge.format.io import folder_files, read_bounded

if TYPE_CHECKING:
    from edge.format.feeds import InputSpec

#: what reading a damaged member raises (zipfile, zlib, numpy's .npy reader)
_DAMAGED = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)

__all__ = [
    "MAX_ARRAY_BYTES",
    "MAX_CLASSES",
    "MAX_NPZ_BYTES",
    "SAMPLES_SHARE",
    "batch_length",
    "check_headers",
    "check_labels",
    "load_samples",
    "npy_header",
    "read_npz",
    "sample_limit",
]

MAX_NPZ_BYTES = 1 << 30  # one .npz file on disk
MAX_ARRAY_BYTES = 1 << 30  # what its arrays (or a folder's) take in memory once loaded
MAX_MEMBERS = 1024
MAX_CLASSES = 100_000  # labels are class indices; a label this large is a data error, not a class
MAX_FILES = 10_000  # .npz files in one data folder
_NPY_HEADER = 10_000  # numpy's own default limit on an .npy header
_ZIP_SLACK = 1 << 20  # zip and .npy headers around the arrays of one file (a few hundred bytes in practice)
#: Share of a device's memory budget, after the update's own, that loaded samples may take. While a file
#: is read its bytes and its arrays are both resident (two shares for one big file); the third is for the
#: interpreter, numpy, the inference engine and the model. Measured (x86-64, peak RSS of `edge update`):
#: 77-86 MB with a handful of samples; 205 MB with 64 MB of samples in one file, the limit for a 256 MB
#: profile (a half share would have allowed 96 MB: about 270 MB, over the budget).
SAMPLES_SHARE = 1 / 3
_MB = 1 << 20


def sample_limit(memory_mb: float, update_mb: float, *, source: str = "the device") -> tuple[int, str]:
    """Bytes the loaded samples may take on a device with ``memory_mb``, and a sentence saying so.

    ``SAMPLES_SHARE`` of what the update's own budget ``update_mb`` leaves of ``memory_mb``,
    never over :data:`MAX_ARRAY_BYTES`. :class:`ConfigError` when the update alone takes it all.
    """
    if not memory_mb > 0 or not update_mb >= 0:
        raise ConfigError(f"memory budgets must be positive; got memory_mb {memory_mb}, update {update_mb} MB")
    left = memory_mb - update_mb
    if left <= 0:
        raise ConfigError(
            f"the update's budget of {update_mb:g} MB leaves nothing of {source}'s memory_mb {memory_mb:g} MB for "
            "the samples; pass a smaller --memory-mb"
        )
    share = int(SAMPLES_SHARE * left * _MB)
    why = (
        f"{SAMPLES_SHARE:.0%} of the {left:g} MB that {source}'s memory_mb {memory_mb:g} MB leaves after the "
        f"update's {update_mb:g} MB"
    )
    if share >= MAX_ARRAY_BYTES:
        return MAX_ARRAY_BYTES, f"the hard cap of {MAX_ARRAY_BYTES} bytes ({why} is more)"
    return share, why


def read_npz(
    path: str | os.PathLike,
    *,
    max_bytes: int = MAX_NPZ_BYTES,
    max_array_bytes: int = MAX_ARRAY_BYTES,
    limit_from: str | None = None,
    check: Callable[[dict[str, tuple[tuple, np.dtype]]], None] | None = None,
) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, bounded and checked before loading (see the module doc).

    ``limit_from`` says where the limits come from; refusals quote it. ``check`` is called with every
    member's ``(shape, dtype)``, read from the ``.npy`` headers, before any array is loaded.
    """
    what = (
        "data file" if limit_from is None else f"data file (limit: {limit_from}; update with fewer samples at a time)"
    )
    data = read_bounded(path, max_bytes, what=what)
    if data[:6] == b"\x93NUMPY":
        raise FormatError(f"{path} is a single .npy array, not an .npz; save with np.savez(path, x=..., y=...)")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (*_DAMAGED, zipfile.LargeZipFile) as e:  # NotImplementedError: a zip version or method it lacks
        raise FormatError(f"{path} is not an .npz (zip) file numpy can read: {e}") from e
    with zf:
        members, headers = _members(zf, path, max_array_bytes, limit_from)
        if check is not None:
            check(headers)
        out = {}
        for key, info in members.items():
            try:
                with zf.open(info) as f:
                    arr = np.lib.format.read_array(f, allow_pickle=False, max_header_size=_NPY_HEADER)
            except _DAMAGED as e:
                raise FormatError(f"{path}: member {key!r} is damaged: {e}") from e
            if arr.dtype.byteorder == ">" if np.little_endian else arr.dtype.byteorder == "<":
                arr = arr.astype(arr.dtype.newbyteorder("="))
            out[key] = arr
    return out


def npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path) -> tuple[tuple, np.dtype]:
    """``(shape, dtype)`` of one ``.npy`` member of an open ``.npz``, from its header alone (nothing else is read);
    a damaged header or an array of Python objects is a :class:`FormatError` naming the member."""
    key = info.filename.removesuffix(".npy")
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0), (3, 0)):
                raise ValueError(f".npy format version {version} is not supported")
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(f, max_header_size=_NPY_HEADER)
    except (*_DAMAGED, SyntaxError) as e:
        raise FormatError(f"{path}: member {key[:80]!r} has no readable .npy header: {e}") from e
    if dtype.hasobject:
        raise FormatError(f"{path}: member {key[:80]!r} holds Python objects ({dtype}); only plain arrays are read")
    return tuple(shape), dtype


def _members(zf: zipfile.ZipFile, path, max_array_bytes: int, limit_from: str | None) -> tuple[dict, dict]:
    """Member name -> ZipInfo, and -> ``(shape, dtype)``, after checking every ``.npy`` header and the total size
    the arrays take."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise FormatError(f"{path}: {len(infos)} members, more than the {MAX_MEMBERS} an .npz of samples needs")
    members: dict[str, zipfile.ZipInfo] = {}
    headers: dict[str, tuple[tuple, np.dtype]] = {}
    total = 0
    for info in infos:
        if not info.filename.endswith(".npy") or info.is_dir():
            raise FormatError(f"{path}: member {info.filename[:80]!r} is not an .npy array")
        key = info.filename[:-4]
        if key in members:
            raise FormatError(f"{path}: member {key[:80]!r} appears twice")
        shape, dtype = npy_header(zf, info, path)
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise FormatError(f"{path}: member {key!r} declares shape {shape}")
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        total += nbytes
        if total > max_array_bytes:
            why = f" ({limit_from})" if limit_from else ""
            raise FormatError(
                f"{path}: arrays would take {total} bytes in memory (member {key!r}: {shape} {dtype}), over the "
                f"limit of {max_array_bytes} bytes{why} left for samples; update with fewer samples at a time "
                "(one `edge update --state S` per part)"
            )
        members[key], headers[key] = info, (shape, dtype)
    return members, headers


def _resolved(f: Path) -> Path:
    """``f`` with its links followed; a link loop is a :class:`FormatError` naming it (pathlib's RuntimeError)."""
    try:
        return f.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise FormatError(f"data file {f}: {getattr(e, 'strerror', None) or e}; remove it or give the file") from e


def load_samples(
    path: str | os.PathLike,
    inputs: tuple[str, ...] = ("x",),
    *,
    max_array_bytes: int = MAX_ARRAY_BYTES,
    limit_from: str | None = None,
    specs: Mapping[str, InputSpec] | None = None,
) -> list[tuple[str, object, np.ndarray]]:
    """Labelled samples from an ``.npz`` file or a folder of them (sorted by name): ``[(name, x, y)]``.

    Each file holds ``y`` (integer labels) and either ``x`` (for a one-input model)
    or one array per model input name; ``x`` is returned as an array or a dict. Files of
    a folder must be regular files inside it (a link leading out of the folder is
    refused); their arrays together must fit ``max_array_bytes`` (``limit_from``: where that
    figure comes from, quoted when refused), and no file may be larger than what is left of it.
    Before any array is loaded, the ``.npy`` headers must show the labels, one per sample (1-D, a
    number type), and the inputs; with ``specs`` (the model's inputs), each input's dtype, rank and
    fixed dimensions as the model takes them (:func:`check_headers`).
    """
    path = Path(path)
    if path.is_dir():
        root = path.resolve()
        files = folder_files(path, ".npz", MAX_FILES, what="folder", fix="merge some")
        if not files:
            raise ConfigError(f"folder {path} holds no .npz files; give an .npz with 'x' and 'y' or a folder of them")
        outside = [f.name for f in files if _resolved(f).parent != root]
        if outside:
            raise FormatError(f"data folder {path}: {outside[:5]} lead outside the folder (links); refused")
    elif path.exists():
        files = [path]
    else:
        raise ConfigError(f"no such data file or folder: {path}")
    out = []
    budget = max_array_bytes
    for f in files:
        file_cap = min(MAX_NPZ_BYTES, budget + _ZIP_SLACK)  # its bytes are resident while it is read
        arrays = read_npz(
            f,
            max_bytes=file_cap,
            max_array_bytes=budget,
            limit_from=limit_from,
            check=lambda headers, f=f: check_headers(f, headers, inputs, specs),
        )
        budget -= sum(a.nbytes for a in arrays.values())
        x: object = arrays["x"] if "x" in arrays and len(inputs) == 1 else {k: arrays[k] for k in inputs}
        out.append((f.name, x, arrays["y"]))
    return out


def check_headers(path, headers: Mapping[str, tuple], inputs: tuple[str, ...], specs=None) -> None:
    """Refuse samples that cannot be an update's from their ``.npy`` headers (``{member: (shape, dtype)}``) alone,
    before anything is loaded (see :func:`load_samples`); a :class:`ConfigError` naming the member."""
    if "y" not in headers:
        raise ConfigError(f"{path} has no 'y' array of labels (it has {sorted(headers)})")
    keys = {"x": inputs[0]} if "x" in headers and len(inputs) == 1 else {k: k for k in inputs}
    missing = [k for k in keys if k not in headers]
    if missing:
        raise ConfigError(f"{path} lacks the model input(s) {missing}; it has {sorted(headers)} (use 'x' and 'y')")
    scalars = [k for k in keys if not headers[k][0]]
    if scalars:
        raise ConfigError(f"{path}: model input(s) {scalars} are scalars; give arrays whose first axis is the batch")
    (y_shape, y_dtype) = headers["y"]
    if y_dtype.kind not in "iuf":
        raise ConfigError(f"{path}: labels must be integer class indices, got dtype {y_dtype}")
    if len(y_shape) != 1:
        raise ConfigError(f"{path}: labels must be a 1-D array with one label per sample, got shape {y_shape}")
    sizes: dict[str, tuple[int, str]] = {}  # a symbolic dimension the inputs share (a sequence) -> first size seen
    for key, name in keys.items():
        shape, dtype = headers[key]
        if shape[0] != y_shape[0]:
            raise ConfigError(
                f"{path}: {key!r} holds {shape[0]} samples for {y_shape[0]} labels in 'y'; give one label per sample"
            )
        spec = (specs or {}).get(name)
        if spec is None or spec.dtype is None:
            continue
        if dtype.newbyteorder("=") != spec.dtype and not (dtype.kind in "iu" and spec.dtype.kind in "iu"):
            raise ConfigError(f"{path}: {key!r} is {dtype}; input {name!r} takes {spec.dtype} (save it as that)")
        if spec.shape is None:  # the model declares no shape for it (any rank): its dtype is all there is to check
            continue
        fixed = [d if isinstance(d, int) else None for d in spec.shape[1:]]
        if len(shape) != len(spec.shape) or any(w is not None and g != w for g, w in zip(shape[1:], fixed)):
            takes = ", ".join(str(d) for d in spec.shape[1:])
            raise ConfigError(f"{path}: {key!r} has shape {shape}; input {name!r} takes [N, {takes}]")
        for got, want in zip(shape[1:], spec.shape[1:]):
            if isinstance(want, str) and sizes.setdefault(want, (got, key))[0] != got:
                raise ConfigError(
                    f"{path}: dimension {want!r} is {sizes[want][0]} in {sizes[want][1]!r} but {got} in {key!r}; "
                    "use one size"
                )


def batch_length(x) -> int:
    """Samples in ``x`` (an array, or a dict of equally long arrays)."""
    arrays = {k: np.asarray(v) for k, v in x.items()} if isinstance(x, Mapping) else {"x": np.asarray(x)}
    scalars = [k for k, v in arrays.items() if v.ndim == 0]
    if scalars:
        raise ConfigError(f"model input(s) {scalars[:5]} are scalars; give arrays whose first axis is the batch")
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
        raise ConfigError(f"model inputs have different batch sizes: {sorted(lengths)}")
    return lengths.pop()


def check_labels(y, n: int) -> np.ndarray:
    """``y`` as int64 class indices, one per sample; :class:`ConfigError` otherwise."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ConfigError(f"labels must be a 1-D array with one label per sample ({n}), got shape {y.shape}")
    if n == 0:
        raise ConfigError("no samples given; an update needs at least one labelled sample")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.equal(np.mod(y, 1), 0)):
            raise ConfigError(f"labels must be integer class indices, got dtype {y.dtype}")
    lo, hi = y.min(), y.max()  # before the cast, which would wrap a float 1e30 or a uint64 2**63 round
    if lo < 0 or hi >= MAX_CLASSES:
        raise ConfigError(f"labels must be class indices in [0, {MAX_CLASSES}), got {lo}..{hi}")
    return y.astype(np.int64)
