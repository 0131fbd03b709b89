"""Stage taps on a CRNN: conv stages, then the map permuted for a recurrent layer (``permute(0, 3, 1, 2)``:
``[B, C, H, W]`` -> ``[B, W, C, H]``, the same perm as NHWC -> NCHW). The permuted tensor's channels are neither
first nor last: it is not a stage; the stages are the conv maps before it, pooled over their spatial axes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from edge.route.taps import FEATURES, tap_model  # noqa: E402


class CRNN(nn.Module):
    def __init__(self, rnn: type):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.rnn = rnn(12 * 2, 16, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):  # x [B, 1, 8, 16]
        h = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)  # [B, 8, 4, 8]
        h = nn.functional.max_pool2d(torch.relu(self.b2(self.c2(h))), (2, 1))  # [B, 12, 2, 8]
        h = h.permute(0, 3, 1, 2).reshape(h.shape[0], h.shape[3], -1)  # [B, 8, 24]: time = width
        out, _ = self.rnn(h)
        return self.fc(out[:, -1])


@pytest.fixture(scope="module", params=[nn.GRU, nn.LSTM], ids=["gru", "lstm"])
def crnn(request, tmp_path_factory):
    from exporters.onnx import export_onnx

    torch.manual_seed(0)
    model = CRNN(request.param).eval()
    path = tmp_path_factory.mktemp("crnn") / "crnn.onnx"
    export_onnx(model, (torch.randn(2, 1, 8, 16),), path, input_names=["x"], output_names=["logits"], name="crnn")
    return path


@pytest.mark.parametrize("taps", ["stages", "auto"])
def test_a_crnn_is_tapped_at_its_conv_stages_not_at_the_map_permuted_for_its_recurrent_layer(crnn, taps, tmp_path):
    tapped = tap_model(crnn, tmp_path / "t.onnx", taps)
    # the last map at each resolution (after conv 1; after the first pool and conv 2; after the (2, 1) pool), never
    # the permuted tensor (it was taken as a stage, then refused as a tap whose layout the graph does not tell)
    assert tapped.width == 8 + 12 + 12 and not any("permute" in t for t in tapped.tensors), tapped
    model = onnx.load(str(tapped.path))
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tapped.tensors)  # the raw tapped maps
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 16)).astype(np.float32)
    feats, *maps = sess.run([FEATURES, *tapped.tensors], {"x": x})
    assert [m.ndim for m in maps] == [4, 4, 4] and [m.shape[1] for m in maps] == [8, 12, 12]  # NCHW stage maps
    np.testing.assert_allclose(feats, np.concatenate([m.mean(axis=(2, 3)) for m in maps], 1), rtol=1e-5, atol=1e-5)
