"""LiteRT meets the memory budget at the strategy that will run, before the model is copied into its arena.

``providers=["CPU"]`` runs ``hybrid`` as ``builtin`` (one built-in interpreter: a rebuild would build its twin),
but the budget was checked at ``hybrid``'s prediction, one interpreter arena more, so a budget that fits what runs
refused it; and ``backend="auto"`` (:func:`edge.engine_budget.fit_budget`) predicted a profile's ``["CPU"]`` engine
with XNNPACK's packed weights, leaving out an engine that fits. Now ``LiteRTParts.mb`` predicts ``hybrid`` without
XNNPACK as ``builtin``, the backend turns ``hybrid`` into ``builtin`` before it checks, and ``footprint_mb`` takes
the profile's providers. The strategy is also chosen and checked from the file's tensor table before ``load_arena``
copies the model (a copy when the model was given as bytes, or needs padding or slots after it).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("ai_edge_litert")

import _tiny_tflite  # noqa: E402

import runtimes.litert as litert  # noqa: E402
from edge.devices import load_profile  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from runtimes.litert import LiteRTBackend  # noqa: E402
from runtimes.litert_footprint import INTERPRETER_MB  # noqa: E402


def _profile(memory_mb: float):
    p = load_profile("x86-dev")
    return replace(p, budgets=replace(p.budgets, memory_mb=memory_mb))


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.tflite"
    _tiny_tflite.make_mlp(path, sizes=(64, 256, 8))
    return path


def test_hybrid_on_cpu_is_predicted_as_the_builtin_it_runs(model):
    cpu = {s: LiteRTBackend.footprint_mb(model, s, ["CPU"]) for s in LiteRTBackend.STRATEGIES}
    assert cpu["hybrid"] == cpu["builtin"]
    with_xnnpack = {s: LiteRTBackend.footprint_mb(model, s) for s in LiteRTBackend.STRATEGIES}
    assert with_xnnpack["hybrid"] >= with_xnnpack["builtin"] + INTERPRETER_MB  # two interpreters there
    with Runtime(model, backend="tflite", strategy="hybrid", providers=["CPU"]) as rt:
        assert rt.strategy == "builtin" and rt.backend.strategy_reason
        assert rt.backend.predicted_mb() == rt.backend.predicted_mb("hybrid") == cpu["builtin"]


def test_a_budget_that_fits_what_runs_admits_hybrid_on_cpu(model):
    builtin = LiteRTBackend.footprint_mb(model, "builtin", ["CPU"])
    budget = builtin + INTERPRETER_MB / 2  # what runs fits; a second interpreter would not
    with Runtime(model, backend="tflite", strategy="hybrid", providers=["CPU"], device=_profile(budget)) as rt:
        assert rt.strategy == "builtin" and rt.footprint["room_mb"] >= 0
    with Runtime(model, backend="tflite", providers=["CPU"], device=_profile(budget)) as rt:  # auto: the same
        assert rt.strategy == "builtin"
    with pytest.raises(ConfigError, match="strategy 'hybrid' would take"):  # with XNNPACK hybrid is two interpreters
        Runtime(model, backend="tflite", strategy="hybrid", device=_profile(budget))


@pytest.mark.parametrize("as_bytes", [False, True], ids=["path", "bytes"])
def test_the_budget_is_met_before_the_model_is_copied_into_its_arena(model, monkeypatch, as_bytes):
    from runtimes.base import BackendOptions

    builtin = LiteRTBackend.footprint_mb(model, "builtin")

    def refuse(*a, **k):
        raise AssertionError("the model was laid out in its arena")

    monkeypatch.setattr(litert, "load_arena", refuse)
    given = model.read_bytes() if as_bytes else model
    with pytest.raises(ConfigError, match="strategy 'hybrid' would take"):
        LiteRTBackend(given, BackendOptions(strategy="hybrid", memory_mb=builtin + INTERPRETER_MB / 2))
    with pytest.raises(ConfigError, match="no tflite strategy fits"):
        LiteRTBackend(given, BackendOptions(memory_mb=builtin * 0.9))


def test_the_bytes_predicted_are_the_bytes_held(tmp_path):
    path = tmp_path / "branch.tflite"
    _tiny_tflite.make_branch_mlp(path)  # slots: their values after the model, in the same buffer
    with Runtime(path, backend="tflite", strategy="builtin") as rt:
        assert rt.backend._parts.model == memoryview(rt.backend._model).nbytes > path.stat().st_size


def test_backend_auto_predicts_a_cpu_engine_as_it_runs(model):
    from edge.devices.profile import BackendPreference, ProviderSpec
    from edge.engine_budget import fit_budget
    from edge.engines import EngineFile

    cpu = LiteRTBackend.footprint_mb(model, "hybrid", ["CPU"])
    assert LiteRTBackend.footprint_mb(model, "hybrid", ["XNNPACK"]) == LiteRTBackend.footprint_mb(model, "hybrid")
    p = _profile(cpu + INTERPRETER_MB / 2)  # the CPU engine fits; with XNNPACK (two interpreters, packed) it would not

    def fit(delegate: str, skipped: dict) -> list:
        pref = BackendPreference("tflite", (ProviderSpec(delegate),), strategy="hybrid")
        return fit_budget([EngineFile("tflite", model)], skipped, replace(p, backends=(pref,)), "auto")

    skipped: dict = {}
    assert [(e.backend, e.strategy) for e in fit("CPU", skipped)] == [("tflite", "rebuild")] and not skipped
    with pytest.raises(ConfigError, match="no engine fits the memory budget"):
        fit("XNNPACK", skipped)
    assert "hybrid" in skipped["tflite"]
