"""Resident memory, peak memory and cold start of a plain session and of each strategy (``edge bench memory``).

Every figure comes from a fresh child process, so nothing a previous contestant
allocated (or the allocator kept) is counted. A baseline child imports the same
modules and loads the same inputs; ``rss_mb`` is the resident memory above it after
warm-up and one adapter switch cycle (a random SHiRA adapter, switched on and off, the
background rebuild settled), ``peak_mb`` the high-water mark (``VmHWM``) above it over
the whole life of the child, ``ready_ms`` the time from construction to the first
inference returned and ``settled_ms`` to the point where the full-speed session
serves (``hybrid`` builds it in the background). Children run interleaved, ``--repeat``
times each; the median is reported. Every child imports numpy (with numpy.random), onnx,
onnxruntime and ``edge.runtime`` before measuring, and makes and drops the probe adapter once after its
timed load: library code is not counted, only what a model costs (the adapter's arrays are counted).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge.errors import EdgeError
from edge.machine import load_average, reset_peak_rss, status_mb

__all__ = ["GOALS", "add_arguments", "bench_memory", "cli", "markdown"]

#: issue 16: ratios measured within one run
GOALS = {"hybrid_rss_x": 2.0, "bound_rss_x": 1.2, "peak_x": 1.2, "ready_x": 1.5}
_FIELDS = ("rss_mb", "peak_mb", "ready_ms", "settled_ms")


def bench_memory(
    model_path: str | Path,
    feeds: dict[str, np.ndarray],
    *,
    backend: str = "onnxruntime",
    strategies: list[str] | None = None,
    threads: int | None = None,
    repeat: int = 3,
    progress: bool = True,
) -> dict:
    """Per contestant the median over ``repeat`` fresh children of rss_mb, peak_mb, ready_ms, settled_ms."""
    from edge.progress import bar
    from runtimes import get_backend

    model_path = Path(model_path)
    if backend != "onnxruntime":
        raise EdgeError(f"bench memory compares with a plain onnxruntime session; --backend {backend} is not supported")
    cls = get_backend(backend)
    strategies = list(strategies or cls.STRATEGIES)
    kinds = ["plain", *strategies]
    runs: dict[str, list[dict]] = {k: [] for k in ["baseline", *kinds]}
    steps = bar(total=repeat * (len(kinds) + 1), desc=f"bench memory {model_path.stem}", disable=not progress)
    with tempfile.TemporaryDirectory() as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **{k: np.ascontiguousarray(v) for k, v in feeds.items()})
        for _ in range(repeat):  # interleaved, so drift of the machine hits every contestant alike
            for kind in runs:
                runs[kind].append(_probe(kind, model_path, feeds_path, backend, threads))
                steps.update()
    steps.close()
    base = float(np.median([r["rss_mb"] for r in runs["baseline"]]))
    figures = {}
    for kind in kinds:
        med = {f: _median([r.get(f) for r in runs[kind]]) for f in _FIELDS}
        for f in ("rss_mb", "peak_mb"):
            med[f] = med[f] - base
        last = runs[kind][-1]
        med.update({k: last[k] for k in ("predicted_mb", "measured_mb", "strategy") if last.get(k) is not None})
        figures[kind] = med
    first = runs[strategies[0]][-1]
    result = {
        "model": first.get("model", model_path.stem),
        "params": _param_count(model_path),
        "weights_mb": first.get("weights_mb"),
        "backend": backend,
        "threads": threads,
        "repeat": repeat,
        "baseline_rss_mb": base,
        "plain": figures.pop("plain"),
        "strategies": figures,
    }
    result["goals"] = goals(result)
    return result


def goals(result: dict) -> dict:
    """The issue's goals evaluated from the figures: {goal: {"value", "limit", "met"}}."""
    plain, out = result["plain"], {}

    def check(name, value, limit):
        if value is not None and np.isfinite(value):
            out[name] = {"value": round(float(value), 3), "limit": limit, "met": bool(value <= limit)}

    s = result["strategies"]
    if "hybrid" in s:
        check("hybrid_rss_x", s["hybrid"]["rss_mb"] / plain["rss_mb"], GOALS["hybrid_rss_x"])
    if "bound" in s:
        check("bound_rss_x", s["bound"]["rss_mb"] / plain["rss_mb"], GOALS["bound_rss_x"])
    for name, f in s.items():
        check(f"{name}_peak_x", f["peak_mb"] / f["rss_mb"], GOALS["peak_x"])
        check(f"{name}_ready_x", f["ready_ms"] / plain["ready_ms"], GOALS["ready_x"])
    return out


def markdown(result: dict) -> str:
    """One table per model: the plain session and each strategy, then the goals."""

    def num(v, fmt="{:.0f}"):
        return "-" if v is None or not np.isfinite(v) else fmt.format(v)

    rows = [("plain session", result["plain"])] + list(result["strategies"].items())
    lines = [
        f"**{result['model']}** ({result['params'] or 0:,} params, {num(result.get('weights_mb'), '{:.1f}')} MB "
        f"of writable float32 weights), {result['threads'] or 'all'} threads, median of {result['repeat']} "
        f"fresh processes; memory above a process that imported the same modules "
        f"({result['baseline_rss_mb']:.0f} MB).",
        "",
        "| contestant | resident MB | peak MB | predicted MB | ready ms | full speed ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in rows:
        lines.append(
            f"| {name} | {num(f['rss_mb'])} | {num(f['peak_mb'])} | {num(f.get('predicted_mb'))} | "
            f"{num(f['ready_ms'])} | {num(f.get('settled_ms'))} |"
        )
    lines += ["", "| goal | value | limit | met |", "|---|---|---|---|"]
    for name, g in result["goals"].items():
        lines.append(f"| {name} | {g['value']:.2f}x | {g['limit']}x | {'yes' if g['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def add_arguments(sp) -> None:
    sp.add_argument("--model", default="all", choices=["digits", "minilm", "all"], help="built-in model(s)")
    sp.add_argument("--model-file", help="an exported .onnx to bench instead (no torch)")
    sp.add_argument("--inputs", help="with --model-file: .npz of input arrays")
    sp.add_argument("--repeat", type=int, default=3, help="fresh processes per contestant (median reported)")


def cli(args) -> int:
    from edge.format.io import write_json
    from edge.machine import machine
    from lab.benchmarks import write_section

    if args.model_file:
        if not args.inputs:
            raise EdgeError("--model-file needs --inputs (an .npz of the model's input arrays)")
        models = [(Path(args.model_file), dict(np.load(args.inputs, allow_pickle=False)))]
    else:
        from edge.commands import host_needed
        from lab.bench_switch import bench_model

        host_needed("edge bench memory (without --model-file)")
        names = ["digits", "minilm"] if args.model == "all" else [args.model]
        models = [bench_model(n, args.cache, quiet=args.quiet) for n in names]
    results = [
        bench_memory(
            path, feeds, backend=args.backend, threads=args.threads, repeat=args.repeat, progress=not args.quiet
        )
        for path, feeds in models
    ]
    out = {**results[-1], "models": results, "machine": machine(), "load_avg": load_average()}
    print(json.dumps(out, indent=1))
    if args.json:
        write_json(args.json, out)
    if args.md:
        body = "\n".join(markdown(r) for r in results)
        write_section(args.md, f"memory:{args.backend}", f"Memory and cold start on {args.backend}", body)
    return 0


# -- the child processes ----------------------------------------------------------------------------------------------


def _probe(kind: str, model: Path, feeds: Path, backend: str, threads: int | None) -> dict:
    spec = json.dumps({"kind": kind, "model": str(model), "feeds": str(feeds), "backend": backend, "threads": threads})
    code = "import sys, lab.bench_memory as b; b._child(sys.argv[1])"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, cwd=root, timeout=900)
    if r.returncode != 0:
        raise EdgeError(f"memory probe {kind} on {model.name} failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _child(spec: str) -> None:
    """Run one contestant and print its figures as JSON (absolute MB; the parent subtracts the baseline)."""
    import gc

    import numpy.random  # noqa: F401  (the random adapter below needs it: bench machinery, not the runtime)
    import onnx  # noqa: F401  (the backend's load path imports it: library code is not the model's memory)
    import onnxruntime as ort

    from edge.runtime import Runtime
    from lab.benchmarks import default_targets, random_shira
    from runtimes import get_backend

    s = json.loads(spec)
    cls = get_backend(s["backend"])  # imported before the baseline is taken
    feeds = dict(np.load(s["feeds"], allow_pickle=False))

    def warm() -> None:
        """Every child, the baseline too, makes and drops the probe adapter once, after its timed load: the code
        pages this touches (numpy.random, the bench's helpers, the model reader; about 1 MB) are library code."""
        info = cls.read_info(Path(s["model"]))
        random_shira(info, default_targets(info), 0.01, seed=1, name="A")

    gc.collect()
    out: dict = {}
    reset_peak_rss()
    t0 = time.perf_counter()
    if s["kind"] == "plain":
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if s["threads"]:
            so.intra_op_num_threads = s["threads"]
        sess = ort.InferenceSession(s["model"], so, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
        out["ready_ms"] = out["settled_ms"] = (time.perf_counter() - t0) * 1e3
        for _ in range(4):
            sess.run(None, feeds)
        warm()
    elif s["kind"] == "baseline":
        warm()
    else:
        rt = Runtime(s["model"], backend=s["backend"], strategy=s["kind"], threads=s["threads"])
        rt.run(feeds)
        out["ready_ms"] = (time.perf_counter() - t0) * 1e3
        rt.wait_settled()
        out["settled_ms"] = (time.perf_counter() - t0) * 1e3
        for _ in range(4):
            rt.run(feeds)
        warm()
        info = rt.info
        adapter = random_shira(info, default_targets(info), 0.01, seed=1, name="A")
        rt.load_adapter(adapter, clip=True)  # a random probe may saturate an int8 base
        for which in ("A", None):
            rt.switch(which)
            rt.run(feeds)
            rt.wait_settled()
            rt.run(feeds)
        sizes = {t.initializer: int(np.prod(t.shape)) for t in info.tensors.values()}
        out.update(model=info.name, weights_mb=4 * sum(sizes.values()) / 2**20)
        out["strategy"] = rt.strategy
        if hasattr(rt.backend, "predicted_mb"):  # backends that model their footprint
            out["predicted_mb"] = rt.backend.predicted_mb()
            out["measured_mb"] = rt.backend.measured_mb
    gc.collect()
    out.update(rss_mb=status_mb("VmRSS"), peak_mb=status_mb("VmHWM"))
    print(json.dumps(out))


def _param_count(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return int(sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT))


def _median(xs):
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None
