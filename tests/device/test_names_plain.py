"""Adapter names reach a :class:`~edge.runtime.Runtime` as plain ``str`` (``edge.fusion.plain_name``).

A ``str`` subclass can answer ``==`` differently from one call to the next. Before, ``unload_adapter`` asked "is it
active?" and "is it held?" with the caller's object, and ``switch`` kept the caller's object as the active name: a
name equal for one look-up and not for the next removed an adapter that was still fused into the weights (no longer
listed, its bytes no longer counted against the memory budget). Now each entry point takes the plain copy first.
"""

from __future__ import annotations

import _tiny
import numpy as np
import pytest

from edge.errors import ConfigError
from edge.runtime import Runtime

X = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)


class Shifty(str):
    """A name whose ``==`` gives the listed answers, one a call, then str's own."""

    def __new__(cls, value: str, answers):
        name = super().__new__(cls, value)
        name.answers = list(answers)
        return name

    def __eq__(self, other):
        return self.answers.pop(0) if self.answers else str.__eq__(self, other)

    __hash__ = str.__hash__


@pytest.fixture
def rt(tmp_path):
    info = _tiny.make_mlp(tmp_path / "m.onnx")
    with Runtime(tmp_path / "m.onnx", strategy="bound") as rt:
        rt.load_adapter(_tiny.random_adapter(info, 1, name="a"))
        rt.base_out = rt.run(X)["logits"]
        yield rt


def _still_fused_and_held(rt) -> None:
    assert rt.active == {"a": 1.0} and rt.adapters == ["a"] and set(rt.adapter_bytes) == {"a"}
    assert not np.array_equal(rt.run(X)["logits"], rt.base_out)
    rt.switch(None)
    np.testing.assert_array_equal(rt.run(X)["logits"], rt.base_out)
    rt.unload_adapter("a")
    assert rt.adapters == [] and rt.footprint["adapters_mb"] == 0


def test_names_plain_unload_of_an_active_adapter_is_refused_whatever_its_name_answers(rt):
    rt.switch("a")
    with pytest.raises(ConfigError, match="is active"):  # before: "not active" (1st ==), "held" (2nd), removed
        rt.unload_adapter(Shifty("a", [False, True, True]))
    _still_fused_and_held(rt)


def test_names_plain_switch_keeps_the_plain_name_as_active(rt):
    name = Shifty("a", [True, False])  # found when switching; before, later unequal to "a" as the active name
    rt.switch(name)
    with pytest.raises(ConfigError, match="is active"):
        rt.unload_adapter("a")
    assert [type(k) for k in rt.active] == [str]
    _still_fused_and_held(rt)


@pytest.mark.parametrize("spec", [lambda n: [n], lambda n: {n: 1.0}])
def test_names_plain_every_switch_spec_and_load_name_is_plain(rt, spec):
    rt.switch(spec(Shifty("a", [])))
    assert [type(k) for k in rt.active] == [str]
    rt.load_adapter(rt.adapter(Shifty("a", [])), name=Shifty("b", []))
    assert [type(k) for k in rt._adapters] == [str, str]
    with pytest.raises(ConfigError, match="must be a string, got int"):
        rt.switch({1: 1.0})
    with pytest.raises(ConfigError, match="must be a string, got bytes"):
        rt.unload_adapter(b"a")
