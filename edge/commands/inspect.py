"""``edge inspect FILE``: metadata of a model or adapter file."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    i = sub.add_parser("inspect", help="print the metadata of a model (.onnx) or adapter (.safetensors)")
    i.add_argument("file")
    i.set_defaults(func=run)


def run(args) -> int:
    path = Path(args.file)
    if path.suffix.lower() != ".safetensors":
        from runtimes import read_model_info

        print(json.dumps(json.loads(read_model_info(path).to_json()), indent=1))
        return 0
    from edge.format.adapter import load_adapter

    a = load_adapter(path)
    summary = {
        "name": a.name,
        "method": a.method,
        "base_fingerprint": a.base_fingerprint,
        "nnz": a.nnz,
        "bytes": path.stat().st_size,
        "targets": {k: list(v) for k, v in a.shapes.items()},
        "info": a.info,
    }
    print(json.dumps(summary, indent=1))
    return 0
