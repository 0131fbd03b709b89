"""``edge profile MODEL --device NAME``: load, latency, switch and memory figures measured on this machine."""

from __future__ import annotations

from pathlib import Path

from edge.commands import output_path
from edge.commands.devices import devices_dir_flag

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="measure load, latency (p50/p95/p99), switch time and peak memory of a model on this machine",
    )
    p.add_argument("model", type=Path, help="exported model (.onnx, or .tflite with --inputs)")
    p.add_argument("--device", required=True, help="device profile name (see `edge devices`) or path to a .yaml")
    devices_dir_flag(p)
    p.add_argument("--adapters", nargs="*", type=Path, default=[], metavar="A.safetensors", help="adapters to switch")
    p.add_argument("--runs", type=int, default=200, help="timed inference runs (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed runs before timing (default 20)")
    p.add_argument("--switches", type=int, default=20, help="timed switches per adapter (default 20)")
    p.add_argument("--inputs", type=Path, help=".npz with one array per model input (default: generated)")
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        help="size of the named dimensions generated inputs leave free (default 1); those --dim or the profile's dims "
        "fix keep their size: --batch N with dims batch=M is refused",
    )
    p.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=SIZE",
        help="fix the model's named input dimension NAME to SIZE in every session (repeatable; over the profile's "
        "dims), as edge.Runtime(MODEL, dims={NAME: SIZE}); generated inputs take these sizes",
    )
    p.add_argument(
        "--backend",
        default=None,
        help="engine to profile: onnxruntime or tflite pins one; default auto, what edge.Runtime(MODEL, "
        "device=NAME) runs with no backend: the engine measured fastest here among MODEL's files for the profile's "
        "backends (MODEL.onnx, MODEL.tflite side by side), measured once and kept in the engine cache that a "
        "device reads back, adapters of twin files (exported from the same weights) included",
    )
    p.add_argument(
        "--engine-rounds",
        type=int,
        default=5,
        help="with --backend NAME: compare the engines found beside the model in this many interleaved rounds "
        "(0: do not compare); with auto the report shows the comparison behind the choice",
    )
    p.add_argument(
        "--clip",
        action="store_true",
        help="on an int8 model: clip adapter entries past the integer range (counted in the results) instead of "
        "refusing the adapter",
    )
    p.add_argument("--json", type=output_path, help="write the results as JSON here")
    p.add_argument("--md", type=output_path, help="write a Markdown summary here")
    p.add_argument("--png", type=output_path, help="write a plot here (needs matplotlib)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


#: upper bounds of the counting flags (a million runs of a 1 ms model already take 17 minutes)
_MOST = {"runs": 1_000_000, "warmup": 1_000_000, "switches": 100_000, "engine_rounds": 1_000}


def run(args) -> int:
    from edge.errors import ConfigError
    from edge.format.io import write_json
    from edge.profiling import ProfileConfig, format_markdown, plot, profile_model

    for flag in ("runs", "switches", "batch"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("warmup", "engine_rounds"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be 0 or more, got {getattr(args, flag)}")
    for flag, most in _MOST.items():  # 10**20 runs is a typo, not a measurement: refused, not run for ever
        if getattr(args, flag) > most:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at most {most}, got {getattr(args, flag)}")
    from edge.dims import parse_dim_flags

    dims = parse_dim_flags(args.dim)
    cfg = ProfileConfig(
        runs=args.runs,
        warmup=args.warmup,
        switches=args.switches,
        batch=args.batch,
        progress=not args.quiet,
        engine_rounds=args.engine_rounds,
        clip=args.clip,
    )
    result = profile_model(
        args.model,
        args.device,
        adapters=args.adapters,
        inputs=args.inputs,
        backend=args.backend or "auto",  # --device is always given: Runtime's rule for no backend with a device
        config=cfg,
        devices_dir=args.devices_dir,
        dims=dims,
    )
    md = format_markdown(result)
    print(md)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.md:
        from edge.format.io import atomic_write_bytes

        atomic_write_bytes(args.md, md.encode())
        print(f"wrote {args.md}")
    if args.png:
        if plot(result, args.png):
            print(f"wrote {args.png}")
        else:
            print(f"skipped {args.png}: matplotlib is not installed (pip install matplotlib)")
    return 0
