"""What ``lab.bench_quantized_litert`` compares against, and its memory probes: a plain LiteRT interpreter, and the
resident memory of one in a fresh child process beside a switchable ``hybrid`` runtime.

``python -m lab.litert_probe MODEL.tflite [--threads N]`` breaks that memory down (:func:`breakdown`): per contestant
its resident MB above the baseline child, and per mapping of ``/proc/self/smaps`` (a library's code, the heap,
anonymous memory) what the hybrid runtime holds above the bare interpreters it is made of and above a plain one.
Measured that way (ai-edge-litert 2.3.0, x86-64, load 2-5), on the digits encoders the built-in interpreter a
hybrid keeps beside its XNNPACK one is 0.5-0.7 MB of it (its kernels' code pages and its own allocations), the
runtime's own part (its Python objects, the switch path's code, an adapter) 0-0.3 MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

__all__ = ["KINDS", "breakdown", "child", "mappings", "memory", "plain_interpreter", "synthetic_feeds"]

#: the contestants a child can be: nothing (baseline), a plain interpreter, the hybrid runtime's two interpreters
#: bare over one copy of the bytes (built-in, then XNNPACK; both run), and the settled hybrid runtime itself
KINDS = ("baseline", "plain", "interpreters", "hybrid")


def default_threads(path: Path, threads: int | None) -> int:
    """The threads the LiteRT runtime resolves for ``path``: ``threads``, else all cores, or 1 for a file under
    :data:`runtimes.base.SMALL_MODEL_BYTES` (``runtimes.litert``)."""
    from runtimes.base import SMALL_MODEL_BYTES

    if threads:
        return int(threads)
    return 1 if Path(path).stat().st_size < SMALL_MODEL_BYTES else os.cpu_count() or 1


def plain_interpreter(path: Path, threads: int | None):
    """A plain LiteRT interpreter (XNNPACK) on ``path``: what the switchable runtime is compared with."""
    from runtimes.litert import interpreter_module

    lib, _ = interpreter_module()
    it = lib.Interpreter(model_path=str(path), num_threads=default_threads(path, threads))
    it.allocate_tensors()
    index = {d["name"]: d["index"] for d in it.get_input_details()}
    outputs = [d["index"] for d in it.get_output_details()]

    def run(feeds):  # what a caller of a plain interpreter does: set the inputs, invoke, fetch every output
        for k, v in feeds.items():
            it.set_tensor(index[k], v)
        it.invoke()
        return [it.get_tensor(i) for i in outputs]

    return run


def synthetic_feeds(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """One input per model input at the file's shapes: floats ~ N(0, 1), integers 0 or 1 (valid token ids, masks
    and type ids, and int8 pixels)."""
    from runtimes.litert import interpreter_module

    lib, _ = interpreter_module()
    it = lib.Interpreter(model_path=str(path))
    rng = np.random.default_rng(seed)
    out = {}
    for d in it.get_input_details():
        shape, dtype = tuple(int(n) for n in d["shape"]), np.dtype(d["dtype"])
        x = rng.standard_normal(shape) if dtype.kind == "f" else rng.integers(0, 2, shape)
        out[d["name"]] = np.ascontiguousarray(x, dtype)
    return out


def memory(path: Path, feeds: dict, threads: int | None) -> dict:
    """Resident MB above a baseline child of a plain interpreter and of a settled hybrid runtime (fresh children).

    The hybrid child switches and runs after each settle, so its built-in interpreter is built but never run: pages
    its kernels would touch when a run lands in a settle window are not counted (0.3-0.65 MB on the digits CNN)."""
    got = _children(path, feeds, threads, ("baseline", "plain", "hybrid"), smaps=False)
    return {"rss_mb": got["hybrid"] - got["baseline"], "plain_rss_mb": got["plain"] - got["baseline"]}


def breakdown(path: Path, feeds: dict, threads: int | None = None) -> dict:
    """Every kind's resident MB above the baseline child, and per mapping (kB resident) what ``hybrid`` holds above
    ``interpreters`` and above ``plain``: ``{"rss_mb": {kind: MB}, "hybrid-interpreters": {...}, ...}``."""
    got = _children(path, feeds, threads, KINDS, smaps=True)
    out: dict = {"rss_mb": {k: got[k]["rss"] - got["baseline"]["rss"] for k in KINDS[1:]}}
    for other in ("interpreters", "plain"):
        a, b = got["hybrid"]["maps"], got[other]["maps"]
        diff = {k: a.get(k, 0) - b.get(k, 0) for k in {*a, *b}}
        out[f"hybrid-{other}"] = {k: v for k, v in sorted(diff.items(), key=lambda kv: -abs(kv[1])) if v}
    return out


def _children(path: Path, feeds: dict, threads: int | None, kinds, smaps: bool) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fp = Path(tmp) / "feeds.npz"
        np.savez(fp, **feeds)
        return {k: _probe(k, path, fp, threads, smaps) for k in kinds}


def _probe(kind: str, model: Path, feeds: Path, threads: int | None, smaps: bool = False):
    spec = json.dumps({"kind": kind, "model": str(model), "feeds": str(feeds), "threads": threads, "smaps": smaps})
    code = "import sys, lab.litert_probe as b; b.child(sys.argv[1])"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, cwd=root, timeout=600)
    if r.returncode != 0:
        from edge.errors import EdgeError

        raise EdgeError(f"memory probe {kind} on {model.name} failed: {r.stderr.strip()[-2000:]}")
    last = r.stdout.strip().splitlines()[-1]
    return json.loads(last) if smaps else float(last)


def mappings(path: str = "/proc/self/smaps") -> dict[str, int]:
    """Resident kB per mapping of this process (Linux): a file's by its name and permissions (``"libc.so.6 r-xp"``),
    ``[heap]``, ``[stack]``, and every anonymous mapping summed as ``"[anon] PERMS"``."""
    out: dict[str, int] = {}
    key = None
    with open(path) as f:
        for line in f:
            head, _, rest = line.partition(" ")
            if "-" in head and not head.endswith(":"):  # a mapping's header: range perms offset dev inode [name]
                parts = rest.split(None, 4)
                name = os.path.basename(parts[4].strip()) if len(parts) > 4 and parts[4].strip() else "[anon]"
                key = f"{name} {parts[0]}"
            elif head == "Rss:" and key is not None:
                out[key] = out.get(key, 0) + int(rest.split()[0])
    return out


def child(spec: str) -> None:
    """Run one contestant (:data:`KINDS`) and print its resident MB (the parent subtracts the baseline's), or with
    ``smaps`` a JSON object ``{"rss": MB, "maps": mappings()}``."""
    import gc

    from edge.runtime import Runtime
    from lab.benchmarks import default_targets, random_shira
    from runtimes.base import rss_mb
    from runtimes.litert import LiteRTBackend, interpreter_module

    lib, _ = interpreter_module()  # library code is not the model's memory
    s = json.loads(spec)
    feeds = dict(np.load(s["feeds"], allow_pickle=False))
    model = Path(s["model"])
    # every child (the baseline too) builds the same adapter: numpy.random's pages are not the runtime's memory
    info = LiteRTBackend.read_info(model)
    a = random_shira(info, default_targets(info), 0.01, seed=1, name="A")
    keep = None
    if s["kind"] == "plain":
        keep = plain_interpreter(model, s["threads"])
        for _ in range(5):
            keep(feeds)
    elif s["kind"] == "interpreters":
        keep = [model.read_bytes()]
        kinds = lib.OpResolverType
        for kind in (kinds.BUILTIN_WITHOUT_DEFAULT_DELEGATES, kinds.AUTO):
            it = lib.Interpreter(
                model_content=keep[0],
                num_threads=default_threads(model, s["threads"]),
                experimental_op_resolver_type=kind,
            )
            it.allocate_tensors()
            index = {d["name"]: d["index"] for d in it.get_input_details()}
            for k, v in feeds.items():
                it.set_tensor(index[k], v)
            it.invoke()
            keep.append(it)
    elif s["kind"] == "hybrid":
        keep = Runtime(model, backend="tflite", strategy="hybrid", threads=s["threads"])
        if info.float_fingerprint is not None:
            a = type(a)("A", info.float_fingerprint, a.tensors, a.shapes, info=a.info)
        keep.load_adapter(a, clip=True)
        for which in ("A", None, "A"):
            keep.switch(which, clip=True)
            keep.wait_settled()
            keep.run(feeds)
    gc.collect()
    print(json.dumps({"rss": rss_mb(), "maps": mappings()}) if s.get("smaps") else rss_mb())


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lab.litert_probe", description=breakdown.__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="a .tflite file with this project's metadata")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--min-kb", type=int, default=32, help="mappings that differ by less are left out")
    args = ap.parse_args(argv)
    from runtimes.litert import LiteRTBackend

    names = LiteRTBackend.read_info(args.model).inputs  # the model's inputs, not its slots
    feeds = {k: v for k, v in synthetic_feeds(args.model).items() if not names or k in names}
    r = breakdown(args.model, feeds, args.threads)
    for key, rows in r.items():
        if key != "rss_mb":
            r[key] = {k: v for k, v in rows.items() if abs(v) >= args.min_kb}
    from edge.machine import load_average

    r["load_1m"] = (load_average() or [None])[0]
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
