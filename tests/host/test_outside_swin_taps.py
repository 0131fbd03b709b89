"""Swin's tap sets: its block outputs and some norm outputs sit behind window reshapes, so onnx's shape inference
leaves their feature width unknown (``attn-in``, ``mlp-in``, ``blocks`` and ``all`` were refused with a
ConfigError); onnxruntime's symbolic inference sizes them."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
T = pytest.importorskip("transformers")
from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.route.taps import FEATURES, Head, tap_model  # noqa: E402
from edge.runtime import Runtime  # noqa: E402


class Pooled(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(pixel_values=x).pooler_output


@pytest.fixture(scope="module")
def swin(tmp_path_factory):
    d = tmp_path_factory.mktemp("swin")
    torch.manual_seed(0)
    cfg = T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Pooled(T.SwinModel(cfg)).eval(), (torch.randn(2, 3, 32, 32),), str(d / "m.onnx"),
                          dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}})  # fmt: skip
    import_onnx(d / "m.onnx", d / "m.edge.onnx")
    return d / "m.edge.onnx"


@pytest.mark.parametrize("taps", ["attn-in", "mlp-in", "blocks", "all"])
def test_every_tap_set_resolves_on_swin_and_its_features_are_the_pooled_taps(swin, tmp_path, taps):
    tapped = tap_model(swin, tmp_path / "t.onnx", taps, head=Head(2, 2))
    xs = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    m = onnx.load(str(tmp_path / "t.onnx"))
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tapped.tensors)
    onnx.save(m, str(tmp_path / "raw.onnx"))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "raw.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": xs})))
    want = np.concatenate([got[t].mean(1) for t in tapped.tensors], axis=1)  # [B, T, C] taps, pooled over T
    assert want.shape == (3, tapped.width)
    np.testing.assert_allclose(got[FEATURES], want, rtol=1e-5, atol=1e-5)
    with Runtime(tapped.path) as rt, Runtime(swin) as orig:  # the model's own output is unchanged
        np.testing.assert_array_equal(rt.run({"x": xs})["y"], orig.run({"x": xs})["y"])
