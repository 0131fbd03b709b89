"""Tap sets on transformers torch exports below opset 17: layer norms written out, reshapes sized at run time."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.route.taps import tap_model  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from tests.host.test_outside_onnx_exports import Hand  # noqa: E402


@pytest.mark.parametrize("taps", ["attn", "mlp-in", "attn-in", "auto"])
def test_taps_of_an_opset_13_export_with_a_dynamic_batch_equal_those_of_opset_17(tmp_path, taps):
    torch.manual_seed(0)
    model, x = Hand().eval(), torch.randn(2, 4, 16)
    features = []
    for opset, axes in ((17, None), (13, {"x": {0: "b"}})):  # 13: no LayerNormalization op, reshapes from Shape
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(tmp_path / f"{opset}.onnx"), dynamo=False, opset_version=opset,
                              input_names=["x"], output_names=["y"], dynamic_axes=axes)  # fmt: skip
        import_onnx(tmp_path / f"{opset}.onnx", tmp_path / f"{opset}.edge.onnx")
        tap_model(tmp_path / f"{opset}.edge.onnx", tmp_path / f"{opset}.tapped.onnx", taps)
        with Runtime(tmp_path / f"{opset}.tapped.onnx") as rt:
            features.append(rt.run({"x": x.numpy()})["edge.features"])
    np.testing.assert_allclose(features[1], features[0], atol=1e-5)
