"""Twins: the .onnx and .tflite exported from the same weights take each other's adapters under backend="auto"."""

from __future__ import annotations

import _tiny
import numpy as np
import pytest

from edge.engines import EngineFile, twins_of
from edge.errors import AdapterMismatchError
from edge.format.modelinfo import ModelInfo, source_fingerprint
from edge.runtime import Runtime

pytest.importorskip("ai_edge_litert")
import _tiny_tflite  # noqa: E402

X = {"x": np.random.default_rng(1).standard_normal((1, 10)).astype(np.float32)}


def _pair(tmp_path, monkeypatch, tflite_source: str = "same", extra: dict | None = None):
    monkeypatch.setenv("EDGE_ENGINE_CACHE", str(tmp_path / "choices"))
    src = {"source_fingerprint": source_fingerprint({"w": np.arange(3, dtype=np.float32)}), **(extra or {})}
    other = src if tflite_source == "same" else {**src, "source_fingerprint": tflite_source}
    onnx_info = _tiny.make_mlp(tmp_path / "m.onnx", seed=3, extra=src)
    tfl_info = _tiny_tflite.make_mlp(tmp_path / "m.tflite", seed=3, extra=other)
    assert onnx_info.fingerprint != tfl_info.fingerprint  # each file hashes what it stores
    return tmp_path / "m.onnx", onnx_info, tfl_info


@pytest.mark.parametrize("winner", ["tflite", "onnxruntime"])
def test_an_adapter_for_either_twin_runs_on_the_chosen_one_as_on_its_own_file(tmp_path, monkeypatch, winner):
    import edge.engine_cache as ec
    from edge.engines import decide as real_decide

    def rigged(found, figures, skipped=None, margin=ec.MARGIN):  # which engine wins is the machine's business
        for b, f in figures["engines"].items():
            f["ratio"] = 1.0 if b == winner else 2.0
        return real_decide(found, figures, skipped, margin)

    monkeypatch.setattr(ec, "decide", rigged)
    path, onnx_info, tfl_info = _pair(tmp_path, monkeypatch)
    with Runtime(path, device="x86-dev") as rt:  # a device and no backend: the engine measured fastest
        choice = rt.engine_choice
        assert rt.backend.name == winner and set(choice.comparison["engines"]) == {"onnxruntime", "tflite"}
        mine, theirs = (onnx_info, tfl_info) if winner == "onnxruntime" else (tfl_info, onnx_info)
        assert choice.twins == (theirs.fingerprint,)
        assert set(rt.info.fits) == {mine.fingerprint, theirs.fingerprint}
        assert ("adapters for m.onnx fit m.tflite too" in choice.reason) == (winner == "tflite")
        for made_for in (onnx_info, tfl_info):
            adapter = _tiny.random_adapter(made_for, seed=5, name=f"for-{made_for.fingerprint[-6:]}")
            rt.load_adapter(adapter)
            rt.switch([adapter.name])
            got = rt.run(X)["logits"]
            own = tmp_path / ("m.onnx" if made_for is onnx_info else "m.tflite")
            with Runtime(own) as ref:  # the adapter on the file it was made for
                ref.load_adapter(adapter)
                ref.switch([adapter.name])
                np.testing.assert_allclose(got, ref.run(X)["logits"], atol=1e-5)
            rt.switch([])
            rt.unload_adapter(adapter.name)


def test_files_from_other_weights_are_no_twins_and_refuse_each_others_adapters(tmp_path, monkeypatch):
    path, onnx_info, tfl_info = _pair(tmp_path, monkeypatch, tflite_source="source:0123")
    with Runtime(path, backend="auto") as rt:
        assert rt.engine_choice.twins == () and rt.info.fits == (rt.info.fingerprint,)
        other = tfl_info if rt.backend.name == "onnxruntime" else onnx_info
        with pytest.raises(AdapterMismatchError, match="was trained on base"):
            rt.load_adapter(_tiny.random_adapter(other, seed=5))


def test_without_auto_no_twin_is_read_and_a_quantized_file_has_none():
    info = ModelInfo("m", "sha256:0", extra={"source_fingerprint": "source:1", "quantization": {}})
    assert info.source_fingerprint is None and info.fits == ("sha256:0",)
    plain = ModelInfo("m", "sha256:0", extra={"source_fingerprint": "source:1"})
    assert plain.source_fingerprint == "source:1"
    a, b = (
        EngineFile("onnxruntime", "a.onnx", "sha256:a", "source:1"),
        EngineFile("tflite", "a.tflite", "sha256:b", "source:1"),
    )
    q = EngineFile("tflite", "q.tflite", "sha256:q", None)
    assert twins_of([a, b, q], a) == ("sha256:b",) and twins_of([a, b, q], q) == ()


def test_the_source_fingerprint_hashes_the_weights_not_the_file():
    w = {"fc.weight": np.ones((2, 3), np.float32)}
    assert source_fingerprint(w) == source_fingerprint({"fc.weight": np.ones((2, 3), np.float32)})
    assert source_fingerprint(w) != source_fingerprint({"fc.weight": np.zeros((2, 3), np.float32)})
    assert source_fingerprint(w).startswith("source:")
