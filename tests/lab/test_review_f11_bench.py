"""Review of b89ac99: the memory bench maps every library's pages in each child (``lab.bench_memory._map_libraries``)
with ``MADV_POPULATE_READ``, which Linux before 5.14 does not know (EINVAL: JetPack 5's 5.10, Raspberry Pi OS
bullseye's 5.10, Ubuntu 20.04's 5.4). There every child failed, so ``edge bench memory`` measured nothing and
``edge bench quantized`` printed every row's memory as not measured. The same pages can be made resident there by
reading one byte of each.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import _tiny
import numpy as np
import pytest

import lab.bench_run
from lab.bench_memory import bench_memory, markdown

ROOT = Path(__file__).resolve().parents[2]
X = {"x": np.random.default_rng(0).standard_normal((1, 10)).astype(np.float32)}

# a kernel before 5.14 answers an advice it does not know with EINVAL: 4095 is one no kernel knows
_CHILD = """
import json, mmap
mmap.MADV_POPULATE_READ = 4095
import onnxruntime
from lab.bench_memory import _map_libraries
_map_libraries()
sizes = {}
with open("/proc/self/smaps") as f:
    path = None
    for line in f:
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            path = head[5] if len(head) >= 6 and head[1][0] == "r" and "onnxruntime" in head[5] else None
        elif path and head[0] in ("Size:", "Rss:"):
            sizes.setdefault(path, [0, 0])[head[0] == "Rss:"] += int(head[1])
print(json.dumps(sizes))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: /proc/self/smaps")
def test_library_pages_are_mapped_on_a_kernel_without_madv_populate_read():
    r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-600:]
    sizes = json.loads(r.stdout.strip().splitlines()[-1])
    assert sizes, "onnxruntime's library is mapped"
    for path, (size, rss) in sizes.items():
        assert rss >= 0.99 * size, f"{path}: {rss} of {size} kB resident"  # (the kernel may reclaim a page after)


def test_the_table_shows_tenths_of_a_mb_and_says_whether_library_pages_were_mapped(tmp_path, monkeypatch):
    """With library code out of every figure, a small model's contestants are 2-3 MB apart from nothing: whole MB
    hide the difference the no-arena row is there to show, and a reader must know which figures these are."""
    _tiny.make_mlp(tmp_path / "m.onnx", seed=3)
    rss = {"baseline": 100.0, "plain": 102.0, "plain_options": 101.6, "hybrid": 103.1}

    def child(target, spec, *, what, timeout=900.0):
        kind = spec["kind"]
        out = {"rss_mb": rss[kind], "peak_mb": rss[kind], "libraries_mapped": True}
        if kind in ("plain", "hybrid"):
            out.update(ready_ms=10.0, ready_cpu_ms=10.0)
        if kind == "hybrid":
            out.update(model="tiny-mlp", strategy="hybrid", predicted_mb=16.5, weights_mb=0.1)
        return out

    monkeypatch.setattr(lab.bench_run, "fresh_child", child)
    md = markdown(bench_memory(tmp_path / "m.onnx", X, strategies=["hybrid"], repeat=1, progress=False))
    assert "| plain session | 2.0 | 2.0 | - |" in md and "| hybrid | 3.1 | 3.1 | 16.5 |" in md
    assert "| plain session, the runtime's options (no CPU arena) | 1.6 | 1.6 | - |" in md
    assert "every library's pages mapped in each process first" in md
