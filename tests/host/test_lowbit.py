"""Low-bit bottleneck and LoRA adapters on the host (exporters.lowbit), on a tiny DigitsEncoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge.errors import ConfigError
from edge.format import quant
from edge.format.adapter import load_adapter
from exporters import lowbit
from lab.digits_model import DigitsEncoder

torch.set_num_threads(1)

CODECS = [("gq", 1), ("gq", 2), ("gq", 4), ("gq", 8), ("sign", 1), ("fp32", 32)]
X = np.random.default_rng(0).random((48, 1, 8, 8)).astype(np.float32)
Y = np.random.default_rng(1).integers(0, 10, 48)


def _tiny(seed: int = 0) -> DigitsEncoder:
    return DigitsEncoder(dim=16, depth=2, heads=2, mlp_ratio=2, seed=seed).eval()


def _cfg(**kw) -> lowbit.LowbitConfig:
    return lowbit.LowbitConfig(**{"dim": 4, "epochs": 2, "batch_size": 16, **kw})


@pytest.mark.parametrize("scheme,bits", CODECS)
@pytest.mark.parametrize("shape", [(4, 16), (16, 4), (7, 3)])
def test_torch_quantizer_equals_device_decode(scheme, bits, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(bits)) * 0.05 + 0.01
    got = lowbit.fake_quant(w, scheme, bits).numpy()
    want = quant.decode(quant.encode(w.numpy(), scheme, bits))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme,bits", CODECS)
def test_quantizer_passes_gradients_straight_through(scheme, bits):
    w = (torch.randn(8, 4) * 0.1).requires_grad_(True)
    (lowbit.fake_quant(w, scheme, bits) * torch.arange(32.0).reshape(8, 4)).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


# method, config overrides, expected adapter parameter names
NAMES = [
    ("adapter", {}, [f"blocks.{i}.adapter.{p}.weight" for i in (0, 1) for p in ("down", "up")]),
    (
        "adapter",
        {"layers": (1,), "head": True},
        ["blocks.1.adapter.down.weight", "blocks.1.adapter.up.weight", "head.delta.weight"],
    ),
    ("lora", {}, [f"blocks.{i}.attn.{t}.lora_{m}.weight" for i in (0, 1) for t in ("q", "v") for m in "AB"]),
    (
        "lora",
        {"targets": ("proj",), "layers": (0,)},
        ["blocks.0.attn.proj.lora_A.weight", "blocks.0.attn.proj.lora_B.weight"],
    ),
]


@pytest.mark.parametrize("method,kw,names", NAMES)
def test_attach_names_are_stable_and_base_is_untouched(method, kw, names):
    base = _tiny()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    adapted = lowbit.attach(base, _cfg(method=method, **kw))
    assert list(lowbit.adapter_parameters(adapted)) == names
    assert set(before) <= set(adapted.state_dict())  # base parameters keep their names
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())  # attach copies
    assert {k for k, p in adapted.named_parameters() if p.requires_grad} == set(names)  # only the adapter trains
    with torch.no_grad():
        np.testing.assert_allclose(adapted(torch.as_tensor(X))[0], base(torch.as_tensor(X))[0], atol=0.05)


@pytest.mark.parametrize("method", ["adapter", "lora"])
def test_training_updates_only_adapter_params_and_reduces_loss(method):
    base = _tiny()
    cfg = _cfg(method=method, bits=1, epochs=6, lr=3e-2, head=True)
    adapted, losses = lowbit.train_lowbit(base, X, Y, cfg, progress=False)
    names = set(lowbit.adapter_parameters(adapted))
    fresh = lowbit.attach(base, cfg)  # same seed: the adapter's initial values
    for k, v in adapted.state_dict().items():
        changed = not torch.equal(v, fresh.state_dict()[k])
        assert changed == (k in names), k
    assert losses[-1] < losses[0]


def test_export_with_zero_slots_equals_base_and_adapter_matches_on_device(tmp_path):
    from edge.runtime import Runtime

    base = _tiny()
    adapted, _ = lowbit.train_lowbit(base, X, Y, _cfg(bits=1, epochs=2), progress=False)
    info, slots = lowbit.export_with_slots(
        adapted, (torch.as_tensor(X[:4]),), tmp_path / "m.onnx", name="t", progress=False
    )
    assert list(slots) == list(lowbit.adapter_parameters(adapted))
    assert {k for k, t in info.tensors.items() if t.slot} == set(slots)
    adapter = lowbit.lowbit_adapter(adapted, info, "a", {"domain": "x"})
    path = adapter.save(tmp_path / "a.safetensors")
    with Runtime(tmp_path / "m.onnx") as rt, torch.no_grad():
        np.testing.assert_allclose(rt.run({"pixels": X})["logits"], base(torch.as_tensor(X))[0], atol=1e-5)
        rt.load_adapter(path, name="a")
        rt.switch("a")
        np.testing.assert_allclose(rt.run({"pixels": X})["logits"], adapted(torch.as_tensor(X))[0], atol=1e-5)


@pytest.mark.parametrize("scheme,bits", [("gq", 1), ("sign", 1), ("gq", 4), ("fp32", 32)])
def test_adapter_file_holds_what_training_saw(tmp_path, scheme, bits):
    adapted = lowbit.attach(_tiny(), _cfg(bits=bits, scheme=scheme if bits < 32 else "gq"))

    class Info:
        fingerprint = "sha256:" + "0" * 32

    adapter = lowbit.lowbit_adapter(adapted, Info, "a")
    back = load_adapter(adapter.save(tmp_path / "a.safetensors"))
    assert back.method == "adapter" and back.info["bits"] == bits
    assert bool(back.encodings) == (bits < 32)
    for name, p in lowbit.adapter_parameters(adapted).items():
        seen = lowbit.fake_quant(p.detach(), scheme, bits).numpy()
        np.testing.assert_array_equal(back.tensors[name].values, seen)
    with torch.no_grad():
        want = adapted(torch.as_tensor(X))[0]
        got = lowbit.load_values(
            lowbit.attach(_tiny(), adapted.lowbit_config), {k: t.values for k, t in back.tensors.items()}
        )
        np.testing.assert_allclose(got(torch.as_tensor(X))[0], want, atol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        {"bits": 3},
        {"bits": 2, "scheme": "sign"},
        {"scheme": "int1"},
        {"method": "prefix"},
        {"dim": 0},
        {"layers": (2,)},
        {"layers": (0, 0)},
        {"method": "lora", "targets": ("qkv",)},
    ],
)
def test_bad_configs_raise_config_error(kw):
    with pytest.raises(ConfigError):
        lowbit.attach(_tiny(), _cfg(**kw))


def test_every_registered_method_and_scheme_has_cases():
    assert {m for m, _, _ in NAMES} == set(lowbit.ATTACH.names())
    assert {s for s, _ in CODECS} == set(quant.SCHEMES.names())
