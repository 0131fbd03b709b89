"""A strategy asked explicitly whose predicted footprint exceeds the memory budget is refused at construction.

Before, only ``strategy="auto"`` consulted ``budgets.memory_mb``: ``Runtime(model, device=tiny, strategy="hybrid")``
(or a profile whose backend says ``strategy: hybrid``) built its sessions, then refused every adapter with a
negative ``footprint["room_mb"]``. Now the backend refuses it once its strategy is fixed and before any session or
interpreter is built, with the ``ConfigError`` the auto path uses, naming the prediction, the budget and the
strategies that would fit (or that none does); ``enforce_memory_budget=False`` still loads it.
"""

from __future__ import annotations

from dataclasses import replace

import _tiny
import onnxruntime
import pytest
import yaml

from edge.cli import main
from edge.devices import load_profile
from edge.errors import ConfigError
from edge.runtime import Runtime


def _profile(memory_mb: float):
    p = load_profile("x86-dev")
    return replace(p, budgets=replace(p.budgets, memory_mb=memory_mb))


@pytest.fixture
def onnx_model(tmp_path):
    path = tmp_path / "m.onnx"
    _tiny.make_mlp(path, sizes=(64, 256, 8))
    with Runtime(path, backend="onnxruntime", strategy="bound") as rt:  # no budget: the predictions
        predicted = {s: rt.backend.predicted_mb(s) for s in rt.backend.STRATEGIES}
    assert predicted["bound"] < predicted["rebuild"] < predicted["hybrid"]
    return path, predicted


@pytest.fixture
def sessions(monkeypatch):
    """Every onnxruntime session built from here on."""
    built, real = [], onnxruntime.InferenceSession

    def counting(*a, **k):
        built.append(a[0] if a else None)
        return real(*a, **k)

    monkeypatch.setattr(onnxruntime, "InferenceSession", counting)
    return built


def test_explicit_strategy_over_the_budget_is_refused_before_any_session(onnx_model, sessions):
    path, predicted = onnx_model
    budget = round((predicted["bound"] + predicted["rebuild"]) / 2, 4)  # bound fits, rebuild and hybrid do not
    with pytest.raises(ConfigError) as e:
        Runtime(path, backend="onnxruntime", strategy="hybrid", device=_profile(budget))
    msg = str(e.value)
    assert f"strategy 'hybrid' would take {predicted['hybrid']:.1f} MB" in msg
    assert f"memory budget of {budget:g} MB" in msg and "budgets.memory_mb" in msg
    assert f"strategy bound ({predicted['bound']:.1f} MB) fits it" in msg and "rebuild (" not in msg
    assert sessions == []  # refused before onnxruntime built anything
    with Runtime(path, backend="onnxruntime", strategy="bound", device=_profile(budget)) as rt:
        assert rt.strategy == "bound" and rt.footprint["room_mb"] >= 0  # the one that fits loads


def test_none_fits_says_so_and_enforce_false_still_loads(onnx_model, sessions):
    path, predicted = onnx_model
    budget = round(predicted["bound"] * 0.9, 4)
    with pytest.raises(ConfigError, match=r"none of the onnxruntime strategies fits it \(hybrid [\d.]+ MB, bound"):
        Runtime(path, backend="onnxruntime", strategy="bound", device=_profile(budget))
    assert sessions == []
    with Runtime(path, strategy="rebuild", device=_profile(budget), enforce_memory_budget=False) as rt:
        assert rt.strategy == "rebuild" and rt.footprint["budget_mb"] is None


def _write_profile(folder, memory_mb: float, strategy: str) -> None:
    data = yaml.safe_load(open(load_profile("x86-dev").source).read())
    data.update(name="tight", budgets={**data["budgets"], "memory_mb": memory_mb})
    for b in data["backends"]:
        b["strategy"] = strategy
    (folder / "tight.yaml").write_text(yaml.safe_dump(data))


def test_a_profile_s_own_strategy_counts_and_edge_profile_exits_2_with_one_line(onnx_model, tmp_path, capsys):
    path, predicted = onnx_model
    budget = round((predicted["bound"] + predicted["rebuild"]) / 2, 4)
    _write_profile(tmp_path, budget, "hybrid")  # the profile asks hybrid for its backends
    with pytest.raises(ConfigError, match="strategy 'hybrid' would take"):
        Runtime(path, backend="onnxruntime", device=tmp_path / "tight.yaml")
    argv = ["profile", str(path), "--device", "tight", "--devices-dir", str(tmp_path), "--backend", "onnxruntime"]
    argv += ["--runs", "2", "--warmup", "0", "--engine-rounds", "0", "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "strategy 'hybrid' would take" in err[0] and "Traceback" not in err[0]
    _write_profile(tmp_path, round(predicted["bound"] * 0.9, 4), "auto")  # no strategy fits: the same one line
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no onnxruntime strategy fits the memory budget" in err[0]


def test_litert_explicit_strategy_over_the_budget_builds_no_interpreter(tmp_path, monkeypatch):
    pytest.importorskip("ai_edge_litert")
    import _tiny_tflite

    from runtimes.litert import LiteRTBackend

    path = tmp_path / "m.tflite"
    _tiny_tflite.make_mlp(path, sizes=(64, 256, 8))
    predicted = {s: LiteRTBackend.footprint_mb(path, s) for s in LiteRTBackend.STRATEGIES}
    with Runtime(path, backend="tflite", strategy="builtin") as rt:  # the file's prediction is the backend's own
        assert {s: rt.backend.predicted_mb(s) for s in predicted} == pytest.approx(predicted)
    assert predicted["builtin"] < predicted["rebuild"] < predicted["hybrid"]

    def refuse(self, *, delegate):
        raise AssertionError("an interpreter was built")

    monkeypatch.setattr(LiteRTBackend, "_build", refuse)
    budget = round((predicted["builtin"] + predicted["rebuild"]) / 2, 4)
    with pytest.raises(ConfigError) as e:
        Runtime(path, backend="tflite", strategy="hybrid", device=_profile(budget))
    msg = str(e.value)
    assert f"strategy 'hybrid' would take {predicted['hybrid']:.1f} MB" in msg and f"of {budget:g} MB" in msg
    assert f"strategy builtin ({predicted['builtin']:.1f} MB) fits it" in msg
