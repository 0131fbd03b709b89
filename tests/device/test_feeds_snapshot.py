"""A feed dict another thread changes while ``Runtime.run`` looks at it: what is checked is what runs.

Under ``bound`` (and ``hybrid`` right after a switch) the writable weights are graph inputs bound to the arena, so
a weight name that reached the backend would rebind a weight for good. ``run`` used to check a dict's signature and
copy it afterwards: a name added in between (another thread holding the caller's dict) ran unchecked, and under
``bound`` the weight stayed rebound to the caller's array (the old code failed here at event 7 of 77). The dict is
now copied first. The interleavings are replayed deterministically: a profile hook adds a weight name to the
caller's dict at the n-th interpreter event of ``run``, for every n up to the end of the call.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from edge.errors import ConfigError
from edge.runtime import Runtime
from tests._tiny import make_mlp


def _attacked_run(rt: Runtime, feeds: dict, at: int, weight: str, bad: np.ndarray) -> tuple[bool, int]:
    """Run with a profile hook that puts ``weight: bad`` into ``feeds`` at event ``at``; (injected, events seen)."""
    seen = [0, False]

    def hook(frame, event, arg):
        if seen[0] == at and not seen[1]:
            feeds[weight] = bad
            seen[1] = True
        seen[0] += 1

    sys.setprofile(hook)
    try:
        rt.run(feeds)
    except ConfigError:
        pass  # the weight name was seen and refused: fine
    finally:
        sys.setprofile(None)
        feeds.pop(weight, None)
    return seen[1], seen[0]


@pytest.mark.parametrize("strategy", ["bound", "hybrid", "rebuild"])
def test_a_weight_name_added_during_run_never_reaches_the_weights(tmp_path, strategy):
    info = make_mlp(tmp_path / "m.onnx")
    weight = info.tensors["fc1.weight"].initializer
    x = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    with Runtime(tmp_path / "m.onnx", strategy=strategy) as rt:
        rt.run({"x": x})  # the signature is remembered: the fast path is what the attack meets
        want = rt.run({"x": x})["logits"].copy()
        bad = np.zeros(rt.backend.read(weight).shape, np.float32)
        at, injected = 0, True
        while injected:  # every event of the call, until the hook no longer fires inside it
            injected, events = _attacked_run(rt, {"x": x}, at, weight, bad)
            got = rt.run({"x": x})["logits"]
            assert np.array_equal(got, want), f"the weights changed when a name was added at event {at} of {events}"
            at += 1
        assert at > 3  # the hook saw the call's steps, not just its entry
