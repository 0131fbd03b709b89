"""The prepacked session is run through onnxruntime's native run: same outputs, no wrapper retry on other providers."""

from __future__ import annotations

import _tiny
import numpy as np
import pytest

from edge.runtime import Runtime

X = {"x": np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)}


@pytest.mark.parametrize("strategy", ["hybrid", "rebuild"])
def test_static_session_runs_natively_with_the_wrappers_outputs(tmp_path, strategy):
    info = _tiny.make_mlp(tmp_path / "m.onnx", seed=4)
    with Runtime(tmp_path / "m.onnx", strategy=strategy) as rt:
        rt.run(X)
        rt.wait_settled()
        sess = rt.backend._static
        assert sess._edge_run == sess._sess.run  # the native run, not InferenceSession.run
        want = sess.run(None, X)[0]  # the wrapper, on the same session
        np.testing.assert_array_equal(rt.run(X)["logits"], want)
        rt.load_adapter(_tiny.random_adapter(info, seed=1, name="a"))
        rt.switch("a")
        rt.wait_settled()
        sess = rt.backend._static
        assert sess._edge_run == sess._sess.run  # every rebuilt session too
        np.testing.assert_array_equal(rt.run(X)["logits"], sess.run(None, X)[0])
