"""Loading a model does not hold the pages of its file that reading the graph mapped beside the arena.

The onnxruntime backend reads a model file through a memory map: the graph's walk touches every initializer's
header, and the kernel maps a whole folio of the page cache for each touch, so ResNet-50 (94 MB) had 54 MB of its
file resident and BERT-base (436 MB) 132 MB, while the arena was being filled (a ``bound`` load peaked at 1.4x
its settled memory on ResNet-50). The small constants kept in the graph are now copied before the weights, and
every page the walk mapped is given back (``runtimes.loading.release_pages``) before the arena fills.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest
from _tiny import make_mlp

import runtimes.onnxruntime as ort_backend
from runtimes.loading import RELEASE_STEP, model_buffer, page_releaser, release_pages

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="resident pages per mapping: Linux")


def mapped_kb(path: Path) -> int:
    """Resident kB of this process's memory maps of ``path`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:  # a mapping's first line: address range ... path
                inside = line.rstrip("\n").endswith(" " + str(path))
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.fixture
def big_mlp(tmp_path):
    """An MLP of about 4 MB: over RELEASE_STEP, so its file's pages are given back."""
    path = tmp_path / "big.onnx"
    make_mlp(path, sizes=(256, 2048, 256), name="big-mlp")
    assert os.path.getsize(path) > 2 * RELEASE_STEP
    return path


@pytest.mark.parametrize("strategy", ["bound", "hybrid"])
def test_no_page_of_the_file_is_held_while_the_arena_fills(big_mlp, monkeypatch, strategy):
    seen = []
    real = ort_backend.take_writable

    def take_writable(buf, *a, **k):
        seen.append(mapped_kb(big_mlp))
        return real(buf, *a, **k)

    monkeypatch.setattr(ort_backend, "take_writable", take_writable)
    import edge

    with edge.Runtime(big_mlp, strategy=strategy) as rt:
        x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
        got = rt.run({"x": x})["logits"]
        rt.wait_settled()
        import onnxruntime as ort

        plain = ort.InferenceSession(str(big_mlp), providers=["CPUExecutionProvider"])
        want = plain.run(["logits"], {"x": x})[0]  # the biases (constants kept in the graph) are there
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())  # summation order differs
    assert seen == [0]


def test_a_walk_gives_back_what_it_passed_a_step_at_a_time(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(np.random.default_rng(0).bytes(4 * RELEASE_STEP))
    with model_buffer(path) as (buf, _):
        np.frombuffer(buf, np.uint8).sum()  # every page touched
        whole = mapped_kb(path)
        assert whole >= 4 * RELEASE_STEP // 1024 - 64  # all resident (the last folio may be partly mapped)
        release = page_releaser(buf)
        release(RELEASE_STEP // 2)  # less than a step walked: nothing given back yet
        assert mapped_kb(path) == whole
        release(2 * RELEASE_STEP)
        assert mapped_kb(path) <= whole - 2 * RELEASE_STEP // 1024 + mmap.PAGESIZE // 1024
        release(len(buf))  # the end of the buffer: the rest
        assert mapped_kb(path) == 0
        assert buf[123] == path.read_bytes()[123]  # a released page reads the same bytes again
        release_pages(buf, 0, len(buf))
        assert mapped_kb(path) == 0


def test_bytes_and_small_files_are_left_alone(tmp_path):
    data = np.random.default_rng(0).bytes(RELEASE_STEP // 2)
    release = page_releaser(memoryview(data))
    release(len(data))  # bytes in memory: nothing to give back, no error
    release_pages(memoryview(data), 0, len(data))
    path = tmp_path / "small.bin"
    path.write_bytes(data)
    with model_buffer(path) as (buf, _):
        np.frombuffer(buf, np.uint8).sum()
        before = mapped_kb(path)
        page_releaser(buf)(len(buf))
        release_pages(buf, 0, len(buf))
        assert before > 0 and mapped_kb(path) == before  # a map under a step holds at most a step: kept whole
