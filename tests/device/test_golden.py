"""Released file-format versions keep loading and give the same outputs."""

from pathlib import Path

import numpy as np

from edge.format.adapter import ADAPTER_VERSION, load_adapter
from edge.format.modelinfo import MODEL_VERSION
from edge.runtime import Runtime

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def test_v1_files_load_and_reproduce_outputs():
    assert ADAPTER_VERSION >= 1 and MODEL_VERSION >= 1
    expected = np.load(GOLDEN / "expected-v1.npz")
    a = load_adapter(GOLDEN / "adapter-v1.safetensors")
    assert a.name == "golden-a" and a.method == "shira"
    with Runtime(GOLDEN / "tiny-mlp-v1.onnx") as rt:
        rt.load_adapter(a)
        np.testing.assert_allclose(rt.run(expected["x"])["logits"], expected["base"], rtol=1e-6, atol=1e-6)
        rt.switch("golden-a")
        rt.wait_settled(30)
        np.testing.assert_allclose(rt.run(expected["x"])["logits"], expected["adapted"], rtol=1e-6, atol=1e-6)
