"""``runtimes.onnx_quant.check_quant_readers`` on a float model: nothing is quantized, so nothing is walked.

Before, every onnxruntime load built the graph's consumer map and walked its control-flow bodies even when no
target was quantized (0.9 ms of MiniLM's load); now a model without a quantized target returns first. A target the
metadata says is quantized still has its readers walked (and a float reader refused).
"""

from __future__ import annotations

from dataclasses import replace

import _tiny
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from edge.errors import FormatError  # noqa: E402
from edge.format.modelinfo import QuantInfo  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from runtimes import onnx_quant  # noqa: E402

X = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)


def _count_walks(monkeypatch) -> list[str]:
    """Record each call of the graph walks ``check_quant_readers`` makes (then run the real one)."""
    calls: list[str] = []
    for name in ("consumers", "subgraph_reads"):
        real = getattr(onnx_quant, name)
        monkeypatch.setattr(onnx_quant, name, lambda graph, _r=real, _n=name: calls.append(_n) or _r(graph))
    return calls


def test_quantwalk_a_float_model_loads_without_walking_its_graph(tmp_path, monkeypatch):
    calls = _count_walks(monkeypatch)
    _tiny.make_mlp(tmp_path / "m.onnx")
    with Runtime(tmp_path / "m.onnx", backend="onnxruntime", strategy="bound") as rt:
        assert rt.run(X)["logits"].shape == (3, 2)
    assert calls == []


def test_quantwalk_a_quantized_target_still_has_its_readers_walked(tmp_path, monkeypatch):
    calls = _count_walks(monkeypatch)
    info = _tiny.make_mlp(tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx_quant.check_quant_readers(proto, info)
    assert calls == []
    t = info.tensors["fc1.weight"]  # the metadata says quantized; the graph's MatMul reads it as float
    said = replace(info, tensors={**info.tensors, "fc1.weight": replace(t, quant=QuantInfo("s", "zp"))})
    with pytest.raises(FormatError, match="does not know the grid of"):
        onnx_quant.check_quant_readers(proto, said)
    assert calls == ["consumers", "subgraph_reads"]
