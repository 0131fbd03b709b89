"""``edge import-tflite IN.tflite --out OUT.tflite``: make a float32 .tflite converted elsewhere adapter-ready."""

from __future__ import annotations

import json
from pathlib import Path

from edge.commands import other_importer_hint, output_path, refuse_overwriting


def register(sub) -> None:
    p = sub.add_parser(
        "import-tflite",
        help="make a float32 .tflite model converted elsewhere (litert-torch, TF Lite converter) adapter-ready",
        description="Find the float32 weights that FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D, BATCH_MATMUL, "
        "EMBEDDING_LOOKUP and GATHER operators read, record them (in their stored layout, with the weights' "
        "fingerprint) in this project's metadata, check the result computes the same outputs on LiteRT and "
        "write it to --out. Quantized and float16 files are refused: convert in float32, import, then "
        "`edge quantize`.",
    )
    p.add_argument("path", type=Path, help="the .tflite model to import")
    p.add_argument("--out", type=output_path, required=True, help="the adapter-ready .tflite file to write")
    p.add_argument("--targets", nargs="+", help="keep only these stored tensor names")
    p.add_argument("--name", help="model name in the metadata (default: the file name without suffix)")
    p.add_argument("--signature", help="the signature to serve, for a file with several (its subgraph goes first)")
    p.set_defaults(func=run)


def run(args) -> int:
    from edge.convert.tflite_import import import_tflite

    refuse_overwriting(args.out, args.path)
    with other_importer_hint(args.path, "tflite"):
        report = import_tflite(args.path, args.out, name=args.name, targets=args.targets, signature=args.signature)
    summary = {
        "out": str(args.out),
        "name": report.info.name,
        "fingerprint": report.info.fingerprint,
        "targets": {k: {"tensor": v, "op": report.readers[v]} for k, v in report.targets.items()},
        "tied": report.tied,
    }
    print(json.dumps(summary, indent=1))
    return 0
