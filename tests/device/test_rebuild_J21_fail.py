"""Strategy ``rebuild`` after a switch whose session build fails twice (review finding F3).

Before: the switch's write dropped the serving session and its build failed (out of memory), the switch's recovery
write restored the weights but its build failed too, and from then on every run raised BackendUnavailableError with
a wrong message (onnxruntime: "closed, or its bound session could not be built (None)"; LiteRT: "see the log",
nothing logged), and nothing ever built a session again. Now a run with no session for the current weights builds
one under the lock (rebuild holds one session: nothing old is kept to serve): it serves the restored weights, or
raises the build's own OutOfMemoryError, and a later run succeeds once memory is back. The weights and the active
adapter stay as they were before the switch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.errors import BackendUnavailableError, OutOfMemoryError
from edge.runtime import Runtime

DIGITS = Path.home() / ".cache" / "edge" / "digits-07d9c19ac5e7"
X = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
FILES = {"onnx": ("encoder.onnx", "", "onnxruntime"), "tflite": ("encoder.tflite", ".tflite", "ai_edge_litert")}


def _runtime(kind: str) -> Runtime:
    model, suffix, lib = FILES[kind]
    if not (DIGITS / model).is_file():
        pytest.skip(f"make demo has not built the digits {model}")
    pytest.importorskip(lib)
    rt = Runtime(DIGITS / model, strategy="rebuild")
    for name in ("rotate", "invert"):
        rt.load_adapter(DIGITS / f"shira-{name}{suffix}.safetensors")
    return rt


def _weights(rt) -> dict[str, np.ndarray]:
    return {p: rt.weights(p) for p in rt.info.tensors}


def _failing(rt, times: int):
    """Replace the backend's session build: the next ``times`` builds fail out of memory."""
    real, left = rt.backend._build_fresh, [times]

    def build():
        if left[0] > 0:
            left[0] -= 1
            raise OutOfMemoryError("injected: could not allocate the packed session")
        return real()

    rt.backend._build_fresh = build
    return real, left


@pytest.mark.parametrize("kind", ["onnx", "tflite"])
def test_a_run_after_a_doubly_failed_build_builds_and_serves_the_state_kept(kind):
    rt = _runtime(kind)
    try:
        rt.switch("rotate")
        want, weights = rt.run({"pixels": X})["logits"].copy(), _weights(rt)
        _, left = _failing(rt, 2)  # the switch's build, then its recovery's
        with pytest.raises(OutOfMemoryError):
            rt.switch("invert")
        assert left == [0] and rt.active == {"rotate": 1.0}
        after = _weights(rt)
        assert after.keys() == weights.keys() and all(np.array_equal(v, weights[k]) for k, v in after.items())
        np.testing.assert_array_equal(rt.run({"pixels": X})["logits"], want)  # built by this run
        np.testing.assert_array_equal(rt.run({"pixels": X})["logits"], want)  # and kept serving
    finally:
        rt.close()


@pytest.mark.parametrize("kind", ["onnx", "tflite"])
def test_a_run_while_memory_is_short_raises_the_builds_error_and_a_later_one_succeeds(kind):
    rt = _runtime(kind)
    try:
        rt.switch("rotate")
        want = rt.run({"pixels": X})["logits"].copy()
        real, left = _failing(rt, 99)
        with pytest.raises(OutOfMemoryError):
            rt.switch("invert")
        for _ in range(2):  # each run tries again: the build's own typed error, never BackendUnavailableError
            with pytest.raises(OutOfMemoryError, match="injected"):
                rt.run({"pixels": X})
        assert left == [95]
        left[0] = 0  # memory is back
        np.testing.assert_array_equal(rt.run({"pixels": X})["logits"], want)
        rt.switch("invert")  # and switching works again
        assert not np.array_equal(rt.run({"pixels": X})["logits"], want)
    finally:
        rt.close()


@pytest.mark.parametrize("kind", ["onnx", "tflite"])
@pytest.mark.parametrize("strategy", ["rebuild", "hybrid"])
def test_a_closed_backend_says_closed_and_nothing_else(kind, strategy):
    model, _, lib = FILES[kind]
    if not (DIGITS / model).is_file():
        pytest.skip(f"make demo has not built the digits {model}")
    pytest.importorskip(lib)
    rt = Runtime(DIGITS / model, strategy=strategy)
    backend = rt.backend
    rt.close()
    with pytest.raises(BackendUnavailableError) as e:
        backend.run({"pixels": X})
    msg = str(e.value)
    assert "closed" in msg and "digits-vit" in msg
    assert "see the log" not in msg and "could not be built" not in msg
