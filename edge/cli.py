"""The ``edge`` command. Heavy imports happen inside each command, so ``edge --help`` needs only numpy."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from edge.errors import EdgeError

DEFAULT_CACHE = Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge"))


def _host_needed(what: str):
    try:
        import torch  # noqa: F401
    except ImportError:
        raise EdgeError(
            f"{what} trains or exports models on the host and needs torch: pip install 'edge-adapt[host]' "
            "(device-only installs run exported models and adapters; see README)"
        ) from None


def cmd_demo(args) -> int:
    from edge.datasets import load_domains
    from edge.demo import evaluate_demo, format_table, write_json

    _host_needed("edge demo")
    from exporters.pipeline import DemoConfig, prepare_demo

    cfg = DemoConfig(seed=args.seed)
    art = prepare_demo(args.cache, cfg, progress=not args.quiet)
    domains = load_domains(cfg.domains, seed=cfg.seed)
    result = evaluate_demo(
        art.model, art.adapters, domains, backend=args.backend, strategy=args.strategy, threads=args.threads
    )
    result["artifacts"] = {"model": str(art.model), "adapters": {k: str(v) for k, v in art.adapters.items()}}
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def cmd_bench(args) -> int:
    if args.what == "switch":
        return _bench_switch(args)
    raise EdgeError(f"unknown benchmark {args.what!r}")


def _bench_switch(args) -> int:
    from edge._machine import machine
    from edge.bench_switch import bench_switch, markdown
    from edge.benchmarks import write_section
    from edge.demo import write_json

    models = []
    if args.model_file:
        import numpy as np

        feeds = dict(np.load(args.inputs)) if args.inputs else None
        if feeds is None:
            raise EdgeError("--model-file needs --inputs FILE.npz with one array per model input")
        models.append((Path(args.model_file), feeds))
    else:
        _host_needed("edge bench switch (without --model-file)")
        for name in ["digits", "minilm"] if args.model == "all" else [args.model]:
            models.append(_bench_model(name, args.cache, quiet=args.quiet))
    results = [
        bench_switch(
            path,
            feeds,
            backend=args.backend,
            density=args.density,
            threads=args.threads,
            runs=args.runs,
            progress=not args.quiet,
        )
        for path, feeds in models
    ]
    out = dict(results[-1])  # the largest model's figures at the top level
    out["models"] = results
    out["machine"] = machine()
    print(json.dumps(out, indent=1))
    if args.json:
        write_json(args.json, out)
    if args.md:
        write_section(
            args.md, f"switch:{args.backend}", f"Fused-mode switching on {args.backend}", markdown(results), None
        )
    return 0


def _bench_model(name: str, cache: Path, quiet: bool):
    import numpy as np

    if name == "digits":
        from edge.datasets import load_domains
        from exporters.pipeline import DemoConfig, prepare_demo

        art = prepare_demo(cache, DemoConfig(), progress=not quiet)
        x = load_domains(("rotate",))["clean"].x_test[:1]
        return art.model, {"pixels": np.ascontiguousarray(x)}
    if name == "minilm":
        from exporters import minilm

        path = cache / "minilm" / "all-MiniLM-L6-v2.onnx"
        if not path.exists():
            minilm.export_minilm(path, progress=not quiet)
        return path, minilm.tokenize(["An edge device adapts to drifting data."], seq_len=128)
    raise EdgeError(f"unknown bench model {name!r}; choose digits, minilm or all")


def cmd_inspect(args) -> int:
    path = Path(args.file)
    if path.suffix == ".onnx":
        import onnx

        from runtimes.onnxruntime import read_info

        info = read_info(onnx.load(str(path), load_external_data=False))
        print(info.to_json())
    else:
        from edge.adapters import load_adapter

        a = load_adapter(path)
        print(
            json.dumps(
                {
                    "name": a.name,
                    "method": a.method,
                    "base_fingerprint": a.base_fingerprint,
                    "nnz": a.nnz,
                    "targets": {k: list(v) for k, v in a.shapes.items()},
                    "info": a.info,
                },
                indent=1,
            )
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge", description="Edge adaptation runtime: fused-mode adapters on device.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the runtime decides")
    sub = p.add_subparsers(dest="command", required=True)

    def runtime_flags(sp):
        sp.add_argument("--backend", default="onnxruntime", help="inference backend (default: onnxruntime)")
        sp.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
        sp.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"artifact cache (default {DEFAULT_CACHE})")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    d = sub.add_parser("demo", help="train, export and switch adapters on the embedded digits default")
    runtime_flags(d)
    d.add_argument("--strategy", default="auto", help="weight-update strategy (default: the backend's best)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", type=Path, help="write the results as JSON here")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks (JSON to stdout, optional --json and BENCHMARKS.md section)")
    b.add_argument("what", choices=["switch"], help="which benchmark")
    runtime_flags(b)
    b.add_argument("--model", default="all", choices=["digits", "minilm", "all"], help="built-in model(s)")
    b.add_argument("--model-file", help="an exported .onnx to bench instead (device side, no torch)")
    b.add_argument("--inputs", help="with --model-file: .npz of input arrays")
    b.add_argument("--density", type=float, default=0.01, help="adapter density (default 0.01)")
    b.add_argument("--runs", type=int, default=200, help="timed inferences per contestant")
    b.add_argument("--json", type=Path, help="write the JSON here")
    b.add_argument("--md", type=Path, help="update this Markdown file's section (e.g. BENCHMARKS.md)")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("inspect", help="print the metadata of a model (.onnx) or adapter (.safetensors)")
    i.add_argument("file")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except EdgeError as e:
        print(f"edge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
