"""onnxruntime meets the memory budget from the graph and the weights' dims, before it reads any weight.

Before, a load under ``budgets.memory_mb`` copied every writable weight into the arena (``take_writable``) and only
then predicted the footprint: a ``hybrid`` load of a 64 MB MatMul model under a 100 MB budget was refused at a
peak of 64 MB above the process (VmHWM, fresh process). The prediction needs each writable tensor's dims and
element type, which the file's initializer headers give (``runtimes.onnx_file.writable_dtypes`` checks them), so
the strategy is now chosen (``auto``) or checked (asked) before the arena is allocated: the same refusal peaks at
2 MB. The same check refuses a file whose dims claim more values than it stores before an arena of that size is
allocated (was: an ``OutOfMemoryError`` advising a lighter strategy, for a damaged file).
"""

from __future__ import annotations

from dataclasses import replace

import _tiny
import onnx
import pytest

import runtimes.onnx_file as onnx_file
import runtimes.onnxruntime as ort_backend
from edge.devices import load_profile
from edge.errors import ConfigError, FormatError
from edge.runtime import Runtime


def _profile(memory_mb: float):
    p = load_profile("x86-dev")
    return replace(p, budgets=replace(p.budgets, memory_mb=memory_mb))


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.onnx"
    _tiny.make_mlp(path, sizes=(64, 256, 8))
    with Runtime(path, backend="onnxruntime", strategy="bound") as rt:  # no budget: the predictions from the arena
        predicted = {s: rt.backend.predicted_mb(s) for s in rt.backend.STRATEGIES}
    assert predicted["bound"] < predicted["rebuild"] < predicted["hybrid"]
    return path, predicted


@pytest.fixture
def no_weights_read(monkeypatch):
    """Reading the weights into the arena fails the test: whatever is decided must be decided before."""

    def refuse(*a, **k):
        raise AssertionError("the weights were read into the arena")

    monkeypatch.setattr(ort_backend, "take_writable", refuse)


@pytest.mark.parametrize("strategy", ["hybrid", "rebuild"])
def test_an_explicit_strategy_over_the_budget_is_refused_before_the_weights_are_read(model, no_weights_read, strategy):
    path, predicted = model
    budget = round((predicted["bound"] + predicted["rebuild"]) / 2, 4)  # bound fits, rebuild and hybrid do not
    with pytest.raises(ConfigError, match=f"strategy '{strategy}' would take {predicted[strategy]:.1f} MB"):
        Runtime(path, backend="onnxruntime", strategy=strategy, device=_profile(budget))


def test_auto_refuses_before_the_weights_are_read_when_no_strategy_fits(model, no_weights_read):
    path, predicted = model
    with pytest.raises(ConfigError, match="no onnxruntime strategy fits the memory budget"):
        Runtime(path, backend="onnxruntime", device=_profile(round(predicted["bound"] * 0.9, 4)))


def test_the_prediction_from_the_dims_is_the_one_from_the_arena(model):
    path, predicted = model
    budget = round((predicted["bound"] + predicted["rebuild"]) / 2, 4)
    with Runtime(path, backend="onnxruntime", device=_profile(budget)) as rt:  # auto: bound is the one that fits
        assert rt.strategy == "bound"
        assert {s: rt.backend.predicted_mb(s) for s in predicted} == predicted
    with Runtime(path, backend="onnxruntime", strategy="hybrid", device=_profile(predicted["hybrid"])) as rt:
        assert rt.strategy == "hybrid" and rt.backend.predicted_mb() == predicted["hybrid"]  # exactly at the budget


def _lying_dims(path, tensor: str, as_float_data: bool = False) -> None:
    """Give ``tensor`` dims of 2**38 values (a TB of float32), its data unchanged."""
    m = onnx.load(path)
    t = next(t for t in m.graph.initializer if t.name == tensor)
    if as_float_data:  # the values as float_data, not raw_data: a value takes 4 bytes there
        values = onnx.numpy_helper.to_array(t).reshape(-1).tolist()
        t.ClearField("raw_data")
        t.float_data.extend(values)
    del t.dims[:]
    t.dims.extend([1 << 20, 1 << 18])
    onnx.save(m, path)


@pytest.mark.parametrize("as_float_data", [False, True], ids=["raw_data", "float_data"])
def test_dims_claiming_more_than_the_file_holds_are_refused_before_any_allocation(tmp_path, monkeypatch, as_float_data):
    path = tmp_path / "m.onnx"
    _tiny.make_mlp(path)
    _lying_dims(path, "fc2.weight", as_float_data)

    def refuse(*a, **k):
        raise AssertionError("an arena was allocated")

    monkeypatch.setattr(onnx_file, "arena_group", refuse)
    with pytest.raises(FormatError, match=r"initializer 'fc2.weight': \d+ bytes .*\(1048576, 262144\)"):
        Runtime(path, backend="onnxruntime", strategy="bound")


def test_an_int8_model_is_predicted_from_its_dims_as_from_its_arena():
    from pathlib import Path

    path = Path(__file__).parent.parent / "golden" / "tiny-mlp-int8-v1.onnx"  # int8 weights: the integer arena
    with Runtime(path, backend="onnxruntime", strategy="bound") as rt:
        predicted = {s: rt.backend.predicted_mb(s) for s in rt.backend.STRATEGIES}
    with Runtime(path, backend="onnxruntime", strategy="hybrid", device=_profile(predicted["hybrid"])) as rt:
        assert {s: rt.backend.predicted_mb(s) for s in predicted} == predicted
