"""Cold start, a fresh process's start to its first answer: plain onnxruntime, edge.Runtime (``edge bench coldstart``).

What a device pays when a process starts, loads one model and answers once: the interpreter's start, the imports
(onnxruntime, numpy, and whatever the load path imports), the construction and the first run, and the memory the
process holds then. :mod:`lab.bench_memory` measures ready time and memory in processes that imported every module
first; here nothing is imported before the clock starts, so the libraries count. Contestants, each in its own
fresh ``python -c`` (this interpreter, this venv; :data:`CHILD`, which imports nothing of this project but what the
contestant does):

* ``python``: the interpreter alone (prints at once): what any Python process pays, for reference;
* ``onnxruntime``: ``import numpy, onnxruntime``, ``InferenceSession(model, providers=["CPUExecutionProvider"])``
  (onnxruntime's default options: what a user writes), one ``run``;
* ``edge.Runtime``: ``import numpy``, ``from edge import Runtime``, ``Runtime(model)`` (the default backend and
  strategy), one ``run`` (the first answer, whether or not a background build is still pending).

``edge`` has no one-shot command that loads a model and answers once (``edge profile`` times hundreds of runs), so
no CLI contestant: :data:`CONTESTANTS` is the place to add one. The parent times each child from just before it
spawns it to the moment the child's first line (printed right after its first answer) arrives; the child reports its
phases with ``time.perf_counter`` (on Linux the parent's clock too, so the interpreter's start shows as the time from
the spawn to the child's first statement), its CPU time (every thread, ``os.times``), ``VmRSS``/``VmHWM`` at the first
answer and, for ``edge.Runtime``, ``VmHWM`` once its background work settled, and which heavy modules it imported.
Rounds: each contestant once per round, order rotated every round; ratios to ``onnxruntime`` are paired within a
round (median and 95 % bootstrap interval, :func:`lab.bench_memory.spread`). The file cache is warm (one untimed
child per contestant first; page caches are not dropped): a device's first boot reads its libraries from storage too.
The bytecode of ``edge`` and ``runtimes`` is compiled first (:func:`compile_bytecode`), as ``pip install`` compiles
an installed package: an untimed child cannot write it when ``PYTHONDONTWRITEBYTECODE`` is set, and every child
would compile each module of a source tree again (about 25 ms of CPU on the digits model's load path here).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edge.errors import ConfigError, EdgeError
from edge.machine import load_average

__all__ = ["CHILD", "CONTESTANTS", "HEAVY", "ROUNDS", "add_arguments", "bench_coldstart", "cli", "markdown"]

#: rounds per model for ``edge bench coldstart``
ROUNDS = 15
#: the contestants, in round 0's order; ratios are to ``onnxruntime``
CONTESTANTS = ("python", "onnxruntime", "edge.Runtime")
#: modules whose presence after the first answer is reported (each costs import time and resident memory)
HEAVY = ("onnx", "ml_dtypes", "torch", "yaml", "safetensors", "transformers", "google.protobuf", "onnxruntime", "numpy")
_ROOT = Path(__file__).resolve().parents[1]

#: the child: ``python -c CHILD KIND MODEL FEEDS.npz HEAVY,...``. Imports only what the contestant needs before its
#: first answer; prints ``answer`` then, after it, one JSON line of figures (json is imported after the answer).
CHILD = r"""
import time
T0 = time.perf_counter()
import os, sys
def status():
    got = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    got[k] = int(v.split()[0]) / 1024.0
    except (OSError, ValueError):
        pass
    return got.get("VmRSS"), got.get("VmHWM")
kind, model, feeds_path = sys.argv[1:4]
heavy = sys.argv[4].split(",")
out, settle = {}, None
t1 = t2 = t3 = time.perf_counter()
if kind == "onnxruntime":
    import numpy as np
    import onnxruntime as ort
    t1 = time.perf_counter()
    out.update(rss_imported_mb=status()[0], modules_imported=len(sys.modules))
    out["heavy_imported"] = [m for m in heavy if m in sys.modules]
    feeds = dict(np.load(feeds_path, allow_pickle=False))
    t2 = time.perf_counter()
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    t3 = time.perf_counter()
    sess.run(None, feeds)
elif kind == "edge.Runtime":
    import numpy as np
    from edge import Runtime
    t1 = time.perf_counter()
    out.update(rss_imported_mb=status()[0], modules_imported=len(sys.modules))
    out["heavy_imported"] = [m for m in heavy if m in sys.modules]
    feeds = dict(np.load(feeds_path, allow_pickle=False))
    t2 = time.perf_counter()
    rt = Runtime(model)
    t3 = time.perf_counter()
    rt.run(feeds)
    settle = rt
elif kind != "python":
    raise SystemExit("unknown contestant " + kind)
t4 = time.perf_counter()
cpu = os.times()
mods = set(sys.modules)
rss, hwm = status()
print("answer", flush=True)
import json
if kind != "python":
    out.update(import_ms=(t1 - T0) * 1e3, inputs_ms=(t2 - t1) * 1e3, construct_ms=(t3 - t2) * 1e3,
               run_ms=(t4 - t3) * 1e3)
out.update(t0=T0, cpu_ms=(cpu.user + cpu.system) * 1e3, rss_mb=rss, hwm_mb=hwm,
           modules=len(mods), heavy=[m for m in heavy if m in mods])
if settle is not None:
    out.update(settled_at_answer=settle.wait_settled(0), idle_at_answer=settle.wait_idle(0),
               strategy=settle.strategy, backend=settle.backend.name)
    settle.wait_idle()
out["hwm_settled_mb"] = max(hwm, status()[1])  # VmHWM can read lower later (the kernel updates it lazily)
print(json.dumps(out), flush=True)
os._exit(0)
"""


def compile_bytecode() -> str:
    """Compile the bytecode of the ``edge`` and ``runtimes`` packages where they are installed (as ``pip install``
    does; written whatever ``PYTHONDONTWRITEBYTECODE`` says); return what was done, for the report."""
    import compileall

    import edge
    import runtimes

    dirs = [Path(m.__file__).parent for m in (edge, runtimes)]
    failed = [d.name for d in dirs if not compileall.compile_dir(str(d), quiet=2)]  # a read-only install: its own
    if failed:  # bytecode (pip's) is what its children read; said in the report, not hidden
        return f"{', '.join(failed)} not compiled by the bench (read-only or a syntax error): as installed"
    return f"{', '.join(d.name for d in dirs)} compiled before the rounds (as pip install does)"


def bench_coldstart(model_path: str | Path, feeds: dict, *, rounds: int = ROUNDS, progress: bool = True) -> dict:
    """``rounds`` rounds of fresh children (one per contestant, rotated), after one untimed child per contestant."""
    from edge.progress import bar
    from lab.bench_memory import spread
    from lab.bench_run import rotated

    model_path = Path(model_path)
    if rounds < 1:
        raise ConfigError(f"bench coldstart needs --rounds >= 1; given {rounds}")
    if not model_path.is_file():
        raise ConfigError(f"bench coldstart runs a model file; {model_path} is not a regular file: give an .onnx")
    compiled = compile_bytecode()
    got: dict[str, list[dict]] = {k: [] for k in CONTESTANTS}
    load_before, t0 = load_average(), time.perf_counter()
    steps = bar(total=(rounds + 1) * len(CONTESTANTS), desc=f"bench coldstart {model_path.stem}", disable=not progress)
    with tempfile.TemporaryDirectory() as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **{k: np.ascontiguousarray(v) for k, v in feeds.items()})
        for r in range(-1, rounds):  # round -1: the untimed warm-up (file cache, compiled bytecode)
            for kind in rotated(CONTESTANTS, max(r, 0)):
                one = _spawn(kind, model_path, feeds_path)
                if r >= 0:
                    got[kind].append(one)
                steps.update()
    steps.close()
    figures = {}
    for kind, runs in got.items():
        med = {f: _median([x.get(f) for x in runs]) for f in _FIELDS}
        for f in ("heavy", "heavy_imported"):  # the modules any round imported (by the answer; after the imports)
            med[f] = [m for m in HEAVY if any(m in x.get(f, ()) for x in runs)]
        med.update({k: runs[-1][k] for k in ("strategy", "backend") if k in runs[-1]})
        for f in ("settled_at_answer", "idle_at_answer"):
            if f in runs[-1]:
                med[f] = sum(bool(x[f]) for x in runs)
        if kind != "onnxruntime":
            for f in ("wall_ms", "hwm_mb"):
                ratio = [_ratio(a[f], b[f]) for a, b in zip(runs, got["onnxruntime"])]
                if None not in ratio:
                    med[f"{f[:-3]}_x"] = spread(np.asarray(ratio))
        figures[kind] = med
    return {
        "model": f"{model_path.parent.name}/{model_path.name}",
        "model_mb": round(model_path.stat().st_size / 2**20, 2),
        "rounds": rounds,
        "file_cache": "warm",
        "bytecode": compiled,
        "wall_s": round(time.perf_counter() - t0, 1),
        "load_avg": {"before": load_before, "after": load_average()},
        "contestants": figures,
        "rounds_wall_ms": {k: [round(x["wall_ms"], 1) for x in runs] for k, runs in got.items()},
        "rounds_hwm_mb": {k: [x["hwm_mb"] for x in runs] for k, runs in got.items()},
    }


_FIELDS = (
    "wall_ms start_ms import_ms inputs_ms construct_ms run_ms cpu_ms "
    "modules_imported rss_imported_mb rss_mb hwm_mb hwm_settled_mb modules"
).split()


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.median(values)), 2) if values else None


def _ratio(a, b) -> float | None:
    return None if a is None or not b else a / b


def _spawn(kind: str, model: Path, feeds: Path, timeout: float = 600.0) -> dict:
    """One child: the parent's wall time from the spawn to its ``answer`` line, with the figures it printed after."""
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                kind,
                str(Path(model).resolve()),
                str(Path(feeds).resolve()),
                ",".join(HEAVY),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=_ROOT,
        )
        watchdog = threading.Timer(timeout, p.kill)
        watchdog.start()
        try:
            first = p.stdout.readline()
            wall = (time.perf_counter() - t0) * 1e3
            rest = p.stdout.read()
            code = p.wait()
        finally:
            watchdog.cancel()
            p.stdout.close()
            if p.poll() is None:  # interrupted: no child left behind
                p.kill()
                p.wait()
        late = time.perf_counter() - t0 >= timeout
        err.seek(0, 2)
        err.seek(max(0, err.tell() - (1 << 16)))  # the end of what it wrote: where its error is
        why = _last_error(err.read()) or first[:200]
    lines = rest.strip().splitlines()
    if code != 0 or first.strip() != "answer" or not lines:
        how = f"took longer than {timeout:.0f} s" if late else f"failed (exit code {code}): {why.strip()}"
        raise EdgeError(f"cold-start child {kind} on {model.name} {how}")
    try:
        out = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise EdgeError(f"cold-start child {kind} printed no JSON figures; its last line: {lines[-1][:200]!r}") from e
    out["wall_ms"] = wall
    start = (out.pop("t0") - t0) * 1e3  # a shared clock (Linux: CLOCK_MONOTONIC) puts it between 0 and the answer
    out["start_ms"] = start if 0 <= start <= wall else None
    return out


def _last_error(text: str) -> str:
    """The exception a child's stderr ends with, on one line (onnxruntime's span several): the lines after the last
    traceback frame, joined, at most 300 characters; else its last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    frames = [i for i, line in enumerate(lines) if line.startswith("File ")]
    tail = lines[frames[-1] + 2 :] if frames and frames[-1] + 2 < len(lines) else lines[-1:]
    return " ".join(tail)[:300]


_HEAVY = ("heavy_imported", "heavy")


def markdown(result: dict) -> str:
    """One table per model: each contestant's medians, and its ratios to plain onnxruntime."""

    def num(v, fmt="{:.0f}"):
        return "-" if v is None else fmt.format(v)

    def x(f, key):
        s = f.get(key)
        if s is None:
            return "1" if f is result["contestants"].get("onnxruntime") else "-"
        return f"{s['median']:.2f} ({s['ci_low']:.2f}-{s['ci_high']:.2f})"

    c, load = result["contestants"], result["load_avg"]
    rt = c.get("edge.Runtime", {})
    lines = [
        f"**{result['model']}** ({result['model_mb']:.1f} MB file): {result['rounds']} rounds of fresh processes "
        f"(one per contestant, order rotated every round), warm file cache (one untimed process per contestant first; "
        f"page caches not dropped); {result['wall_s']:.0f} s, load average {(load['before'] or ['-'])[0]} before, "
        f"{(load['after'] or ['-'])[0]} after. First answer: the parent's wall time from spawning the process to its "
        f"first line, printed right after the first inference (median); x onnxruntime: median of the per-round "
        f"ratios with its 95 % bootstrap interval. Start: spawn to the child's first statement (the interpreter); "
        f"imports, inputs (np.load of the .npz), construction, first run: the child's own clock. CPU: the process's "
        f"CPU time to the first answer, every thread (os.times: 10 ms ticks). Resident and peak (VmRSS, VmHWM) at the "
        f"first answer; settled peak: VmHWM once the runtime has no background work in flight (`Runtime.wait_idle`: "
        f"hybrid's session for switches, built after the first answer, included). edge.Runtime ran backend "
        f"{rt.get('backend', '-')}, strategy {rt.get('strategy', '-')} (serving at full speed at the first answer in "
        f"{rt.get('settled_at_answer', '-')} of {result['rounds']} rounds; its background build done by then in "
        f"{rt.get('idle_at_answer', '-')}). Bytecode: {result.get('bytecode', '-')}.",
        "",
        "| contestant | first answer ms | x onnxruntime | start ms | imports ms | inputs ms | construction ms "
        "| first run ms | CPU ms | resident after imports MB | resident MB | peak MB | settled peak MB "
        "| peak x onnxruntime | heavy modules after imports | heavy modules by the answer | modules after imports "
        "| modules by the answer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in c.items():
        heavy = " | ".join(
            ", ".join(f[k]) or ("-" if f["import_ms"] is None and k != "heavy" else "none") for k in _HEAVY
        )
        lines.append(
            f"| {name} | {num(f['wall_ms'])} | {x(f, 'wall_x')} | {num(f['start_ms'])} | {num(f['import_ms'])} | "
            f"{num(f['inputs_ms'], '{:.1f}')} | {num(f['construct_ms'])} | {num(f['run_ms'], '{:.1f}')} | "
            f"{num(f['cpu_ms'])} | {num(f['rss_imported_mb'], '{:.1f}')} | {num(f['rss_mb'], '{:.1f}')} | "
            f"{num(f['hwm_mb'], '{:.1f}')} | {num(f['hwm_settled_mb'], '{:.1f}')} | {x(f, 'hwm_x')} | {heavy} | "
            f"{num(f['modules_imported'])} | {num(f['modules'])} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(sp) -> None:
    sp.add_argument("--model", default="all", choices=["digits", "minilm", "all"], help="built-in model(s)")
    sp.add_argument("--model-file", help="an exported .onnx to bench instead (no torch)")
    sp.add_argument("--inputs", help="with --model-file: .npz of input arrays")
    sp.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of fresh processes (paired ratios)")


def cli(args) -> int:
    from edge.machine import machine
    from lab.bench_run import bench_models, write_results

    results = [
        bench_coldstart(path, feeds, rounds=args.rounds, progress=not args.quiet)
        for path, feeds in bench_models(args, "coldstart")
    ]
    out = {**results[-1], "models": results, "machine": machine(), "load_avg": load_average()}
    title = "Cold start: process start to first answer"
    return write_results(args, out, results, markdown, "coldstart", title)
