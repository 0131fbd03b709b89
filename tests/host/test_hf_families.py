"""Every Hugging Face architecture export_hf_encoder knows, from tiny random configs (no downloads).

Each family: export, embeddings on onnxruntime vs torch pooled the architecture's way, then a SHiRA
adapter in torch layout switched in (vs torch with the delta merged) and undone bit-exactly.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

from edge.errors import ConfigError  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

TEXT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=40)
SEQ = 8


def _vit_like(cls, **kw):
    return cls(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, **kw)


#: model_type -> (build the model, image side or None for text, how torch defines the embedding)
FAMILIES = {
    "resnet": (
        lambda: T.ResNetModel(
            T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
        ),
        32,
        "pooler",
    ),
    "convnext": (
        lambda: T.ConvNextModel(
            T.ConvNextConfig(
                hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2, layer_scale_init_value=1.0
            )
        ),
        16,
        "pooler",
    ),
    "dinov2": (lambda: T.Dinov2Model(_vit_like(T.Dinov2Config, patch_size=4, image_size=16)), 16, "cls"),
    "mobilevit": (
        lambda: T.MobileViTModel(
            T.MobileViTConfig(
                image_size=32,
                hidden_sizes=[16, 16, 16],
                neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16],
                num_attention_heads=2,
                patch_size=2,
            )
        ),
        32,
        "pooler",
    ),
    "distilbert": (
        lambda: T.DistilBertModel(
            T.DistilBertConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=40, max_position_embeddings=16)
        ),
        None,
        "mean",
    ),
    "roberta": (lambda: T.RobertaModel(T.RobertaConfig(**TEXT, max_position_embeddings=20)), None, "mean"),
    # slower or covered in spirit by the ones above
    "bert": (lambda: T.BertModel(T.BertConfig(**TEXT, max_position_embeddings=16)), None, "mean"),
    "xlm-roberta": (lambda: T.XLMRobertaModel(T.XLMRobertaConfig(**TEXT, max_position_embeddings=20)), None, "mean"),
    "mpnet": (lambda: T.MPNetModel(T.MPNetConfig(**TEXT, max_position_embeddings=20)), None, "mean"),
    "albert": (
        lambda: T.AlbertModel(T.AlbertConfig(**TEXT, embedding_size=8, max_position_embeddings=16)),
        None,
        "mean",
    ),
    "electra": (
        lambda: T.ElectraModel(T.ElectraConfig(**TEXT, embedding_size=8, max_position_embeddings=16)),
        None,
        "mean",
    ),
    "vit": (lambda: T.ViTModel(_vit_like(T.ViTConfig, image_size=16, patch_size=8)), 16, "cls"),
    "deit": (lambda: T.DeiTModel(_vit_like(T.DeiTConfig, image_size=16, patch_size=8)), 16, "cls"),
    "swin": (
        lambda: T.SwinModel(
            T.SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4)
        ),
        16,
        "pooler",
    ),
    "regnet": (
        lambda: T.RegNetModel(T.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8)),
        32,
        "pooler",
    ),
    "mobilenet_v2": (
        lambda: T.MobileNetV2Model(T.MobileNetV2Config(depth_multiplier=0.25, image_size=32)),
        32,
        "pooler",
    ),
    "efficientnet": (
        lambda: T.EfficientNetModel(
            T.EfficientNetConfig(width_coefficient=0.1, depth_coefficient=0.1, image_size=32, hidden_dim=128)
        ),
        32,
        "pooler",
    ),
}
#: MobileViT's export (10 s) with -m slow: test_taps_c13_fused.py exports and taps it in make test
FAST = ("resnet", "convnext", "dinov2", "distilbert", "roberta")
CASES = [pytest.param(f, id=f, marks=() if f in FAST else pytest.mark.slow) for f in FAMILIES]


def build(family: str):
    torch.manual_seed(0)
    model = FAMILIES[family][0]().eval()
    with torch.no_grad():  # HF initialises BatchNorm scales at ~0.02: activations vanish in deep tiny CNNs
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


def feeds(model, side: int | None, names) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    if side is not None:
        return {"pixel_values": rng.standard_normal((3, model.config.num_channels, side, side)).astype(np.float32)}
    ids = rng.integers(3, model.config.vocab_size, (3, SEQ))
    mask = np.ones((3, SEQ), np.int64)
    mask[1, 5:] = mask[2, 3:] = 0
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {n: arrays[n] for n in names}


def reference(model, inputs: dict[str, np.ndarray], pooling: str) -> np.ndarray:
    """The architecture's embedding, computed in torch without the exporter's wrapper."""
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    if pooling == "pooler":
        return out.pooler_output.flatten(1).numpy()
    hidden = out.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0].numpy()
    m = torch.from_numpy(inputs["attention_mask"]).unsqueeze(-1).float()
    return ((hidden * m).sum(1) / m.sum(1)).numpy()


def close(got, want, tol: float = 1e-5) -> None:
    """Within ``tol``, relative to the largest value when values are large."""
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("family", CASES)
def test_family_exports_pooled_its_way_and_switches_an_adapter(family, tmp_path):
    from exporters.hf import export_hf_encoder

    model = build(family)
    _, side, pooling = FAMILIES[family]
    info = export_hf_encoder(model, tmp_path / "m.onnx", image_size=side, seq_len=None if side else SEQ, progress=False)
    assert info.extra["model_type"] == family and info.extra["pooling"] == pooling
    x = feeds(model, side, info.inputs)
    prefix = model.base_model_prefix + "."
    target = list(info.tensors)[-1]  # the last weight of the model: its delta reaches the embedding undamped
    param = dict(model.named_parameters())[target.removeprefix(prefix)]
    rng = np.random.default_rng(2)
    flat = rng.choice(param.numel(), size=min(8, param.numel()), replace=False)
    idx = np.stack(np.unravel_index(flat, tuple(param.shape))).astype(np.int32)
    values = (rng.standard_normal(idx.shape[1]) * 0.5).astype(np.float32)
    adapter = Adapter("a", info.fingerprint, {target: SparseDelta(idx, values)}, {target: tuple(param.shape)})
    merged = copy.deepcopy(model)
    with torch.no_grad():
        dict(merged.named_parameters())[target.removeprefix(prefix)][tuple(idx)] += torch.from_numpy(values)

    with Runtime(tmp_path / "m.onnx", strategy="rebuild") as rt:
        base = rt.run(x)["embeddings"]
        rt.load_adapter(adapter)
        rt.switch("a")
        adapted = rt.run(x)["embeddings"]
        rt.switch(None)
        np.testing.assert_array_equal(rt.run(x)["embeddings"], base)
        np.testing.assert_array_equal(rt.weights(target), param.detach().numpy())
    want = reference(model, x, pooling)
    assert base.shape == want.shape and base.ndim == 2
    close(base, want)
    close(adapted, reference(merged, x, pooling))
    assert np.abs(adapted - base).max() > 1e-5, f"the delta on {target} changed nothing"


def test_every_registered_architecture_has_a_case():
    from exporters.hf import ARCHITECTURES

    assert sorted(ARCHITECTURES) == sorted(FAMILIES)
    assert {f: FAMILIES[f][2] for f in FAMILIES} == ARCHITECTURES


def test_unsupported_architectures_and_bad_settings_are_refused(tmp_path):
    from exporters.hf import export_hf_encoder, register_architecture

    gpt2 = T.GPT2Model(T.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16)).eval()
    with pytest.raises(ConfigError, match=r"architecture 'gpt2' \(GPT2Model\) is not one.*pass pooling="):
        export_hf_encoder(gpt2, tmp_path / "g.onnx", seq_len=SEQ, progress=False)
    with pytest.raises(ConfigError, match="seq_len 19 is longer than roberta's 18 positions"):
        export_hf_encoder(build("roberta"), tmp_path / "r.onnx", seq_len=19, progress=False)
    with pytest.raises(ConfigError, match=r"4-D feature map.*pooling='pooler'"):
        export_hf_encoder(build("resnet"), tmp_path / "r.onnx", image_size=32, pooling="mean", progress=False)
    from edge.errors import RegistryError

    with pytest.raises(RegistryError, match="'resnet' is already registered"):
        register_architecture("resnet", "mean")
    assert not list(tmp_path.iterdir())
