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
        print(json.dumps(json.loads(read_model_info(path).to_json()), indent=1))
        return 0
    from edge.format.adapter import inspect_adapter

    print(json.dumps(inspect_adapter(path), indent=1))
    return 0
