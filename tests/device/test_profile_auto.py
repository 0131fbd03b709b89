"""`edge profile` with auto (its default: a device profile is always given) runs what `Runtime(model, device=...)`
runs: the engine choice from the engine cache, with adapters made for its twin file."""

from __future__ import annotations

import json

import _tiny
import numpy as np
import pytest

from edge.cli import main
from edge.errors import AdapterMismatchError
from edge.format.modelinfo import source_fingerprint
from edge.profiling import ProfileConfig, profile_model
from edge.runtime import Runtime

pytest.importorskip("ai_edge_litert")
import _tiny_tflite  # noqa: E402

X = {"x": np.random.default_rng(1).standard_normal((1, 10)).astype(np.float32)}
FAST = ProfileConfig(runs=5, warmup=1, switches=2, progress=False)


def _twins(tmp_path, monkeypatch, winner: str):
    """m.onnx and m.tflite exported from the same weights; ``winner`` is rigged to measure fastest."""
    import edge.engine_cache as ec
    from edge.engines import decide as real_decide

    def rigged(found, figures, skipped=None, margin=ec.MARGIN):  # which engine wins is the machine's business
        for b, f in figures["engines"].items():
            f["ratio"] = 1.0 if b == winner else 2.0
        return real_decide(found, figures, skipped, margin)

    monkeypatch.setattr(ec, "decide", rigged)
    monkeypatch.setenv("EDGE_ENGINE_CACHE", str(tmp_path / "choices"))
    src = {"source_fingerprint": source_fingerprint({"w": np.arange(3, dtype=np.float32)})}
    onnx_info = _tiny.make_mlp(tmp_path / "m.onnx", seed=3, extra=src)
    tfl_info = _tiny_tflite.make_mlp(tmp_path / "m.tflite", seed=3, extra=src)
    return onnx_info, tfl_info


@pytest.mark.parametrize("winner", ["tflite", "onnxruntime"])
def test_auto_profiles_the_cached_choice_with_the_twins_adapters(tmp_path, monkeypatch, winner):
    onnx_info, tfl_info = _twins(tmp_path, monkeypatch, winner)
    other = tfl_info if winner == "onnxruntime" else onnx_info  # an adapter made for the file that does not run
    adapter = _tiny.random_adapter(other, seed=5, name="for-the-twin").save(tmp_path / "twin.safetensors")
    own = tmp_path / ("m.tflite" if winner == "tflite" else "m.onnx")
    with pytest.raises(AdapterMismatchError):  # named explicitly, the engine takes only its own file's adapters
        profile_model(own, "x86-dev", adapters=[adapter], inputs=X, backend=winner, config=FAST)

    result = profile_model(tmp_path / "m.onnx", "x86-dev", adapters=[adapter], backend="auto", config=FAST)
    assert result["backend"] == winner
    assert result["model"]["path"] == str(own)
    (figures,) = result["adapters"]
    assert figures["name"] == "for-the-twin" and figures["switch_ms"]["n"] == 2
    choice = result["engines"]["choice"]
    assert choice["backend"] == winner and set(result["engines"]["comparison"]["engines"]) == {"onnxruntime", "tflite"}
    assert "[measured" in choice["reason"]  # measured once, before the timed load, and kept

    import edge.engine_cache as ec

    def no_measuring(*a, **k):
        raise AssertionError("the choice edge profile made should be read back, not measured again")

    monkeypatch.setattr(ec, "compare_engines", no_measuring)
    with Runtime(tmp_path / "m.onnx", device="x86-dev") as rt:  # what the device runs: the same engine, from cache
        assert rt.backend.name == winner and "read from" in rt.engine_choice.reason
        rt.load_adapter(adapter)


def test_the_cli_default_is_auto(tmp_path, monkeypatch):
    onnx_info, _ = _twins(tmp_path, monkeypatch, "tflite")
    adapter = _tiny.random_adapter(onnx_info, seed=5, name="for-onnx").save(tmp_path / "a.safetensors")
    argv = ["profile", str(tmp_path / "m.onnx"), "--device", "x86-dev", "--adapters", str(adapter), "-q"]
    argv += ["--runs", "2", "--warmup", "0", "--switches", "1", "--json", str(tmp_path / "p.json")]
    assert main(argv) == 0
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["backend"] == "tflite" and data["adapters"][0]["name"] == "for-onnx"
    assert "adapters for m.onnx fit m.tflite too" in data["engines"]["choice"]["reason"]
    assert main([*argv, "--backend", "onnxruntime"]) == 0  # pinned: that engine, the engines compared beside it
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["backend"] == "onnxruntime" and data["engines"]["comparison"]["reference"] == "onnxruntime"


def test_an_adapter_that_fits_neither_the_choice_nor_its_twins_is_refused_before_timing(tmp_path, monkeypatch):
    """Files without a common source fingerprint are no twins: auto runs the .tflite, so an adapter for the .onnx
    cannot load there, and the error names the flag that profiles the file asked for."""
    import edge.profiling as prof

    _twins(tmp_path, monkeypatch, "tflite")
    _tiny_tflite.make_mlp(tmp_path / "m.tflite", seed=3)  # the same outputs, but no source fingerprints: exports
    onnx_info = _tiny.make_mlp(tmp_path / "m.onnx", seed=3)  # that predate them are no twins of anything
    adapter = _tiny.random_adapter(onnx_info, seed=5, name="for-the-onnx").save(tmp_path / "a.safetensors")
    monkeypatch.setattr(prof, "_profile_adapter", lambda *a: pytest.fail("timed an adapter that does not fit"))
    with pytest.raises(AdapterMismatchError, match="--backend onnxruntime profiles m.onnx itself"):
        profile_model(tmp_path / "m.onnx", "x86-dev", adapters=[adapter], backend="auto", config=FAST)
    assert profile_model(tmp_path / "m.onnx", "x86-dev", backend="auto", config=FAST)["backend"] == "tflite"
