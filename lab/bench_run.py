"""What the bench commands share: the models they run on, fresh child processes, and writing their results.

A figure that must not see what an earlier contestant allocated, loaded or warmed (resident memory,
cold start) comes from :func:`fresh_child`: a new Python process that runs one function of a lab
module on a JSON spec and prints its figures as one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edge.errors import EdgeError

__all__ = ["bench_models", "fresh_child", "rotated", "write_results"]

_ROOT = Path(__file__).resolve().parents[1]


def fresh_child(target: str, spec: dict, *, what: str, timeout: float = 900.0) -> dict:
    """Run ``target`` (``"lab.module:function"``, called with the JSON text of ``spec``) in a fresh Python process.

    Returns the JSON object the function printed last on stdout. Raises :class:`~edge.errors.EdgeError`
    naming ``what`` with the end of the child's stderr when it fails or prints no JSON object.
    """
    module, _, function = target.partition(":")
    if not module.startswith("lab.") or not function.isidentifier():
        raise EdgeError(f"fresh_child runs a function of a lab module ('lab.NAME:function'); given {target!r}")
    code = f"import sys, {module} as m; m.{function}(sys.argv[1])"
    try:
        r = subprocess.run(
            [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, cwd=_ROOT, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        raise EdgeError(f"{what} took longer than {timeout:.0f} s in its child process") from e
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise EdgeError(f"{what} failed (exit code {r.returncode}): {r.stderr.strip()[-2000:]}")
    try:
        out = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise EdgeError(f"{what} printed no JSON figures; its last line: {lines[-1][:200]!r}") from e
    if not isinstance(out, dict):
        raise EdgeError(f"{what} printed {type(out).__name__}, not a JSON object of figures")
    return out


def rotated(kinds: Sequence[str], r: int) -> list[str]:
    """Round ``r``'s order: ``kinds`` rotated by ``r``, so each goes first, second, ... equally often."""
    k = r % len(kinds)
    return [*kinds[k:], *kinds[:k]]


def bench_models(args, command: str, names: Sequence[str] = ("digits", "minilm")) -> list[tuple[Path, dict]]:
    """The (model path, feeds) pairs a bench command runs on: ``--model-file`` with ``--inputs`` (no torch), or the
    built-in models ``names`` (``--model all``) or the one ``--model`` names, built or read from the cache."""
    if getattr(args, "model_file", None):
        if not getattr(args, "inputs", None):
            raise EdgeError("--model-file needs --inputs (an .npz of the model's input arrays)")
        from edge.format.samples import read_npz

        return [(Path(args.model_file), read_npz(args.inputs))]  # bounded; a FIFO is refused, not waited on
    from edge.commands import host_needed
    from lab.bench_switch import bench_model

    host_needed(f"edge bench {command} (without --model-file)")
    chosen = list(names) if args.model == "all" else [args.model]
    return [bench_model(n, args.cache, quiet=args.quiet) for n in chosen]


def write_results(
    args, out: dict, results: Sequence[dict], markdown: Callable[[dict], str], key: str, title: str
) -> int:
    """Print ``out`` as JSON, write it to ``--json`` and the section ``key`` of ``--md`` (one block per result)."""
    from edge.format.io import write_json
    from lab.benchmarks import write_section

    print(json.dumps(out, indent=1))
    if args.json:
        write_json(args.json, out)
    if args.md:
        write_section(args.md, key, title, "\n".join(markdown(r) for r in results))
    return 0
