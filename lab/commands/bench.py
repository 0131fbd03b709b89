"""``edge bench NAME``: benchmarks that print JSON, and optionally write it and a BENCHMARKS.md section."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import tokenize

from edge.commands import output_path, runtime_flags

#: benchmark name -> "module:function"; the module also has ``add_arguments(parser)``.
BENCHES = {
    "switch": "lab.bench_switch:cli",
    "ood": "lab.bench_ood:cli",
    "update": "lab.bench_update:cli",
    "lowbit": "lab.bench_lowbit:cli",
    "memory": "lab.bench_memory:cli",
    "coldstart": "lab.bench_coldstart:cli",
    "fleet": "lab.bench_fleet:cli",
    "masks": "lab.bench_masks:cli",
    "quantized": "lab.bench_quantized:cli",
    "engines": "lab.bench_engines:cli",
}

#: benchmarks that take no ``--backend``: engines compares every engine beside the model, update runs the demo's
#: ``.onnx`` on onnxruntime (its sections are about numpy updates, not engines), fleet runs no model (nor threads),
#: coldstart runs ``edge.Runtime(model)`` and a plain session as a user writes them (their default engine and threads)
NO_ENGINE = {"engines", "update", "fleet", "coldstart"}
NO_THREADS = {"fleet", "coldstart"}

#: why benchmarks pin an engine rather than follow ``edge.Runtime``'s default
BACKEND_WHY = (
    "a benchmark measures one named engine and writes one section per engine; switch and quantized also take tflite"
)


def register(sub) -> None:
    sub.add_parser(
        "bench", help="benchmarks (JSON to stdout, optional --json and BENCHMARKS.md section)", deferred=_add_benches
    )


def _add_benches(b) -> None:
    """``edge bench``'s subcommands, added when ``edge bench ...`` is parsed or its help shown: ``edge --help`` imports
    no benchmark module, and ``edge bench --help`` none either (each bench's help is the first line of its module's
    docstring, read from the source). A bench's module is imported when its own parser is used (:func:`_add_bench`)."""
    bsub = b.add_subparsers(dest="bench", required=True)
    for name, target in BENCHES.items():
        bsub.add_parser(name, help=_summary(name, target), deferred=functools.partial(_add_bench, name, target))


def _add_bench(name: str, target: str, sp) -> None:
    """One bench's flags (shared ones, then its module's ``add_arguments``) and its function: imports its module."""
    module = importlib.import_module(target.split(":")[0])
    runtime_flags(
        sp, backend="onnxruntime", why=BACKEND_WHY, engine=name not in NO_ENGINE, threads=name not in NO_THREADS
    )
    sp.add_argument("--json", type=output_path, help="write the JSON here")
    sp.add_argument("--md", type=output_path, help="update this Markdown file's section (e.g. BENCHMARKS.md)")
    module.add_arguments(sp)
    sp.set_defaults(func=getattr(module, target.split(":")[1]))


def _summary(name: str, target: str) -> str:
    """The first line of the docstring of ``target``'s module, read from its source without importing it."""
    module = target.split(":")[0]
    spec = importlib.util.find_spec(module)  # imports the package (lab), not the module
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ModuleNotFoundError(f"benchmark {name!r}: no Python source for module {module!r} (BENCHES)", name=module)
    with open(spec.origin, "rb") as f:
        for tok in tokenize.tokenize(f.readline):  # stops at the docstring: the first tokens of the file
            if tok.type == tokenize.STRING:
                return (ast.literal_eval(tok.string).strip().splitlines() or [""])[0]
            if tok.type not in (tokenize.ENCODING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE):
                return ""
    return ""
