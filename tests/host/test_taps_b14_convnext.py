"""ConvNeXt saved by onnxruntime's optimizer: its residual sums in channels-last form are still residual taps.

At level EXTENDED onnxruntime cancels the Transposes around a ConvNeXt block's residual ``Add``, which then sums
two ``[B, H, W, C]`` maps; ``residual`` found fewer sums on the saved file (1 of 2 here). The sum is tapped where the
optimizer put it and pooled over ``H, W`` (its layout told by the graph): the same features as before the optimizer.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from edge.route.taps import FEATURES, tap_model  # noqa: E402
from edge.route.tapshapes import FIRST, LAST, Layouts  # noqa: E402


@pytest.fixture(scope="module")
def convnext(tmp_path_factory):
    from test_hf_families import FAMILIES, build

    from exporters.hf import export_hf_encoder

    path, side = tmp_path_factory.mktemp("convnext") / "m.onnx", FAMILIES["convnext"][1]
    export_hf_encoder(build("convnext"), path, image_size=side, progress=False)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return path, path.with_suffix(".opt.onnx"), side


@pytest.mark.parametrize("tap_set", ["residual", "stages", "auto"])
def test_convnext_saved_by_onnxruntimes_optimizer_gets_the_same_residual_taps(convnext, tmp_path, tap_set):
    plain, optimised, side = convnext
    x = {"pixel_values": np.random.default_rng(0).standard_normal((3, 3, side, side)).astype(np.float32)}
    a, b = (tap_model(p, tmp_path / f"{k}.onnx", tap_set) for k, p in enumerate((plain, optimised)))
    assert len(a.tensors) == len(b.tensors) >= 2 and a.width == b.width
    run = [ort.InferenceSession(str(t.path), providers=["CPUExecutionProvider"]) for t in (a, b)]
    fa, fb = (r.run([FEATURES], x)[0] for r in run)
    np.testing.assert_allclose(fb, fa, rtol=1e-5, atol=1e-5)
    if tap_set == "residual":  # one of the optimised file's sums is channels-last, the plain file's none
        told = [Layouts(onnx.load(str(p))) for p in (plain, optimised)]
        assert [told[0](t) for t in a.tensors] == [FIRST] * len(a.tensors)
        assert LAST in [told[1](t) for t in b.tensors]
