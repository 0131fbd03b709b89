"""Runtime(backend="auto"): the engine measured fastest among the model's files runs, and says why."""

from __future__ import annotations

import _tiny
import numpy as np
import pytest

from edge.errors import BackendUnavailableError
from edge.runtime import Runtime

pytest.importorskip("ai_edge_litert")
import _tiny_tflite  # noqa: E402

X = {"x": np.random.default_rng(0).standard_normal((1, 10)).astype(np.float32)}


def test_auto_runs_the_chosen_engine_and_records_why(tmp_path):
    _tiny.make_mlp(tmp_path / "m.onnx", seed=3)
    _tiny_tflite.make_mlp(tmp_path / "m.tflite", seed=3)
    with Runtime(tmp_path / "m.onnx", backend="auto", device="x86-dev") as rt:
        choice = rt.engine_choice
        assert choice.backend == rt.backend.name and rt.model_path == choice.path
        assert set(choice.comparison["engines"]) == {"onnxruntime", "tflite"}
        assert choice.reason.startswith(f"{choice.backend}: ")
        with Runtime(tmp_path / "m.onnx") as ref:
            np.testing.assert_allclose(rt.run(X)["logits"], ref.run(X)["logits"], atol=1e-5)
    (tmp_path / "m.tflite").unlink()
    with Runtime(tmp_path / "m.onnx", backend="auto") as rt:
        assert rt.engine_choice.reason == "onnxruntime: the only engine that can run it here"
        assert rt.engine_choice.skipped == {"tflite": "no m.tflite beside m.onnx"}
    with pytest.raises(BackendUnavailableError, match="no engine here can run m.onnx"):
        Runtime(tmp_path / "m.onnx", backend="auto", device=_tiny_profile(tmp_path))


def _tiny_profile(tmp_path):
    import yaml

    from edge.devices import packaged_dir

    data = yaml.safe_load((packaged_dir() / "x86-dev.yaml").read_text())
    data["name"], data["backends"] = "tfl-only", [b for b in data["backends"] if b["backend"] == "tflite"]
    path = tmp_path / "tfl-only.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
