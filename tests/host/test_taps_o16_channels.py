"""Channels-first token maps: SqueezeBERT keeps its hidden states as ``[B, C, T]`` between its Conv1d blocks.

A tap on such a map is averaged over the real tokens (the ``attention_mask``), as a ``[B, T, C]`` one is: padding a
sentence does not change its features, and they are the numbers of pooling torch's tensor by the mask. A 1-D CNN's
``[B, C, L]`` map whose length is not the mask's is still averaged over every position.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

from edge.errors import ConfigError  # noqa: E402
from edge.route.taps import FEATURES, tap_model  # noqa: E402
from edge.route.tapshapes import FIRST, Layouts  # noqa: E402

NAMES = ("input_ids", "attention_mask")


def _squeezebert():
    torch.manual_seed(0)
    config = T.SqueezeBertConfig(vocab_size=60, hidden_size=32, embedding_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                                 q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2, intermediate_groups=2,
                                 output_groups=2)  # fmt: skip
    return T.SqueezeBertModel(config).eval()


class _Hidden(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask)[0]


def _batch():
    ids = torch.randint(1, 60, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, 5:], mask[0, 5:] = 0, 0
    return ids, mask


@pytest.fixture(scope="module")
def squeezebert(tmp_path_factory):
    """TorchScript export, dynamic batch and length: onnx's inference names the Conv outputs' length ``unk__N``
    (onnxruntime's symbolic inference tells it is the mask's ``t``)."""
    m = _squeezebert()
    path = tmp_path_factory.mktemp("squeezebert") / "sq.onnx"
    ids, mask = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Hidden(m).eval(), (ids, mask), str(path), dynamo=False, opset_version=17,
                          input_names=list(NAMES), output_names=["h"],
                          dynamic_axes={k: {0: "b", 1: "t"} for k in (*NAMES, "h")})  # fmt: skip
    return m, path


def _run(path, ids, mask):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run([FEATURES], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]


def _first_maps(path) -> list[str]:
    """The embedding and layer 0's output in SqueezeBERT's own layout: LayerNorm outputs transposed to [B, C, T]
    (the first and third such: the second is layer 0's post-attention norm)."""
    model = onnx.load(str(path))
    told = Layouts(model)
    users = {i: n for n in model.graph.node for i in n.input}
    norms = [n.output[0] for n in model.graph.node if n.op_type == "LayerNormalization"]
    maps = [users[o].output[0] for o in norms if users.get(o) is not None and users[o].op_type == "Transpose"]
    assert len(maps) == 4 and all(told(t) == FIRST for t in maps)
    return [maps[0], maps[2]]


def _pooled(m, ids, mask, weights=None) -> np.ndarray:
    """Torch's embedding and layer 0's output (``[B, C, T]`` inside the encoder; its hidden states give them as
    ``[B, T, C]``) averaged over the real tokens (or by ``weights``), concatenated."""
    with torch.no_grad():
        seen = m(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[:2]
    w = (mask if weights is None else weights).float()[:, :, None]
    return torch.cat([(h * w).sum(1) / w.sum(1) for h in seen], 1).numpy()


def test_channels_first_taps_pooled_over_real_tokens(squeezebert, tmp_path):
    m, path = squeezebert
    maps = _first_maps(path)
    tapped = tap_model(path, tmp_path / "sq.taps.onnx", maps)
    ids, mask = _batch()
    got = _run(tapped.path, ids, mask)
    alone = _run(tapped.path, ids[:1, :5], mask[:1, :5])  # the short sentence unpadded
    np.testing.assert_allclose(alone[0], got[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, _pooled(m, ids, mask), rtol=1e-4, atol=1e-5)
    # one tap: pooled straight into the output by the mask weights, the same numbers
    one = tap_model(path, tmp_path / "sq.one.onnx", maps[-1:])
    np.testing.assert_allclose(_run(one.path, ids, mask), got[:, -32:], rtol=1e-5, atol=1e-6)
    # a [B, C, T] and a [B, T, C] tap together, each by its own weights
    both = tap_model(path, tmp_path / "sq.both.onnx", [maps[-1], *_lasts(path)])
    mixed = _run(both.path, ids, mask)
    np.testing.assert_allclose(_run(both.path, ids[:1, :5], mask[:1, :5])[0], mixed[0], rtol=1e-4, atol=1e-5)


def _lasts(path) -> list[str]:
    return [n.input[0] for n in onnx.load(str(path)).graph.node if n.op_type == "LayerNormalization"][:1]


def test_mask_none_averages_every_position(squeezebert, tmp_path):
    m, path = squeezebert
    maps = _first_maps(path)
    tapped = tap_model(path, tmp_path / "sq.nomask.onnx", maps, mask=None)
    ids, mask = _batch()
    got = _run(tapped.path, ids, mask)
    np.testing.assert_allclose(got, _pooled(m, ids, mask, torch.ones_like(mask)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="mask 'nope' is not a \\[batch, tokens\\] input"):
        tap_model(path, tmp_path / "sq.bad.onnx", maps, mask="nope")


def test_one_d_cnn_with_another_length_is_not_masked(tmp_path):
    """A strided Conv1d over a [B, L] input with a [B, L] mask: its [B, C, L / 2] map is no token map."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(1, 4, 3, stride=2, padding=1)

        def forward(self, x, attention_mask):
            return self.conv(x[:, None, :] * attention_mask[:, None, :]).relu().mean(2)

    torch.manual_seed(0)
    net, x, mask = Net().eval(), torch.randn(2, 16), torch.ones(2, 16)
    path = tmp_path / "cnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x, mask), str(path), dynamo=False, opset_version=17,
                          input_names=["x", "attention_mask"], output_names=["y"])  # fmt: skip
    conv = next(n.output[0] for n in onnx.load(str(path)).graph.node if n.op_type == "Conv")
    tapped = tap_model(path, tmp_path / "cnn.taps.onnx", [conv])
    sess = ort.InferenceSession(str(tapped.path), providers=["CPUExecutionProvider"])
    half = torch.ones(2, 16)
    half[:, 8:] = 0
    got = sess.run([FEATURES], {"x": x.numpy(), "attention_mask": half.numpy()})[0]
    with torch.no_grad():
        want = net.conv(x[:, None, :] * half[:, None, :]).mean(2).numpy()  # every one of the 8 positions
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a dynamo export
def test_squeezebert_from_the_hf_exporter(tmp_path):
    """The project's exporter (dynamo, dynamic length: the Conv outputs' length is the mask's ``seq``)."""
    from exporters.hf import export_hf_encoder

    path = tmp_path / "sq.onnx"
    export_hf_encoder(_squeezebert(), path, pooling="mean", seq_len=12, dynamic_seq=True, progress=False)
    model = onnx.load(str(path))
    told = Layouts(model)
    maps = [n.output[0] for n in model.graph.node if n.op_type == "Conv" and told(n.output[0]) == FIRST]
    tapped = tap_model(path, tmp_path / "sq.taps.onnx", maps[-2:])
    ids, mask = _batch()
    sess = ort.InferenceSession(str(tapped.path), providers=["CPUExecutionProvider"])

    def run(i, k):
        feeds = {"input_ids": i.numpy(), "attention_mask": k.numpy(), "token_type_ids": np.zeros_like(i.numpy())}
        return sess.run([FEATURES], {x.name: feeds[x.name] for x in sess.get_inputs()})[0]

    got = run(ids, mask)
    np.testing.assert_allclose(run(ids[:1, :5], mask[:1, :5])[0], got[0], rtol=1e-4, atol=1e-5)
