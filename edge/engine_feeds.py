"""The inputs engines are compared on (:mod:`edge.engines`): generated from an ``.onnx`` file's inputs, at the sizes
``dims`` fixes (:mod:`edge.dims`), and cast to the dtypes each engine's file takes (only integer casts that keep
every value). Device side only: numpy and the backends' file readers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edge.errors import ConfigError

__all__ = ["cast_feeds", "feeds_for", "file_specs", "generated_feeds"]

_MAX_MODEL_BYTES = 1 << 40  # as edge.runtime: model files are trusted; the limit keeps a device file finite


def file_specs(backend: str, path) -> tuple[dict | None, object]:
    """The input specs of ``path`` for ``backend`` and what the backend is built from: the path for onnxruntime (it
    reads its weights from the file itself; the graph alone gives the inputs), else the file's bytes."""
    from edge.format.feeds import input_specs
    from edge.format.io import read_bounded

    if backend == "onnxruntime":
        from runtimes.base import model_buffer
        from runtimes.onnx_file import graph_bytes

        with model_buffer(path) as (buf, _):
            return input_specs(backend, graph_bytes(buf)), path
    data = read_bounded(path, _MAX_MODEL_BYTES, what="model file")
    return input_specs(backend, data), data


def feeds_for(engine, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` in the dtypes ``engine``'s file takes: only integer casts that keep every value (a model exported
    for LiteRT may take int32 token ids where its ONNX file takes int64); any other mismatch is a ConfigError."""
    specs, _ = file_specs(engine.backend, engine.path)
    return cast_feeds(feeds, specs or {}, engine)


def cast_feeds(feeds: Mapping[str, np.ndarray], specs, engine) -> dict[str, np.ndarray]:
    """``feeds`` in the dtypes ``engine`` takes; only integer-to-integer casts that keep every value."""
    out = {}
    for name, x in feeds.items():
        x = np.asarray(x)
        want = specs[name].dtype if name in specs else None
        if want is not None and want != x.dtype:
            y = x.astype(want)
            if x.dtype.kind not in "iu" or want.kind not in "iu" or not np.array_equal(y, x):
                raise ConfigError(
                    f"input {name!r} is {x.dtype}, {engine.path.name} on {engine.backend} takes {want}; "
                    "give inputs that both engines take"
                )
            x = y
        out[name] = x
    return out


def generated_feeds(engines: Sequence, dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Inputs made from the first .onnx file among ``engines`` (ConfigError if there is none): its named dimensions
    at the sizes ``dims`` fixes (default: each engine's own :attr:`~edge.engines.EngineFile.dims`), every other free
    one 1."""
    from edge.dims import fix_specs
    from edge.format.feeds import generate_inputs
    from runtimes import read_model_info

    onnx = next((e for e in engines if e.path.suffix == ".onnx"), None)
    if onnx is None:
        raise ConfigError("inputs can be generated only from an .onnx file; pass feeds (an .npz with --inputs)")
    names = read_model_info(onnx.path, onnx.backend).inputs
    dims = dict(getattr(onnx, "dims", ()) or ()) if dims is None else dict(dims)
    if not dims:
        return generate_inputs(onnx.path, names)
    specs, _ = file_specs("onnxruntime", onnx.path)  # the graph only, not the weights
    return generate_inputs(onnx.path, names, specs=fix_specs(specs or {}, dims, onnx.path.name))
