"""A 1-D CNN fed a raw waveform ``[B, L]`` (``x.unsqueeze(1)`` inside: torchaudio's M5, keyword spotting on raw
audio) gets the same CNN stages as one fed ``[B, 1, L]``.

``_feature_maps`` started its resolution levels only at a graph input of the maps' rank, so a ``[B, L]`` input
gave no map at all: ``taps="stages"``, ``"residual"`` and ``"auto"`` refused the model ('0 CNN stages').
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from edge.route.taps import FEATURES, tap_model  # noqa: E402

LENGTH = 400


class M5(nn.Module):
    def __init__(self, channel_inside: bool):
        super().__init__()
        self.inside = channel_inside
        self.c1, self.b1 = nn.Conv1d(1, 8, 16, stride=4), nn.BatchNorm1d(8)
        self.c2, self.b2 = nn.Conv1d(8, 16, 3), nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        if self.inside:
            x = x.unsqueeze(1)
        x = torch.max_pool1d(torch.relu(self.b1(self.c1(x))), 4)
        x = torch.max_pool1d(torch.relu(self.b2(self.c2(x))), 2)
        return self.fc(x.mean(-1))


def _export(path, inside: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, LENGTH) if inside else torch.randn(2, 1, LENGTH)
    torch.onnx.export(M5(inside).eval(), (x,), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)  # fmt: skip


@pytest.mark.parametrize("tap_set", ["stages", "auto"])
def test_a_waveform_cnn_gets_the_stages_of_its_channel_first_twin_pooled_over_the_length(tmp_path, tap_set):
    flat, shaped = tmp_path / "flat.onnx", tmp_path / "shaped.onnx"
    _export(flat, True)
    _export(shaped, False)
    a = tap_model(flat, tmp_path / "flat.tapped.onnx", tap_set)
    b = tap_model(shaped, tmp_path / "shaped.tapped.onnx", tap_set)
    assert a.tensors == b.tensors and len(a.tensors) == 3 and a.width == b.width == 8 + 16 + 16
    x = np.random.default_rng(1).standard_normal((3, LENGTH)).astype(np.float32)
    feats = ort.InferenceSession(str(a.path)).run([FEATURES], {"x": x})[0]
    np.testing.assert_allclose(feats, ort.InferenceSession(str(b.path)).run([FEATURES], {"x": x[:, None]})[0],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    m = onnx.load(flat)  # the raw maps [B, C, L], each averaged over L
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in a.tensors)
    raw = ort.InferenceSession(m.SerializeToString()).run(list(a.tensors), {"x": x})
    assert all(r.ndim == 3 for r in raw)
    np.testing.assert_allclose(feats, np.concatenate([r.mean(2) for r in raw], 1), rtol=1e-5, atol=1e-6)
