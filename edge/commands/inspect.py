"""``edge inspect FILE``: metadata of a model or adapter file (read bounded, validated, never decoded)."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    i = sub.add_parser("inspect", help="print the metadata of a model (.onnx) or adapter (.safetensors)")
    i.add_argument("file")
    i.set_defaults(func=run)


def run(args) -> int:
    from edge.format.io import check_regular

    path = Path(args.file)
    if path.suffix.lower() != ".safetensors":
        from edge.errors import ConfigError
        from runtimes import TABLE, read_model_info

        models = [s for _, suffixes in TABLE.values() for s in suffixes]
        if path.suffix.lower() not in models:
            raise ConfigError(
                f"{args.file}: inspect reads a model ({', '.join(models)}) or an adapter (.safetensors), by suffix; "
                "samples (.npz) are read by `edge update`"
            )

        check_regular(path, what="model file")  # onnx opens the file itself: no FIFO or device may reach it
        shown = json.loads(read_model_info(path).to_json())
        shown.update(input_shapes(path))
        print(json.dumps(shown, indent=1))
        return 0
    from edge.format.adapter import inspect_adapter

    print(json.dumps(inspect_adapter(path), indent=1))
    return 0


def input_shapes(path: Path) -> dict:
    """``input_shapes`` (per input: ``shape``, a size, a dimension's name such as ``"batch"``, or null for a free
    axis without a name; ``dtype``) and ``dims`` (per named dimension, the inputs that declare it: the names
    ``Runtime(dims=...)`` and ``--dim`` fix) of the model at ``path``, read from its graph or tensor table, never its
    weights. A .tflite's dimensions have no names (its first is shown as ``batch``: the runtime takes any batch)."""
    from edge.dims import declared
    from edge.engine_feeds import file_specs
    from runtimes import backend_for_path

    backend = backend_for_path(path)
    specs, _ = file_specs(backend, path)
    shapes = {}
    for name, spec in (specs or {}).items():
        shape = (
            None
            if spec.shape is None
            else [None if isinstance(d, str) and d.startswith("?") else d for d in spec.shape]
        )
        shapes[name] = {"shape": shape, "dtype": None if spec.dtype is None else str(spec.dtype)}
    named = {}
    if backend == "onnxruntime":
        for name, ds in declared(specs or {}).items():
            for d in ds:
                named.setdefault(d, []).append(name)
    return {"input_shapes": shapes, "dims": named}
