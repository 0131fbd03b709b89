"""Inference from several threads while another thread switches: every output is one whole state's output."""

from __future__ import annotations

import threading

import _tiny
import _tiny_tflite
import numpy as np
import pytest
from _tiny import random_adapter

from edge.runtime import Runtime
from runtimes import backend_names, get_backend

CASES = [(b, s) for b in backend_names() for s in get_backend(b).STRATEGIES]
STATES = [None, "a", "b", {"a": 0.5, "b": 0.5}]
TINY = {"onnxruntime": _tiny, "tflite": _tiny_tflite}  # tiny-model builders with the same API, per backend


def _key(state) -> str:
    return repr(sorted(state.items())) if isinstance(state, dict) else repr(state)


@pytest.mark.parametrize("backend,strategy", CASES)
def test_mixed_inference_and_switching(tmp_path, backend, strategy):
    tiny = TINY[backend]
    path = tmp_path / f"m{getattr(tiny, 'SUFFIX', '.onnx')}"
    info = tiny.make_mlp(path, sizes=(10, 64, 4))
    x = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    with Runtime(path, backend=backend, strategy=strategy) as rt:
        rt.load_adapter(random_adapter(info, 1, density=0.5, name="a"))
        rt.load_adapter(random_adapter(info, 2, density=0.5, name="b"))
        refs = {}
        for s in STATES:
            rt.switch(s)
            rt.wait_settled(30)
            refs[_key(s)] = rt.run(x)["logits"]
        ref = np.stack(list(refs.values()))
        gaps = [np.abs(ref[i] - ref[j]).max() for i in range(len(ref)) for j in range(i)]
        assert min(gaps) > 1e-2, "reference states must be distinguishable"

        n_threads, per_thread, n_switches = 3, 2500, 2500  # 10,000 operations in all
        outputs: list[list[np.ndarray]] = [[] for _ in range(n_threads)]
        errors: list[BaseException] = []
        start = threading.Barrier(n_threads + 1)

        def infer(i: int) -> None:
            try:
                start.wait()
                for _ in range(per_thread):
                    outputs[i].append(rt.run(x)["logits"])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        def switcher() -> None:
            try:
                start.wait()
                rng = np.random.default_rng(3)
                for _ in range(n_switches):
                    rt.switch(STATES[rng.integers(len(STATES))])
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=infer, args=(i,)) for i in range(n_threads)]
        threads.append(threading.Thread(target=switcher))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:3]
        got = [o for per in outputs for o in per]
        assert len(got) == n_threads * per_thread, "a request was dropped"
        # each output is within float noise of exactly one state's reference (bound and prepacked
        # kernels may differ in the last bits), and far from all the others: never a mix of two
        dist = np.abs(np.stack(got)[:, None] - ref[None]).reshape(len(got), len(ref), -1).max(-1)
        best = dist.min(1)
        assert best.max() < 1e-4, f"an output matches no state (distance {best.max():.2e})"
        assert (np.sort(dist, 1)[:, 1] > 1e-3).all()


@pytest.mark.parametrize("backend,strategy", CASES)
def test_switching_does_not_grow_memory(tmp_path, backend, strategy):
    tiny = TINY[backend]
    path = tmp_path / f"m{getattr(tiny, 'SUFFIX', '.onnx')}"
    info = tiny.make_mlp(path, sizes=(64, 256, 8))
    x = np.zeros((1, 64), np.float32)
    with Runtime(path, backend=backend, strategy=strategy) as rt:
        for i in range(4):
            rt.load_adapter(random_adapter(info, i, density=0.02, name=f"a{i}"))
        names = [f"a{i}" for i in range(4)]

        def cycle(n: int) -> None:
            for i in range(n):
                rt.switch(names[i % 4] if i % 5 else {names[i % 4]: 0.5, names[(i + 1) % 4]: 0.5})
                if i % 50 == 0:
                    rt.wait_settled(30)
                rt.run(x)
            rt.wait_settled(30)

        cycle(200)  # warm up allocator pools and session caches
        before = _rss_kb()
        cycle(1000)
        grown_mb = (_rss_kb() - before) / 1024
    assert grown_mb < 8, f"resident memory grew {grown_mb:.1f} MB over 1,000 switches"


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")
