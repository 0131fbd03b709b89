"""``backend="auto"`` checks the memory budget before it builds an engine to measure it.

Before, :func:`edge.engine_cache.cached_engine` built and timed every engine beside the model (at ``rebuild``), and
only then did the budget refuse; on a small device the measuring itself could run out of memory. Now an engine
whose predicted footprint does not fit is left out, unbuilt, with the reason in ``skipped`` and the log; one that
fits only a lighter strategy is measured at that; none fitting is the budget's ``ConfigError``.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import _tiny
import numpy as np
import pytest

import edge.engine_cache as ec
from edge.devices import load_profile
from edge.engines import engine_report
from edge.errors import ConfigError
from edge.format.modelinfo import source_fingerprint
from edge.runtime import Runtime
from runtimes.onnxruntime import OrtBackend

pytest.importorskip("ai_edge_litert")
import _tiny_tflite  # noqa: E402

from runtimes.litert import LiteRTBackend  # noqa: E402

#: predictions made up for the two engines (MB), so that each budget below admits what its test needs
FAKE = {
    "onnxruntime": {"hybrid": 50.0, "rebuild": 40.0, "bound": 20.0},
    "tflite": {"hybrid": 30.0, "rebuild": 25.0, "builtin": 10.0},
}


def _profile(memory_mb: float):
    p = load_profile("x86-dev")
    return replace(p, budgets=replace(p.budgets, memory_mb=memory_mb))


@pytest.fixture()
def pair(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_ENGINE_CACHE", str(tmp_path / "choices"))
    src = {"source_fingerprint": source_fingerprint({"w": np.arange(3, dtype=np.float32)})}  # twins
    _tiny.make_mlp(tmp_path / "m.onnx", seed=3, extra=src)
    _tiny_tflite.make_mlp(tmp_path / "m.tflite", seed=3, extra=src)
    return tmp_path / "m.onnx"


@pytest.fixture()
def fake(monkeypatch):
    """Both backends predict FAKE; ``built`` records every engine constructed (backend name, strategy)."""
    built = []
    for cls in (OrtBackend, LiteRTBackend):
        table, init = FAKE[cls.name], cls.__init__

        def predict(c, model, s, providers=(), t=table):
            built.append(("predicted", s))
            return t[s]

        monkeypatch.setattr(cls, "footprint_mb", classmethod(predict))

        def spy(self, model, options, _init=init, _name=cls.name):
            built.append((_name, options.strategy))
            _init(self, model, options)

        monkeypatch.setattr(cls, "__init__", spy)
    return built


def test_an_engine_over_the_budget_is_never_built_and_says_why(pair, fake, caplog):
    with caplog.at_level(logging.WARNING, logger="edge.engines"):
        choice = ec.cached_engine(pair, device=_profile(15))  # onnxruntime's lightest (bound) is 20
    assert choice.backend == "tflite" and choice.comparison is None  # the one left: nothing to measure
    why = choice.skipped["onnxruntime"]
    assert "does not fit the memory budget of 15 MB" in why and "hybrid 50.0 MB, bound 20.0 MB" in why
    assert "not built" in why and "engine onnxruntime left out" in caplog.text
    assert fake and all(what == "predicted" for what, _ in fake)  # neither built to be measured
    assert choice.twins  # the .onnx file's adapters still fit the .tflite one (twins), though it was left out
    fake.clear()
    again = ec.cached_engine(pair, device=_profile(15))
    assert "read from" in again.reason and fake == []  # kept: the next load neither predicts nor builds
    assert again.backend == "tflite" and "does not fit the memory budget" in again.skipped["onnxruntime"]
    fake.clear()
    report = engine_report(pair, _profile(15), {"x": np.zeros((1, 10), np.float32)})  # edge profile --backend X
    assert "does not fit the memory budget" in report["skipped"]["onnxruntime"]
    assert all(what == "predicted" for what, _ in fake)


def test_each_engine_is_measured_at_what_the_budget_lets_it_run(pair, fake):
    choice = ec.cached_engine(pair, device=_profile(26))  # onnxruntime: only bound fits; tflite: rebuild fits
    engines = choice.comparison["engines"]
    assert engines["onnxruntime"]["strategy"] == "bound" and engines["tflite"]["strategy"] == "rebuild"
    assert [b for b in fake if b[0] != "predicted"] == [("onnxruntime", "bound"), ("tflite", "rebuild")]
    fake.clear()
    assert "kept in" in ec.cached_engine(pair, device=_profile(4096)).reason  # another budget: measured again
    assert [b for b in fake if b[0] != "predicted"] == [("onnxruntime", "rebuild"), ("tflite", "rebuild")]


def test_none_fits_is_the_budget_refusal_and_enforce_false_measures(pair, fake):
    with pytest.raises(ConfigError, match=r"no engine fits the memory budget of 5 MB .*onnxruntime: .*tflite: "):
        ec.cached_engine(pair, device=_profile(5))
    assert all(what == "predicted" for what, _ in fake)
    assert ec.cached_engine(pair, device=_profile(5), enforce_memory_budget=False).comparison is not None


def test_runtime_auto_on_a_tiny_budget_builds_nothing(pair, monkeypatch):
    """With the real predictions: a budget under both engines' lightest strategy refuses before any build."""
    lightest = min(
        min(OrtBackend.footprint_mb(pair, s) for s in OrtBackend.AUTO_ORDER),
        min(LiteRTBackend.footprint_mb(pair.with_suffix(".tflite"), s) for s in LiteRTBackend.AUTO_ORDER),
    )
    budget = round(lightest * 0.9, 4)

    def refuse(self, *a, **k):
        raise AssertionError("an engine was built")

    monkeypatch.setattr(OrtBackend, "__init__", refuse)
    monkeypatch.setattr(LiteRTBackend, "__init__", refuse)
    with pytest.raises(ConfigError, match=f"no engine fits the memory budget of {budget:g} MB"):
        Runtime(pair, device=_profile(budget))
