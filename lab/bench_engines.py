"""Each engine's inference time on one model, and the default engine's ratio to the fastest (``edge bench engines``).

The engines are the model's files side by side (``M.onnx`` on onnxruntime, ``M.tflite`` on LiteRT;
:func:`edge.engines.find_engines`), each at its full-speed steady state (the session a settled
``hybrid`` runtime serves), timed in interleaved rounds with who goes first rotated
(:func:`edge.engines.compare_engines`). Every ratio is paired: the median over rounds of one
engine's round p50 over the other's in the same round. Reported per model: each engine's p50
and p99 and its ratio to the fastest; the engine each default runs and its ratio (issue 16's goal:
within 1.05x of the fastest fp32 engine), with its reason: ``Runtime(model)`` (no profile: the
file's own engine), ``Runtime(model, device=PROFILE)`` (with a profile and no backend named, the
engine measured fastest among the profile's backends, measured once, then read from its cache:
:func:`edge.engine_cache.cached_engine`) and ``Runtime(model, backend="auto")`` (the same without
a profile).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import EdgeError
from edge.machine import load_average

__all__ = ["GOAL", "add_arguments", "bench_engines", "cli", "markdown"]

GOAL = 1.05  #: issue 16: the default engine's p50 at most this times the fastest engine's (paired)


def bench_engines(
    model_path: str | Path,
    feeds: dict[str, np.ndarray],
    *,
    threads: int | None = None,
    rounds: int = 7,
    runs: int = 20,
    warmup: int = 5,
    device: str = "x86-dev",
) -> dict:
    """The engines found beside ``model_path`` compared on ``feeds``; the default's and auto's ratio to the fastest."""
    from edge.devices import load_profile
    from edge.engines import compare_engines, find_engines
    from edge.runtime import Runtime
    from runtimes import read_model_info

    load_profile(device)  # an unknown profile fails now, not after the timed rounds
    model_path = Path(model_path)
    found, skipped = find_engines(model_path)
    if not found:
        raise EdgeError(f"no engine here can run {model_path.name}: {skipped}")
    load_before = load_average()
    figures = compare_engines(found, feeds, threads=threads, rounds=rounds, runs=runs, warmup=warmup)
    rp = {b: np.asarray(f["round_p50_ms"]) for b, f in figures["engines"].items()}
    fastest = min(rp, key=lambda b: float(np.median(rp[b] / rp[figures["reference"]])))

    def x_fastest(backend: str | None) -> float | None:
        return None if backend not in rp else float(np.median(rp[backend] / rp[fastest]))

    defaults = {}  # what Runtime(model) and Runtime(model, device=...) run, read from the runtimes themselves
    for label, kwargs in (
        ("Runtime(model)", {}),
        (f"Runtime(model, device={device!r})", {"device": device}),
        ("Runtime(model, backend='auto')", {"backend": "auto"}),
    ):
        with Runtime(model_path, threads=threads, **kwargs) as rt:
            choice = rt.engine_choice
        value = x_fastest(choice.backend)
        defaults[label] = {
            "engine": choice.backend,
            "x_fastest": value,
            "reason": choice.reason,
            "limit": GOAL,
            "met": None if value is None else bool(value <= GOAL),
        }
    engines = {
        b: {k: f[k] for k in ("path", "providers", "p50_ms", "p99_ms", "max_abs_diff", "agrees")}
        | {"x_fastest": x_fastest(b)}
        for b, f in figures["engines"].items()
    }
    return {
        "model": read_model_info(model_path, found[0].backend).name,
        "path": str(model_path),
        "threads": threads,
        "rounds": rounds,
        "runs_per_round": runs,
        "load_avg": {"before": load_before, "after": load_average()},
        "engines": engines,
        "skipped": skipped,
        "fastest": fastest,
        "defaults": defaults,
    }


def markdown(result: dict) -> str:
    """One table per model, then the default engine against the goal and what ``backend="auto"`` runs."""
    load = result["load_avg"]["before"]
    lines = [
        f"**{result['model']}** ({Path(result['path']).name}), {result['threads'] or 'default'} threads, "
        f"{result['rounds']} interleaved rounds of {result['runs_per_round']} runs each at full speed; "
        f"ratios paired within rounds; load average {load[0] if load else '-'} before, "
        f"{(result['load_avg']['after'] or ['-'])[0]} after.",
        "",
        "| engine | file | providers | p50 ms | p99 ms | x fastest (paired) | outputs |",
        "|---|---|---|---|---|---|---|",
    ]
    for b, f in result["engines"].items():
        agree = "agree" if f["agrees"] else f"**differ** ({f['max_abs_diff']:.3g})"
        lines.append(
            f"| {b} | {Path(f['path']).name} | {', '.join(f['providers'])} | {f['p50_ms']:.3f} | {f['p99_ms']:.3f} "
            f"| {f['x_fastest']:.3f} | {agree} |"
        )
    lines.append("")
    lines += [f"- {b} not compared: {why}" for b, why in result["skipped"].items()]
    for label, d in result["defaults"].items():
        met = "-" if d["met"] is None else ("met" if d["met"] else "**not met**")
        shown = "-" if d["x_fastest"] is None else f"{d['x_fastest']:.3f}x"
        lines.append(
            f"- `{label}` runs {d['engine']}: {shown} the fastest ({result['fastest']}) in this run; goal <= "
            f"{d['limit']}x: {met}. Its choice: {d['reason']}"
        )
    return "\n".join(lines) + "\n"


def add_arguments(sp) -> None:
    sp.add_argument("--model", default="all", choices=["digits", "minilm", "all"], help="built-in model(s)")
    sp.add_argument("--model-file", help="an exported .onnx (its .tflite beside it) to bench instead (no torch)")
    sp.add_argument("--inputs", help="with --model-file: .npz of input arrays")
    sp.add_argument("--rounds", type=int, default=7, help="interleaved rounds (ratios paired within a round)")
    sp.add_argument("--runs", type=int, default=20, help="timed runs per engine per round")
    sp.add_argument("--device", default="x86-dev", help="the device profile whose default engine is reported too")


def cli(args) -> int:
    from edge.devices import load_profile
    from edge.machine import machine
    from lab.bench_run import bench_models, write_results

    load_profile(args.device)  # before building or timing anything
    results = [
        bench_engines(path, feeds, threads=args.threads, rounds=args.rounds, runs=args.runs, device=args.device)
        for path, feeds in bench_models(args, "engines", ("minilm", "digits"))
    ]
    out = {"models": results, "machine": machine(), "load_avg": load_average()}
    return write_results(args, out, results, markdown, "engines", "Engines: the default against the fastest")
