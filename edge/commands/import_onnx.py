"""``edge import-onnx IN.onnx --out OUT.onnx``: make an ONNX file exported elsewhere adapter-ready."""

from __future__ import annotations

import json
from pathlib import Path

from edge.commands import other_importer_hint, output_path, refuse_overwriting


def register(sub) -> None:
    p = sub.add_parser(
        "import-onnx",
        help="make an ONNX model exported elsewhere (torch.onnx, optimum, tf2onnx) adapter-ready",
        description="Find the MatMul/Gemm/Conv/Gather weights of an ONNX model, record them (with their layout "
        "and the weights' fingerprint) in this project's metadata and write the model to --out. With --state-dict "
        "or --hf the weights are named after the torch parameters of equal value, so PEFT and SHiRA adapters "
        "trained in torch apply to them.",
    )
    p.add_argument("path", type=Path, help="the ONNX model to import")
    p.add_argument("--out", type=output_path, required=True, help="the adapter-ready ONNX file to write")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--state-dict", type=Path, help="torch weights (.safetensors; pickle is refused)")
    names.add_argument("--hf", type=Path, help="Hugging Face model folder with model.safetensors")
    p.add_argument("--targets", nargs="+", help="keep only these weights (globs, or module names/suffixes)")
    p.add_argument("--name", help="model name in the metadata (default: the file name without suffix)")
    p.add_argument("--strict", action="store_true", help="fail when a name is unmatched, ambiguous or missing")
    p.add_argument(
        "--max-dense-mb",
        type=_cap,
        default=None,
        metavar="MB",
        help="the most MB the model's sparse tensors may take stored dense, all together (default 2048, protobuf's "
        "limit); they are also refused when storing them would not fit this machine's free memory",
    )
    p.set_defaults(func=run)


def _cap(text: str) -> float:
    """``--max-dense-mb``: a number of MB in the range :func:`edge.convert.onnx_densify.check_cap` takes (argparse
    turns the error into exit 2 and one line)."""
    import argparse

    from edge.convert.onnx_densify import check_cap
    from edge.errors import ConfigError

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-dense-mb takes a number of MB, got {text!r}; e.g. 512") from None
    try:
        return check_cap(value, "--max-dense-mb")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(args) -> int:
    from edge.convert.onnx_import import import_onnx

    refuse_overwriting(args.out, args.path, args.state_dict or args.hf)
    with other_importer_hint(args.path, "onnx"):
        report = import_onnx(
            args.path,
            args.out,
            state_dict=args.state_dict or args.hf,
            targets=args.targets,
            name=args.name,
            strict=args.strict,
            **({} if args.max_dense_mb is None else {"max_dense_mb": args.max_dense_mb}),
        )
    summary = {
        "out": str(args.out),
        "name": report.info.name,
        "fingerprint": report.info.fingerprint,
        "targets": len(report.info.tensors),
        "transposed": sum(t.transposed for t in report.info.tensors.values()),
        "batchnorm_folded": sorted(k for k, t in report.info.tensors.items() if t.channel_scale is not None),
        "renamed": len(report.renamed),
        "unmatched": list(report.unmatched),
        "ambiguous": {k: list(v) for k, v in report.ambiguous.items()},
        "missing": list(report.missing),
        "skipped": dict(report.skipped),
        "folded": list(report.folded),
        "tied": report.info.extra["imported"].get("tied", {}),
        "names": report.info.extra["imported"].get("names", {}),  # targets renamed from ONNX names no adapter takes
    }
    print(json.dumps(summary, indent=1))
    return 0
