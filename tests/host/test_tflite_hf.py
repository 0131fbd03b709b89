"""Every Hugging Face family export_hf_encoder knows, exported to ``.tflite`` and run on LiteRT (no downloads).

The same tiny random-config models as ``test_hf_families.py`` (the ONNX side). Each family: embeddings on
LiteRT vs torch pooled the architecture's way (within 1e-5, relative where values are large), then a SHiRA
adapter in torch layout on the model's last weight and on its first BatchNorm-folded conv weight (if any)
switched in (vs torch with the delta merged) and undone bit-exactly.

Needs litert-torch, which only the TFLite venv has::

    make test-tflite
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")
pytest.importorskip(
    "litert_torch",
    reason="TFLite export needs litert-torch, which the main .venv does not have: run `make test-tflite`",
)

from test_hf_families import FAMILIES, SEQ, build, close, feeds, reference  # noqa: E402

from edge.errors import ConfigError  # noqa: E402
from edge.format.adapter import Adapter, DenseDelta, SparseDelta  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

FAST = ("resnet", "convnext", "dinov2", "distilbert", "roberta", "regnet")  # ~10 s each; the rest run with -m slow
CASES = [pytest.param(f, id=f, marks=() if f in FAST else pytest.mark.slow) for f in FAMILIES]


def litert_feeds(model, side, names) -> dict[str, np.ndarray]:
    """The test inputs, with token ids as int32 (litert-torch narrows 64-bit inputs; the runtime does not guess)."""
    return {k: v.astype(np.int32) if v.dtype == np.int64 else v for k, v in feeds(model, side, names).items()}


def _delta(param, seed: int):
    rng = np.random.default_rng(seed)
    flat = rng.choice(param.numel(), size=min(8, param.numel()), replace=False)
    idx = np.stack(np.unravel_index(flat, tuple(param.shape))).astype(np.int32)
    return idx, (rng.standard_normal(idx.shape[1]) * 0.5).astype(np.float32)


@pytest.mark.parametrize("family", CASES)
def test_family_runs_on_litert_pooled_its_way_and_switches_an_adapter(family, tmp_path):
    from exporters.hf import export_hf_encoder

    model = build(family)
    _, side, pooling = FAMILIES[family]
    path = tmp_path / "m.tflite"
    info = export_hf_encoder(model, path, image_size=side, seq_len=None if side else SEQ, file_format="tflite")
    assert info.extra["model_type"] == family and info.extra["pooling"] == pooling
    x = litert_feeds(model, side, info.inputs)
    prefix = model.base_model_prefix + "."
    params = dict(model.named_parameters())
    folded = [k for k, t in info.tensors.items() if t.channel_scale is not None]
    targets = [list(info.tensors)[-1], *folded[:1]]  # the last weight (reaches the embedding), a folded conv
    tensors, merged = {}, copy.deepcopy(model)
    for seed, target in enumerate(targets):
        param = params[target.removeprefix(prefix)]
        idx, values = _delta(param, seed)
        tensors[target] = SparseDelta(idx, values)
        with torch.no_grad():
            merged.get_parameter(target.removeprefix(prefix))[tuple(idx)] += torch.from_numpy(values)
    shapes = {k: tuple(params[k.removeprefix(prefix)].shape) for k in targets}
    adapter = Adapter("a", info.fingerprint, tensors, shapes)

    with Runtime(path, backend="tflite", strategy="rebuild") as rt:
        base = rt.run(x)["embeddings"]
        for k in targets:  # stored permuted and maybe scaled; read back in torch layout with the scale left in
            t, source = info.tensors[k], params[k.removeprefix(prefix)].detach().numpy()
            scale = np.ones(t.shape[0], np.float32) if t.channel_scale is None else np.float32(t.channel_scale)
            want = source * scale.reshape((-1,) + (1,) * (source.ndim - 1))
            np.testing.assert_allclose(rt.weights(k), want, rtol=1e-6, atol=1e-7)
        before = {k: rt.weights(k).copy() for k in targets}
        rt.load_adapter(adapter)
        rt.switch("a")
        adapted = rt.run(x)["embeddings"]
        rt.switch(None)
        np.testing.assert_array_equal(rt.run(x)["embeddings"], base)
        for k in targets:
            np.testing.assert_array_equal(rt.weights(k), before[k])
    want = reference(model, x, pooling)
    assert base.shape == want.shape and base.ndim == 2
    close(base, want)
    close(adapted, reference(merged, x, pooling))
    assert np.abs(adapted - base).max() > 1e-5, f"the deltas on {targets} changed nothing"


def test_lora_slots_switch_on_litert_like_torch_with_the_lora_merged(tmp_path):
    """LoRA branches on BERT's query/value exported as slots: a PEFT-style LoRA is written into them, no rebuild."""
    from exporters.hf import export_hf_encoder, lora_slot_names

    model, rank = build("bert"), 2
    path = tmp_path / "m.tflite"
    info = export_hf_encoder(model, path, seq_len=SEQ, file_format="tflite", lora_slots=["query", "value"],
                             lora_rank=rank)  # fmt: skip
    x = litert_feeds(model, None, info.inputs)
    rng = np.random.default_rng(3)
    tensors, merged = {}, copy.deepcopy(model)
    for module in ("query", "value"):
        weight = f"encoder.layer.0.attention.self.{module}.weight"
        a_name, b_name = lora_slot_names(f"bert.{weight}")
        w = merged.get_parameter(weight)
        a = (rng.standard_normal((rank, w.shape[1])) * 0.3).astype(np.float32)
        b = (rng.standard_normal((w.shape[0], rank)) * 0.3).astype(np.float32)
        tensors[a_name], tensors[b_name] = DenseDelta(a), DenseDelta(b)
        with torch.no_grad():
            w += torch.from_numpy(b @ a)
    shapes = {k: info.tensors[k].shape for k in tensors}
    assert all(info.tensors[k].slot for k in tensors)
    with Runtime(path, backend="tflite") as rt:
        base = rt.run(x)["embeddings"]
        rt.load_adapter(Adapter("lora", info.fingerprint, tensors, shapes, "adapter"))
        rt.switch("lora")
        assert rt.wait_settled(0), "a slot write must not start a background rebuild"
        adapted = rt.run(x)["embeddings"]
        rt.switch(None)
        np.testing.assert_array_equal(rt.run(x)["embeddings"], base)
    close(base, reference(model, x, "mean"))
    close(adapted, reference(merged, x, "mean"))
    assert np.abs(adapted - base).max() > 1e-4


def test_an_architecture_without_a_known_embedding_is_refused_before_converting(tmp_path):
    from exporters.hf import export_hf_encoder

    gpt2 = T.GPT2Model(T.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16)).eval()
    with pytest.raises(ConfigError, match=r"architecture 'gpt2' \(GPT2Model\) is not one.*pass pooling="):
        export_hf_encoder(gpt2, tmp_path / "g.tflite", seq_len=SEQ, file_format="tflite")
    assert not list(tmp_path.iterdir())
