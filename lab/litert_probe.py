"""What ``lab.bench_quantized_litert`` compares against, and its memory probes: a plain LiteRT interpreter, and the
resident memory of one in a fresh child process beside a switchable ``hybrid`` runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from edge.runtime import Runtime
from lab.benchmarks import default_targets, random_shira

__all__ = ["child", "memory", "plain_interpreter"]


def plain_interpreter(path: Path, threads: int | None):
    """A plain LiteRT interpreter (XNNPACK) on ``path``: what the switchable runtime is compared with."""
    from runtimes.litert import interpreter_module

    lib, _ = interpreter_module()
    it = lib.Interpreter(model_path=str(path), num_threads=threads or os.cpu_count() or 1)  # the runtime's default
    it.allocate_tensors()
    index = {d["name"]: d["index"] for d in it.get_input_details()}
    outputs = [d["index"] for d in it.get_output_details()]

    def run(feeds):  # what a caller of a plain interpreter does: set the inputs, invoke, fetch every output
        for k, v in feeds.items():
            it.set_tensor(index[k], v)
        it.invoke()
        return [it.get_tensor(i) for i in outputs]

    return run


def memory(path: Path, feeds: dict, threads: int | None) -> dict:
    """Resident MB above a baseline child of a plain interpreter and of a settled hybrid runtime (fresh children)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fp = Path(tmp) / "feeds.npz"
        np.savez(fp, **feeds)
        got = {k: _probe(k, path, fp, threads) for k in ("baseline", "plain", "hybrid")}
    return {"rss_mb": got["hybrid"] - got["baseline"], "plain_rss_mb": got["plain"] - got["baseline"]}


def _probe(kind: str, model: Path, feeds: Path, threads: int | None) -> float:
    spec = json.dumps({"kind": kind, "model": str(model), "feeds": str(feeds), "threads": threads})
    code = "import sys, lab.litert_probe as b; b.child(sys.argv[1])"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, cwd=root, timeout=600)
    if r.returncode != 0:
        from edge.errors import EdgeError

        raise EdgeError(f"memory probe {kind} on {model.name} failed: {r.stderr.strip()[-2000:]}")
    return float(r.stdout.strip().splitlines()[-1])


def child(spec: str) -> None:
    """Run one contestant (baseline, plain, hybrid) and print its resident MB (the parent subtracts the baseline)."""
    import gc

    from runtimes.base import rss_mb
    from runtimes.litert import LiteRTBackend, interpreter_module

    interpreter_module()  # library code is not the model's memory
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
    print(rss_mb())
