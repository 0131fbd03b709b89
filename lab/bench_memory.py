"""Resident memory, peak memory and ready time of a plain session and of each strategy (``edge bench memory``).

Every figure comes from a fresh child process (:func:`lab.bench_run.fresh_child`), so nothing a
previous contestant allocated, loaded or warmed is counted. The children run in rounds: in round r
the plain session and each strategy, in an order rotated by r, so drift of the machine and the
position in the round hit every contestant alike.

``ready_ms`` is the time from construction (``Runtime(...)``; for the plain session
``onnxruntime.InferenceSession(...)``) to the first inference returned by the session the strategy
serves at full speed (a run served while a rebuild is pending does not count: the child waits for it
and runs again). Each strategy's ready time is divided by the plain session's of the same round;
reported: the median of these per-round ratios, a 95 % bootstrap interval of that median (how closely
the rounds pin it down: the machine these figures come from is shared, so it is wide at times), the
quartiles and extremes of the ratios, and the number of rounds; the per-round times are in the JSON.
Beside it, ``ready_cpu_ms``: the CPU time of the thread that constructs and runs over the same span,
and the median of its per-round ratios. On a loaded machine the wall-clock ratio is pulled towards 1 by
the time every contestant spends waiting for a core; the CPU ratio is not (it leaves out the work of
onnxruntime's own threads, which both sides have). In the JSON, ``ready_sys_ms``: the part of that CPU time the
kernel spent for the thread (Linux; sampled at the scheduler tick), where first touches of fresh memory show: on a
virtual machine whose balloon reports free 2 MiB blocks to the host (virtio free page reporting: the 2-core machine
of BENCHMARKS.md has it), a huge-page arena's first touch can cost 7 ms per 2 MiB page instead of 0.2 (MiniLM's 86 MB
arena: 120-375 ms of a hybrid load, 20 ms in the rounds that found blocks not yet reported), which a device without a
hypervisor does not pay.

The first ``repeat`` rounds also measure memory, and add a baseline child that imports the same modules and loads
the same inputs: ``rss_mb`` is the resident memory above it after warm-up and one adapter switch cycle (a random
SHiRA adapter, switched on and off, the background rebuild settled), ``peak_mb`` the high-water mark (``VmHWM``)
above it over the whole life of the child, except while it does the bench's own work (reading the model for the
probe adapter); the median of those rounds is reported. Every child imports numpy (with numpy.random), onnx,
onnxruntime and ``edge.runtime`` before measuring, and a memory child makes and drops the probe adapter once after
its timed load and switch cycle: library code is not counted, only what a model costs (the adapter's arrays are
counted). Every child, the baseline too, also maps every page of every library it has loaded (shared objects and the
interpreter: onnxruntime's 37 MB, numpy's, Python's) before its timed load (:func:`_map_libraries`): a page of code
counts in resident memory only once something runs it, and a plain session ran 9.6 MB of onnxruntime's code on the
digits ViT that the baseline never runs, so without this every contestant counted it (its figure then moved with
what the page cache held: 7.8 MB for a plain session in one run, 11.3 in another), and the switchable runtime a
further 0.1-0.2 MB of numpy and onnxruntime code. What onnxruntime allocates once per process at its first session
(0.6 MB: what a first one-node session leaves behind) is counted for every contestant alike. When the runtime gives
its sessions other options than onnxruntime's defaults (a small model's prepacked session has no CPU arena,
:mod:`runtimes.ort_session`), the memory rounds add a plain session with the runtime's options (``plain_options``)
beside the plain one, so a reader sees which part of a difference the options make. The other rounds' children stop
once ready.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge.errors import EdgeError
from edge.machine import load_average, reset_peak_rss, status_mb

__all__ = ["GOALS", "ROUNDS", "add_arguments", "bench_memory", "cli", "goals", "markdown", "spread"]

#: issue 16: ratios measured within one run
GOALS = {"hybrid_rss_x": 2.0, "bound_rss_x": 1.2, "peak_x": 1.2, "ready_x": 1.5}
#: rounds of ready-time children per model for ``edge bench memory``: a multiple of the four contestants, so each is
#: measured equally often in each position of a round. Measured on 2 cores: three runs at load 5-9 took 86-172 s for
#: both models; their median wall ratios spread by at most 0.20 (digits; MiniLM 0.07), their main-thread CPU ratios
#: by at most 0.05. At load 8-15 a run took 170-240 s and the digits wall ratios moved by up to 0.7.
ROUNDS = 20
_MEMORY = ("rss_mb", "peak_mb")


def bench_memory(
    model_path: str | Path,
    feeds: dict[str, np.ndarray],
    *,
    backend: str = "onnxruntime",
    strategies: list[str] | None = None,
    threads: int | None = None,
    repeat: int = 3,
    rounds: int | None = None,
    progress: bool = True,
) -> dict:
    """Memory (median of ``repeat`` rounds) and ready time (``rounds`` rounds, at least ``repeat``; by default
    ``repeat``: ``edge bench memory`` asks for :data:`ROUNDS`), ratios paired within each round."""
    from edge.progress import bar
    from lab.bench_run import fresh_child, rotated
    from runtimes import get_backend

    model_path = Path(model_path)
    if backend != "onnxruntime":
        raise EdgeError(f"bench memory compares with a plain onnxruntime session; --backend {backend} is not supported")
    rounds = repeat if rounds is None else rounds
    if repeat < 1 or rounds < 1:
        raise EdgeError(f"bench memory needs --repeat >= 1 and --rounds >= 1; given {repeat} and {rounds}")
    strategies = list(strategies or get_backend(backend).STRATEGIES)
    kinds = ["plain", *strategies]
    rounds = max(rounds, repeat)
    plain_threads, cpu_arena = _runtime_options(model_path, backend, threads)
    extra = [] if cpu_arena else ["plain_options"]  # memory only: a plain session with the runtime's options
    memory: dict[str, list[dict]] = {k: [] for k in ["baseline", *extra, *kinds]}
    ready: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    kernel: dict[str, list[float | None]] = {k: [] for k in kinds}
    load_before, t0 = load_average(), time.perf_counter()
    total = rounds * len(kinds) + repeat * (1 + len(extra))
    steps = bar(total=total, desc=f"bench memory {model_path.stem}", disable=not progress)
    with tempfile.TemporaryDirectory() as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **{k: np.ascontiguousarray(v) for k, v in feeds.items()})
        for r in range(rounds):
            measure = r < repeat
            for kind in (["baseline", *extra] if measure else []) + rotated(kinds, r):
                spec = {"kind": kind, "model": str(model_path), "feeds": str(feeds_path), "backend": backend}
                got = fresh_child(
                    "lab.bench_memory:_child",
                    {**spec, "threads": threads if kind in kinds[1:] else plain_threads, "memory": measure},
                    what=f"memory probe {kind} on {model_path.name}",
                )
                if measure:
                    memory[kind].append(got)
                if kind in kinds:
                    ready[kind].append(got["ready_ms"])
                    cpu[kind].append(got["ready_cpu_ms"])
                    kernel[kind].append(got.get("ready_sys_ms"))
                steps.update()
    steps.close()
    wall_s = time.perf_counter() - t0
    base = float(np.median([r["rss_mb"] for r in memory["baseline"]]))
    figures = {}
    for kind in kinds:
        med = {f: float(np.median([r[f] for r in memory[kind]])) - base for f in _MEMORY}
        med["ready_ms"], med["ready_cpu_ms"] = float(np.median(ready[kind])), float(np.median(cpu[kind]))
        if None not in kernel[kind]:  # the kernel's part of the main-thread CPU (first touches of fresh memory)
            med["ready_sys_ms"] = float(np.median(kernel[kind]))
        last = memory[kind][-1]
        med.update({k: last[k] for k in ("predicted_mb", "measured_mb", "strategy") if last.get(k) is not None})
        if kind != "plain":  # paired: each round's ready time over the plain session's of the same round
            med["ready_x"] = spread(np.asarray(ready[kind]) / np.asarray(ready["plain"]))
            med["ready_cpu_x"] = spread(np.asarray(cpu[kind]) / np.asarray(cpu["plain"]))
        figures[kind] = med
    first = memory[strategies[0]][-1]
    result = {
        "model": first.get("model", model_path.stem),
        "params": _param_count(model_path),
        "weights_mb": first.get("weights_mb"),
        "backend": backend,
        "threads": threads,
        "plain_threads": plain_threads,
        "repeat": repeat,
        "rounds": rounds,
        "wall_s": round(wall_s, 1),
        "load_avg": {"before": load_before, "after": load_average()},
        "baseline_rss_mb": base,
        "libraries_mapped": all(r.get("libraries_mapped", False) for rs in memory.values() for r in rs),
        "ready_rounds_ms": {k: [round(v, 2) for v in ready[k]] for k in kinds},  # round by round, for any statistic
        "ready_rounds_cpu_ms": {k: [round(v, 2) for v in cpu[k]] for k in kinds},
        "ready_rounds_sys_ms": {k: [None if v is None else round(v, 2) for v in kernel[k]] for k in kinds},
        "plain": figures.pop("plain"),
        "strategies": figures,
    }
    if extra:  # the runtime's session options on a plain session: no CPU arena
        lean = {f: float(np.median([r[f] for r in memory["plain_options"]])) - base for f in _MEMORY}
        result["plain_options"] = {**lean, "cpu_arena": False}
    result["goals"] = goals(result)
    return result


def spread(ratios: np.ndarray, resamples: int = 2000) -> dict:
    """The median of per-round ratios, their quartiles and extremes, and a 95 % interval for that median
    (percentile bootstrap over the rounds, fixed seed): where another run's median may land. Rounded to 3 places."""
    ratios = np.asarray(ratios, dtype=np.float64)
    q = np.percentile(ratios, [0, 25, 50, 75, 100])
    picks = np.random.default_rng(0).integers(0, ratios.size, (resamples, ratios.size))
    ci = np.percentile(np.median(ratios[picks], axis=1), [2.5, 97.5])
    out = dict(zip(("min", "q1", "median", "q3", "max", "ci_low", "ci_high"), [*q, *ci]))
    return {k: round(float(v), 3) for k, v in out.items()}


def goals(result: dict) -> dict:
    """The issue's goals evaluated from the figures: {goal: {"value", "limit", "met"}} (ready: the median ratio,
    with its 95 % interval as "ci" and the main-thread CPU ratio as "cpu")."""
    plain, out = result["plain"], {}

    def check(name, value, limit, **more):
        if value is not None and np.isfinite(value):
            out[name] = {"value": round(float(value), 3), "limit": limit, "met": bool(value <= limit), **more}

    s = result["strategies"]
    if "hybrid" in s:
        check("hybrid_rss_x", s["hybrid"]["rss_mb"] / plain["rss_mb"], GOALS["hybrid_rss_x"])
    if "bound" in s:
        check("bound_rss_x", s["bound"]["rss_mb"] / plain["rss_mb"], GOALS["bound_rss_x"])
    for name, f in s.items():
        check(f"{name}_peak_x", f["peak_mb"] / f["rss_mb"], GOALS["peak_x"])
        x, c = f["ready_x"], f["ready_cpu_x"]
        check(f"{name}_ready_x", x["median"], GOALS["ready_x"], ci=[x["ci_low"], x["ci_high"]], cpu=c["median"])
    return out


def markdown(result: dict) -> str:
    """One table per model: the plain session and each strategy, then the goals."""

    def num(v, fmt="{:.0f}"):
        return "-" if v is None or not np.isfinite(v) else fmt.format(v)

    load, mb = result["load_avg"], "{:.1f}"  # MB to a tenth: a small model's figures are a few MB apart
    rows = [("plain session", result["plain"])] + list(result["strategies"].items())
    if "plain_options" in result:  # memory only
        lean = {"ready_ms": None, "ready_cpu_ms": None, **result["plain_options"]}
        rows.insert(1, ("plain session, the runtime's options (no CPU arena)", lean))
    lines = [
        f"**{result['model']}** ({result['params'] or 0:,} params, {num(result.get('weights_mb'), '{:.1f}')} MB "
        f"of writable float32 weights), {_threads_text(result)}; {result['wall_s']:.0f} s for this "
        f"model, load average {(load['before'] or ['-'])[0]} before, {(load['after'] or ['-'])[0]} after. "
        f"Memory: median of {result['repeat']} fresh processes, above a process that imported the same modules "
        f"({result['baseline_rss_mb']:.0f} MB), {_libraries_text(result)}. Ready: construction to the first "
        f"full-speed inference, in {result['rounds']} rounds of fresh processes (the plain session and each "
        f"strategy, order rotated every round); ms: median over the rounds; x plain: median of the per-round "
        f"ratios to the plain session, with the 95 % bootstrap interval of that median, the quartiles and the "
        f"extremes of the ratios; main-thread CPU: the CPU time of the thread that constructs and runs over "
        f"the same span (median), and the median of its per-round ratios, which waiting for a core on a loaded "
        f"machine does not pull towards 1; kernel ms: the part of that CPU the kernel spent for the thread (median), "
        f"where first touches of fresh memory show (a virtual machine whose balloon reports free pages to its host "
        f"pays far more for them than a device does); predicted MB: what a memory budget weighs against the resident "
        f"figure, the backend's prediction for the strategy plus the probe adapter (1 % random SHiRA) as counted.",
        "",
        "| contestant | resident MB | peak MB | predicted MB | ready ms | x plain | 95 % interval | quartiles "
        "| min-max | main-thread CPU ms | kernel ms | CPU x plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in rows:
        x, c = f.get("ready_x"), f.get("ready_cpu_x")
        ratio = ["1", "-", "-", "-"] if x is None else [f"{x['median']:.2f}", *(_range(x, p) for p in _SPREAD)]
        ratio = ["-"] * 4 if f["ready_ms"] is None else ratio
        lines.append(
            f"| {name} | {num(f['rss_mb'], mb)} | {num(f['peak_mb'], mb)} | {num(f.get('predicted_mb'), mb)} | "
            f"{num(f['ready_ms'])} | {' | '.join(ratio)} | {num(f['ready_cpu_ms'], '{:.1f}')} | "
            f"{num(f.get('ready_sys_ms'), '{:.1f}')} | "
            f"{'-' if f['ready_ms'] is None else '1' if c is None else format(c['median'], '.2f')} |"
        )
    lines += ["", "| goal | value | 95 % interval | main-thread CPU | limit | met |", "|---|---|---|---|---|---|"]
    for name, g in result["goals"].items():
        ci = "-" if "ci" not in g else f"{g['ci'][0]:.2f}-{g['ci'][1]:.2f}"
        cpu = "-" if "cpu" not in g else f"{g['cpu']:.2f}x"
        lines.append(f"| {name} | {g['value']:.2f}x | {ci} | {cpu} | {g['limit']}x | {'yes' if g['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


_SPREAD = (("ci_low", "ci_high"), ("q1", "q3"), ("min", "max"))


def _range(x: dict, pair: tuple[str, str]) -> str:
    return f"{x[pair[0]]:.2f}-{x[pair[1]]:.2f}"


def add_arguments(sp) -> None:
    sp.add_argument("--model", default="all", choices=["digits", "minilm", "all"], help="built-in model(s)")
    sp.add_argument("--model-file", help="an exported .onnx to bench instead (no torch)")
    sp.add_argument("--inputs", help="with --model-file: .npz of input arrays")
    sp.add_argument("--repeat", type=int, default=3, help="rounds that also measure memory (median reported)")
    sp.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of ready-time children (paired ratios)")


def cli(args) -> int:
    from edge.machine import machine
    from lab.bench_run import bench_models, write_results

    results = [
        bench_memory(
            path,
            feeds,
            backend=args.backend,
            threads=args.threads,
            repeat=args.repeat,
            rounds=args.rounds,
            progress=not args.quiet,
        )
        for path, feeds in bench_models(args, "memory")
    ]
    out = {**results[-1], "models": results, "machine": machine(), "load_avg": load_average()}
    title = f"Memory and ready time on {args.backend}"
    return write_results(args, out, results, markdown, f"memory:{args.backend}", title)


# -- the child processes ----------------------------------------------------------------------------------------------


def _threads_text(result: dict) -> str:
    """What the contestants ran on: the threads asked for, else each runtime's default and the plain session on the
    threads the runtime resolved (1 for a tiny model, ``runtimes.base.SMALL_MODEL_BYTES``)."""
    if result["threads"]:
        return f"{result['threads']} threads"
    plain = result.get("plain_threads")
    return (
        "default threads ("
        + ("all cores" if plain is None else f"{plain} for a model this small")
        + "; the plain session on the same)"
    )


def _libraries_text(result: dict) -> str:
    if result.get("libraries_mapped"):
        return "every library's pages mapped in each process first (library code counts in none)"
    return "library code counted where it ran (its pages were not mapped first: not Linux, or no /proc)"


def _runtime_options(model_path: Path, backend: str, threads: int | None) -> tuple[int | None, bool]:
    """The threads the runtime resolves for this model (``threads``, or its default: 1 for a tiny model), for the
    plain session it is compared with, and whether its prepacked sessions use onnxruntime's CPU arena; read from a
    ``bound`` runtime built here, in the parent, before any child."""
    from edge.runtime import Runtime

    with Runtime(model_path, backend=backend, strategy="bound") as rt:
        resolved = rt.backend.threads if threads is None else threads
        return resolved, bool(getattr(rt.backend, "cpu_arena", True))


def _child(spec: str) -> None:
    """Run one contestant and print its figures as JSON (absolute MB; the parent subtracts the baseline)."""
    import gc

    import numpy.random  # noqa: F401  (the random adapter below needs it: bench machinery, not the runtime)
    import onnx  # noqa: F401  (the backend's load path imports it: library code is not the model's memory)
    import onnxruntime as ort

    from edge.runtime import Runtime
    from lab.benchmarks import default_targets, random_shira
    from runtimes import get_backend
    from runtimes.ort_session import session_options

    s = json.loads(spec)
    cls = get_backend(s["backend"])  # imported before the baseline is taken
    feeds = dict(np.load(s["feeds"], allow_pickle=False))
    mapped = _map_libraries()  # library code resident in every child before anything is measured
    peaks: list[float] = []  # the high-water marks before the bench's own work (warm) reset it

    def warm() -> None:
        """Every memory child, the baseline too, makes and drops the probe adapter once, after its timed load: the
        code pages this touches (numpy.random, the bench's helpers, the model reader; about 1 MB) are library code.
        Its own peak is the bench's, not the contestant's (reading the graph maps pages of the file for a while: 54 MB
        of ResNet-50's 94): the peak so far is kept and the count starts again after it."""
        peaks.append(status_mb("VmHWM") or 0.0)
        info = cls.read_info(Path(s["model"]))
        random_shira(info, default_targets(info), 0.01, seed=1, name="A")
        reset_peak_rss()

    def done(out: dict) -> None:
        """A child of a ready-only round stops here, without the teardown (a background build may be running)."""
        if not s["memory"]:
            print(json.dumps(out), flush=True)
            sys.stderr.flush()
            os._exit(0)

    gc.collect()
    out: dict = {"libraries_mapped": mapped}
    reset_peak_rss()
    t0, c0, k0 = time.perf_counter(), time.thread_time(), _kernel_ms()
    if s["kind"] in ("plain", "plain_options"):
        # onnxruntime's defaults on the runtime's threads; plain_options: the runtime's small-model options too
        so = session_options(ort, s["threads"], cpu_arena=s["kind"] == "plain")
        sess = ort.InferenceSession(s["model"], so, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
        out.update(ready_ms=(time.perf_counter() - t0) * 1e3, ready_cpu_ms=(time.thread_time() - c0) * 1e3)
        out["ready_sys_ms"] = None if k0 is None else _kernel_ms() - k0
        done(out)
        for _ in range(4):
            sess.run(None, feeds)
        warm()
    elif s["kind"] == "baseline":
        warm()
    else:
        rt = Runtime(s["model"], backend=s["backend"], strategy=s["kind"], threads=s["threads"])
        rt.run(feeds)
        if not rt.wait_settled(0):  # served before the full-speed session was in place: that is not ready yet
            rt.wait_settled()
            rt.run(feeds)
        out.update(ready_ms=(time.perf_counter() - t0) * 1e3, ready_cpu_ms=(time.thread_time() - c0) * 1e3)
        out["ready_sys_ms"] = None if k0 is None else _kernel_ms() - k0
        done(out)
        for _ in range(4):
            rt.run(feeds)
        info = rt.info
        adapter = random_shira(info, default_targets(info), 0.01, seed=1, name="A")
        rt.load_adapter(adapter, clip=True)  # a random probe may saturate an int8 base
        for which in ("A", None):
            rt.switch(which)
            rt.run(feeds)
            rt.wait_settled()
            rt.run(feeds)
        warm()  # settled, both sessions built: no build of the runtime's runs while the peak restarts
        sizes = {t.initializer: int(np.prod(t.shape)) for t in info.tensors.values()}
        out.update(model=info.name, weights_mb=4 * sum(sizes.values()) / 2**20)
        out["strategy"] = rt.strategy
        if hasattr(rt.backend, "predicted_mb"):  # backends that model their footprint
            out["predicted_mb"] = rt.backend.predicted_mb() + rt.footprint["adapters_mb"]  # as a budget weighs it
            out["measured_mb"] = rt.backend.measured_mb
    gc.collect()
    out.update(rss_mb=status_mb("VmRSS"), peak_mb=max(status_mb("VmHWM") or 0.0, *peaks))
    print(json.dumps(out))


def _kernel_ms() -> float | None:
    """The system CPU time of the calling thread so far (ms; Linux), else None."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_THREAD).ru_stime * 1e3
    except (ImportError, AttributeError, OSError):
        return None


def _map_libraries() -> bool:
    """Make every page of every library this process has mapped resident (shared objects and the interpreter, code
    and data), so the code a contestant runs adds nothing to its resident memory that the baseline does not hold too;
    whether it did (Linux; elsewhere the pages stay as they are, and the bench's markdown says so).
    ``MADV_POPULATE_READ`` (Linux 5.14) maps the page cache's pages, shared, without copying them; a kernel that does
    not know it (EINVAL: JetPack 5, Raspberry Pi OS bullseye) has one byte of every page read instead, which maps the
    same pages."""
    import ctypes
    import errno
    import mmap

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as f:
            maps = [line.split() for line in f]
    except (OSError, AttributeError):
        return False
    exe = os.path.realpath(sys.executable)
    advice = getattr(mmap, "MADV_POPULATE_READ", 22)  # 22 on every architecture (asm-generic/mman-common.h)
    for m in maps:
        if len(m) < 6 or m[1][0] != "r" or not (".so" in os.path.basename(m[5]) or m[5] == exe):
            continue
        lo, hi = (int(x, 16) for x in m[0].split("-"))
        if advice and libc.madvise(lo, hi - lo, advice) == 0:
            continue
        if advice and ctypes.get_errno() != errno.EINVAL:
            raise EdgeError(
                f"bench memory maps its libraries' pages before measuring, and this kernel refused to for {m[5]} "
                f"({os.strerror(ctypes.get_errno())})"
            )
        advice = 0  # Linux < 5.14: read one byte of each page (a read fault maps the page cache's page, no copy)
        int(np.frombuffer((ctypes.c_char * (hi - lo)).from_address(lo), np.uint8)[:: mmap.PAGESIZE].sum())
    return True


def _param_count(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return int(sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT))
