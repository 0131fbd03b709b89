"""The key of a tapped copy in the tap cache (:mod:`edge.route.tapcache`): a hash of everything its bytes depend on.

That is the sha256 of the model file; for each external data file it names, its size and the sha256 of the byte
ranges its tensors declare (``offset``/``length``; to the end of the file without a length: what onnx reads), so a
4 GB data file whose tensors take 64 bytes costs a 64-byte read; its file name, the tap arguments, :data:`TAP_FORMAT`,
the package version, a hash of every ``.py`` file of the installed ``edge`` package (about 3 ms for ~110 files) and
the installed onnx, onnxruntime, protobuf (it serializes the tapped bytes) and numpy distributions (their
``*.dist-info`` folder names: onnx is not imported, nor is ``importlib.metadata``, ~30 ms).
A model whose external data would pass protobuf's 2 GB limit (as declared by its
tensors' shapes, or by the ranges they read) is refused (:class:`ConfigError`) before any of it is read, as
:func:`edge.convert.onnx_source.read_onnx` would refuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Mapping
from math import prod
from pathlib import Path

from edge.errors import ConfigError, FormatError

__all__ = ["FORMAT", "TAP_FORMAT", "file_sha256", "source_key"]

#: bump when :func:`~edge.route.taps.tap_model` writes other bytes for the same model and arguments
FORMAT, TAP_FORMAT = "edge.tap-cache", 2
_MAX_EXTERNAL = 64  # external data files hashed for the key; more: tapped uncached
_CHUNK = 1 << 20
PROTOBUF_LIMIT = (1 << 31) - 1  # as edge.convert.onnx_source (not imported here: it imports numpy's onnx side)
#: bytes per element of ONNX element types (others, STRING and the 4/8-bit ones: 1, as read_onnx counts them)
_ITEM = {1: 4, 4: 2, 5: 2, 6: 4, 7: 8, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2}
#: distribution -> (module found to locate it, name pattern of its flavours: onnxruntime-gpu, onnxruntime_openvino);
#: protobuf serializes the tapped bytes (its output is not stable across versions: "Proto Serialization Is Not
#: Canonical", protobuf.dev); numpy computes the constants the tap folds (edge.route.tapfold)
_DISTS = {
    "onnx": ("onnx", ""),
    "onnxruntime": ("onnxruntime", "([-_][a-z0-9_]+)?"),
    "protobuf": ("google.protobuf", ""),
    "numpy": ("numpy", ""),
}


def source_key(model: Path, taps: str, layout: Mapping[str, str]) -> dict:
    """What the tapped bytes depend on (see the module doc); :class:`FormatError` when the model cannot be hashed,
    :class:`ConfigError` when its external data is over protobuf's limit."""
    import edge

    sha, named = _hash_model(model)
    external = _hash_external(model, _external_ranges(model)) if named else []
    return {
        "format": FORMAT,
        "version": TAP_FORMAT,
        "edge": edge.__version__,
        "code": code_digest(Path(edge.__file__).resolve().parent),
        "dists": dist_versions(),
        "name": model.name,
        "sha256": sha,
        "external": external,
        "taps": taps,
        "layout": sorted([str(k), str(v)] for k, v in layout.items()),
    }


_DIGESTS: dict[str, str] = {}


def code_digest(root: Path) -> str:
    """sha256 over every ``.py`` file under the package folder ``root`` (relative name and content, sorted), once
    per process; an edited or upgraded package never reuses an older tap. A package in a zip hashes nothing (its
    version is in the key)."""
    if str(root) in _DIGESTS:
        return _DIGESTS[str(root)]
    files = []
    for folder, subs, names in os.walk(root):
        subs[:] = sorted(s for s in subs if s != "__pycache__")
        files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with contextlib.suppress(OSError), open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    _DIGESTS[str(root)] = h.hexdigest()[:16]
    return _DIGESTS[str(root)]


def dist_versions() -> list[str]:
    """The ``NAME-VERSION.dist-info`` folders of onnx, onnxruntime (any flavour), protobuf and numpy beside where
    they are installed, found without importing them; ``importlib.metadata`` only when no such folder is there; and
    ``$PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION`` when set."""
    import importlib.util

    out = []
    for name, (module, flavour) in _DISTS.items():
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            out.append(f"{name}: not installed")
            continue
        site = Path(next(iter(spec.submodule_search_locations))).parents[module.count(".")]
        pattern = re.compile(rf"{name}{flavour}-[^-]+\.(dist|egg)-info", re.IGNORECASE)
        try:
            found = sorted(e.name for e in os.scandir(site) if pattern.fullmatch(e.name))
        except OSError:
            found = []
        if not found:
            import importlib.metadata

            try:
                found = [f"{name}-{importlib.metadata.version(name)}"]
            except importlib.metadata.PackageNotFoundError:
                found = [f"{name}: no distribution"]
        out += found
    impl = os.environ.get("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION")  # upb, cpp or python: each serializes its own way
    return out + ([f"protobuf implementation: {impl}"] if impl else [])


def file_sha256(path: Path, *, what: str, size: int | None = None) -> tuple[int, str]:
    """(size, sha256) of the regular file ``path``, read in chunks; with ``size``, a file of another size is a
    :class:`FormatError` (truncated or rewritten) and is not read."""
    from edge.format.io import open_regular

    fd, st = open_regular(path, what=what)
    try:
        if size is not None and st.st_size != size:
            raise FormatError(f"{what} {path} is {st.st_size} bytes, not the {size} recorded (truncated or rewritten)")
        h = hashlib.sha256()
        _read_range(fd, 0, st.st_size, h, f"{what} {path}")
        return st.st_size, h.hexdigest()
    except OSError as e:
        raise FormatError(f"cannot read {what} {path}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def _read_range(fd: int, start: int, end: int, h, what: str, *, tail: bytes | None = None) -> bool:
    """Hash bytes ``[start, end)`` of ``fd`` into ``h``; True when they hold ``location`` (``tail`` given)."""
    named, carry, at = False, b"", os.lseek(fd, start, os.SEEK_SET)
    while at < end:
        chunk = os.read(fd, min(end - at, _CHUNK))
        if not chunk:
            raise FormatError(f"{what} changed size while being read; try again")
        h.update(chunk)
        if tail is not None:
            named = named or b"location" in chunk or b"location" in carry + chunk[:7]
            carry = chunk[-7:]
        at += len(chunk)
    return named


def _hash_model(model: Path) -> tuple[str, bool]:
    """The model file's sha256, and whether its bytes hold ``location`` (external data is named so; without it
    the file names none and is not parsed)."""
    from edge.format.io import open_regular

    fd, st = open_regular(model, what="model file")
    try:
        h = hashlib.sha256()
        named = _read_range(fd, 0, st.st_size, h, f"model file {model}", tail=b"")
        if os.fstat(fd).st_size != st.st_size:
            raise FormatError(f"model file {model} changed size while being read; try again")
        return h.hexdigest(), named
    except OSError as e:
        raise FormatError(f"cannot read model file {model}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def _external_ranges(model: Path) -> list[tuple[str, int, int | None, int]]:
    """(location, offset, length or None, declared bytes) of every tensor whose data is external, from the graph
    read at the wire level (no onnx import): initializers, node attributes, subgraphs, local functions."""
    from runtimes.loading import model_buffer
    from runtimes.onnx_file import parse_graph_bytes, tensor_proto

    with model_buffer(model) as (buf, _):
        small, inits, _ = parse_graph_bytes(buf)
        try:
            tensors = [tensor_proto(buf, s) for s in inits.values() if s.external]
        except Exception as e:  # protobuf's DecodeError: tap_model says what is wrong with the file
            raise FormatError(f"{model}: an initializer does not parse: {e}") from e
    tensors += _graph_tensors(small.graph, top=True)
    for function in small.functions:
        tensors += _graph_tensors(function, top=True)
    out = []
    for t in tensors:
        if t.data_location != 1:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location) or ".." in Path(location).parts or "\0" in location:
            raise FormatError(f"external data location {location!r} of {model} is outside its folder")
        try:
            offset, length = int(info.get("offset") or 0), info.get("length")
            length = None if length is None else int(length)
        except ValueError as e:
            raise FormatError(f"{model}: external data of {t.name!r} has an offset or length that is no number") from e
        if offset < 0 or (length is not None and length < 0):
            raise FormatError(f"{model}: external data of {t.name!r} has a negative offset or length")
        out.append((location, offset, length, prod(max(0, d) for d in t.dims) * _ITEM.get(t.data_type, 1)))
    if len({r[0] for r in out}) > _MAX_EXTERNAL:
        raise FormatError(f"{model} names {len({r[0] for r in out})} external data files, over the {_MAX_EXTERNAL}")
    return out


def _graph_tensors(graph, top: bool = False) -> list:
    """Tensors of nodes' attributes (and of subgraphs, with their initializers), as onnx loads external data."""
    out = [] if top else list(graph.initializer)
    for node in graph.node:
        for a in node.attribute:
            out += ([a.t] if a.HasField("t") else []) + list(a.tensors)
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out += _graph_tensors(g)
    return out


def _hash_external(model: Path, ranges: list[tuple[str, int, int | None, int]]) -> list:
    """[location, size, sha256 of its declared ranges] per external data file; refused (:class:`ConfigError`, before
    reading) when the data would pass protobuf's limit, as read_onnx refuses it."""
    from edge.format.io import open_regular

    files: dict[str, tuple[int, os.stat_result]] = {}
    try:
        for location in sorted({r[0] for r in ranges}):
            files[location] = open_regular(model.parent / location, what="external data")
        spans = set()
        for location, offset, length, _ in ranges:
            size = files[location][1].st_size
            spans.add((location, min(offset, size), size if length is None else min(offset + length, size)))
        size = os.stat(model).st_size
        declared, read = sum(r[3] for r in ranges), sum(b - a for _, a, b in spans)
        if size + max(declared, read) > PROTOBUF_LIMIT:
            raise ConfigError(
                f"{model}: {size + max(declared, read):,} bytes with its external data (its tensors declare "
                f"{declared:,}, their ranges span {read:,}), over protobuf's 2 GB limit ({PROTOBUF_LIMIT:,}) on one "
                "ONNX file; a tapped model is one self-contained file, so models this large are not supported: "
                "export a smaller model (nothing of its external data was read)"
            )
        out = []
        for location, (fd, st) in files.items():
            h = hashlib.sha256()
            for _, a, b in sorted(s for s in spans if s[0] == location):
                h.update(f"{a}:{b}\0".encode())
                _read_range(fd, a, b, h, f"external data {model.parent / location}")
            out.append([location, st.st_size, h.hexdigest()])
        return out
    except OSError as e:
        raise FormatError(f"cannot read the external data of {model}: {e.strerror or e}") from e
    finally:
        for fd, _ in files.values():
            os.close(fd)
