"""The first released integer adapter (issue 18) and its int8 model keep loading, bit-exact."""

from pathlib import Path

import numpy as np

from edge.format.adapter import load_adapter
from edge.runtime import Runtime

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def test_int8_v1_files_load_and_reproduce_the_integers_and_outputs():
    expected = np.load(GOLDEN / "expected-int8-v1.npz")
    a = load_adapter(GOLDEN / "adapter-int8-v1.safetensors")
    assert a.name == "golden-int8" and all(d.qvalues.dtype == np.int8 for d in a.tensors.values())
    for strategy in ("hybrid", "bound", "rebuild"):
        with Runtime(GOLDEN / "tiny-mlp-int8-v1.onnx", strategy=strategy) as rt:
            base = {k: rt.weights(k) for k in rt.info.tensors}
            rt.load_adapter(a)
            np.testing.assert_allclose(rt.run(expected["x"])["logits"], expected["base"], rtol=1e-5, atol=1e-5)
            rt.switch("golden-int8")
            rt.wait_settled(30)
            for k in rt.info.tensors:  # the integers written are exactly the released ones
                np.testing.assert_array_equal(rt.weights(k), expected[f"w:{k}"])
            np.testing.assert_allclose(rt.run(expected["x"])["logits"], expected["adapted"], rtol=1e-5, atol=1e-5)
            rt.switch(None)
            for k, w in base.items():
                np.testing.assert_array_equal(rt.weights(k), w)
