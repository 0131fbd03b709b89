"""``backend="auto"``'s budget check predicts each engine on the providers the runtime will use: the profile's
fallback policy applied.

A profile listing a LiteRT delegate missing here before the CPU (``[GPU, CPU]``, ``fallback: cpu``) runs on the CPU
alone: ``hybrid`` then runs as ``builtin``, nothing packed. ``fit_budget`` predicted it on the listed providers
(as XNNPACK: two interpreters and the packed weights) and refused the engine, 'no engine fits the memory budget',
while ``Runtime(model, backend="tflite", device=profile)`` loaded it under the same budget.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("ai_edge_litert")
import _tiny_tflite  # noqa: E402

from edge.devices import load_profile  # noqa: E402
from edge.devices.profile import BackendPreference, ProviderSpec  # noqa: E402
from edge.engine_budget import fit_budget  # noqa: E402
from edge.engines import EngineFile  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from runtimes.litert import LiteRTBackend  # noqa: E402
from runtimes.litert_footprint import INTERPRETER_MB  # noqa: E402


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.tflite"
    _tiny_tflite.make_mlp(path, sizes=(64, 256, 8))
    return path


def _profile(model, providers: tuple[str, ...], fallback: str):
    cpu = LiteRTBackend.footprint_mb(model, "hybrid", ["CPU"])
    assert LiteRTBackend.footprint_mb(model, "hybrid", ["XNNPACK"]) > cpu + INTERPRETER_MB / 2
    p = load_profile("x86-dev")
    pref = BackendPreference("tflite", tuple(ProviderSpec(n) for n in providers), strategy="hybrid")
    return replace(p, budgets=replace(p.budgets, memory_mb=cpu + INTERPRETER_MB / 2), backends=(pref,),
                   fallback=fallback)  # fmt: skip


def test_a_missing_delegate_that_falls_back_to_the_cpu_is_predicted_on_the_cpu(model):
    p = _profile(model, ("GPU", "CPU"), "cpu")
    with Runtime(model, backend="tflite", device=p) as rt:  # the runtime: GPU dropped, hybrid on CPU is builtin
        assert rt.strategy == "builtin" and rt.backend.predicted_mb() <= p.budgets.memory_mb
    skipped: dict = {}
    kept = fit_budget([EngineFile("tflite", model)], skipped, p, "auto")
    assert [(e.backend, e.strategy) for e in kept] == [("tflite", "rebuild")] and not skipped


def test_a_profile_running_xnnpack_is_still_predicted_with_it(model):
    p = _profile(model, ("XNNPACK", "CPU"), "cpu")
    skipped: dict = {}
    with pytest.raises(ConfigError, match="no engine fits the memory budget"):
        fit_budget([EngineFile("tflite", model)], skipped, p, "auto")
    assert "hybrid" in skipped["tflite"]
