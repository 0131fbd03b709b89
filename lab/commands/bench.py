"""``edge bench NAME``: benchmarks that print JSON, and optionally write it and a BENCHMARKS.md section."""

from __future__ import annotations

import importlib

from edge.commands import output_path, runtime_flags

#: benchmark name -> "module:function"; the module also has ``add_arguments(parser)``.
BENCHES = {
    "switch": "lab.bench_switch:cli",
    "ood": "lab.bench_ood:cli",
    "update": "lab.bench_update:cli",
    "lowbit": "lab.bench_lowbit:cli",
    "memory": "lab.bench_memory:cli",
    "fleet": "lab.bench_fleet:cli",
    "masks": "lab.bench_masks:cli",
    "quantized": "lab.bench_quantized:cli",
    "engines": "lab.bench_engines:cli",
}

#: benchmarks that take no ``--backend``: engines compares every engine beside the model, update runs the demo's
#: ``.onnx`` on onnxruntime (its sections are about numpy updates, not engines), fleet runs no model (nor threads)
NO_ENGINE = {"engines", "update", "fleet"}
NO_THREADS = {"fleet"}

#: why benchmarks pin an engine rather than follow ``edge.Runtime``'s default
BACKEND_WHY = (
    "a benchmark measures one named engine and writes one section per engine; switch and quantized also take tflite"
)


def register(sub) -> None:
    sub.add_parser(
        "bench", help="benchmarks (JSON to stdout, optional --json and BENCHMARKS.md section)", deferred=_add_benches
    )


def _add_benches(b) -> None:
    """``edge bench``'s subcommands, added when ``edge bench ...`` is parsed or its help shown (each bench's help is
    its module's docstring, its flags its ``add_arguments``): ``edge --help`` imports no benchmark module."""
    bsub = b.add_subparsers(dest="bench", required=True)
    for name, target in BENCHES.items():
        module = importlib.import_module(target.split(":")[0])
        sp = bsub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        runtime_flags(
            sp, backend="onnxruntime", why=BACKEND_WHY, engine=name not in NO_ENGINE, threads=name not in NO_THREADS
        )
        sp.add_argument("--json", type=output_path, help="write the JSON here")
        sp.add_argument("--md", type=output_path, help="update this Markdown file's section (e.g. BENCHMARKS.md)")
        module.add_arguments(sp)
        sp.set_defaults(func=getattr(module, target.split(":")[1]))
