"""``edge bench memory``: the bench's own read of the model is not counted in a contestant's peak.

A memory child reads the model's graph for its probe adapter after the timed load; walking the file maps pages of
it for a while (54 MB of ResNet-50's 94 MB), which every contestant's peak counted, the plain session's too (ResNet-50:
peak 1.22-1.35x resident for every contestant, from this alone). Here the process's memory is faked: the read is the
only thing that raises the high-water mark.
"""

from __future__ import annotations

import json

import _tiny
import numpy as np
import pytest

import lab.bench_memory as bm
from runtimes.onnxruntime import OrtBackend


@pytest.mark.parametrize("kind", ["plain", "bound"])
def test_the_benchs_read_of_the_model_is_not_in_the_peak(kind, tmp_path, monkeypatch, capsys):
    _tiny.make_mlp(tmp_path / "m.onnx", seed=3)
    np.savez(tmp_path / "x.npz", x=np.zeros((1, 10), np.float32))
    memory = {"VmRSS": 100.0, "VmHWM": 100.0}
    real_read_info = OrtBackend.read_info.__func__

    def read_info(cls, path):
        memory["VmHWM"] = 500.0  # the walk's mapped pages, gone again when the file is closed
        return real_read_info(cls, path)

    monkeypatch.setattr(bm, "status_mb", lambda field: memory[field])
    monkeypatch.setattr(bm, "reset_peak_rss", lambda: memory.update(VmHWM=memory["VmRSS"]))
    monkeypatch.setattr(OrtBackend, "read_info", classmethod(read_info))
    spec = {"kind": kind, "model": str(tmp_path / "m.onnx"), "feeds": str(tmp_path / "x.npz")}
    bm._child(json.dumps({**spec, "backend": "onnxruntime", "threads": 1, "memory": True}))
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["rss_mb"] == 100.0 and out["peak_mb"] == 100.0
