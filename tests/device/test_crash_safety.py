"""SIGKILL at random moments while adapters are being written never leaves a file that fails to load."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
from _tiny import make_mlp, random_adapter

from edge.format.adapter import load_adapter


def _writer(path: str, model: str, go) -> None:
    from pathlib import Path

    info = make_mlp(Path(model + ".child.onnx"))  # same seed: same fingerprint
    adapters = [random_adapter(info, s, density=0.5, name=f"v{s}") for s in range(4)]
    go.set()
    i = 0
    while True:  # rewrite the installed adapter forever, until killed
        adapters[i % 4].save(path)
        i += 1


def test_sigkill_during_install_always_leaves_a_loadable_adapter(tmp_path):
    model = tmp_path / "m.onnx"
    info = make_mlp(model)
    target = tmp_path / "installed.safetensors"
    random_adapter(info, 99, name="first").save(target)
    ctx = mp.get_context("fork")
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(50):
        go = ctx.Event()
        p = ctx.Process(target=_writer, args=(str(target), str(model), go))
        p.start()
        assert go.wait(30)
        time.sleep(float(rng.uniform(0, 0.03)))
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        a = load_adapter(target)  # must never raise: old or new, never partial
        assert a.base_fingerprint == info.fingerprint
        seen.add(a.name)
    assert len(seen) > 1, "the writer never completed a write; the test proved nothing"
    leftovers = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert all(f.startswith(".installed.safetensors.") for f in leftovers)  # never mistaken for the adapter
