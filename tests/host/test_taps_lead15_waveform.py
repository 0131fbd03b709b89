"""``stages`` taps on a model fed a raw waveform ``[B, L]`` that torch slices whole before giving it its channel axis
(``input_values[:, None]`` in wav2vec2's feature encoder: ``Slice`` then ``Unsqueeze``): the conv stages after it are
found (they were not: the slice hid the input), each pooled over time."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")
from torch import nn  # noqa: E402

from edge.route.taps import FEATURES, tap_model  # noqa: E402


class Wrapped(nn.Module):
    def __init__(self, enc):
        super().__init__()
        self.enc, self.fc = enc, nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.enc(input_values=x).last_hidden_state.mean(1))


@pytest.fixture(scope="module")
def wav2vec2(tmp_path_factory):
    from exporters.onnx import export_onnx

    torch.manual_seed(0)
    cfg = T.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True,
    )  # fmt: skip
    enc = T.Wav2Vec2Model(cfg).eval()
    enc.masked_spec_embed = None  # SpecAugment's, unused in eval
    path = tmp_path_factory.mktemp("w2v") / "w2v.onnx"
    export_onnx(Wrapped(enc).eval(), (torch.randn(2, 400),), path, input_names=["x"], output_names=["logits"],
                name="w2v", progress=False)  # fmt: skip
    return path


def test_the_stages_after_a_sliced_waveform_are_found_and_pooled_over_time(wav2vec2, tmp_path):
    tapped = tap_model(wav2vec2, tmp_path / "t.onnx", "stages")
    # one map per resolution: the first conv layer's (8 channels, stride 5), then the last map at the second one
    # (stride 2): the positional conv's, 16 channels (the hidden size) over the same frames
    assert len(tapped.tensors) == 2 and tapped.width == 8 + 16, tapped
    model = onnx.load(str(tapped.path))
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tapped.tensors)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 400)).astype(np.float32)
    feats, *maps = sess.run([FEATURES, *tapped.tensors], {"x": x})
    assert [m.shape[:2] for m in maps] == [(3, 8), (3, 16)] and maps[0].shape[2] > maps[1].shape[2]  # [B, C, L]
    np.testing.assert_allclose(feats, np.concatenate([m.mean(axis=2) for m in maps], 1), rtol=1e-5, atol=1e-5)
