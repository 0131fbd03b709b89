"""Bring your own model, low-bit branches: bottleneck (parallel, serial) and LoRA (Linear, 1x1 conv) on models
without a ``blocks`` list, trained, exported with slots and switched on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from edge.errors import ConfigError
from exporters import lowbit

torch.set_num_threads(1)


class MLP(nn.Module):
    """x[B,10] -> inp (10->16) -> relu -> residual MLP block (16->32->16) -> out (16->3); no ``blocks``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(10, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.out(h + self.mlp(h))


class CNN(nn.Module):
    """x[B,3,6,6] -> stem conv -> BatchNorm -> relu -> conv block (8->8) -> depthwise -> 1x1 conv -> mean -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(self.dw(torch.relu(self.block(h))))
        return self.fc(self.pw(h).mean((2, 3)))


class Tokens(nn.Module):
    """ids[B,5] -> embedding (30x8) -> mean -> fc (8->3)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).mean(1))


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = {"mlp": MLP, "cnn": CNN, "emb": Tokens}[kind]()
    if kind == "cnn":
        with torch.no_grad():
            model.bn.running_mean.normal_(0, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _data(kind: str, n: int = 32):
    rng = np.random.default_rng(1)
    if kind == "emb":
        return rng.integers(0, 30, (n, 5)), rng.integers(0, 3, n)
    x = rng.standard_normal((n, 10) if kind == "mlp" else (n, 3, 6, 6)).astype(np.float32)
    return x, rng.integers(0, 3 if kind == "mlp" else 4, n)


def _ab(prefix: str, a: str = "adapter.down", b: str = "adapter.up") -> list[str]:
    return [f"{prefix}.{a}.weight", f"{prefix}.{b}.weight"]


def _lora(*prefixes: str) -> list[str]:
    return [n for p in prefixes for n in _ab(p, "lora_A", "lora_B")]


# model, config overrides, expected adapter parameter names (the slot names of the export)
CASES = [
    ("mlp", dict(method="adapter", modules=("mlp",)), _ab("mlp")),
    ("mlp", dict(method="adapter", modules=("inp",), placement="serial"), _ab("inp")),
    ("mlp", dict(method="lora"), _lora("inp", "mlp.0", "mlp.2", "out")),
    ("cnn", dict(method="adapter", modules=("block",)), _ab("block")),
    (
        "cnn",
        dict(method="adapter", modules=r"(stem|dw)", placement="serial", head="fc"),
        [*_ab("stem"), *_ab("dw"), "fc.delta.weight"],
    ),
    ("cnn", dict(method="lora", modules=("pw", "fc"), bits=2), _lora("pw", "fc")),
    ("emb", dict(method="adapter", modules=("emb",), placement="serial", bits=32), _ab("emb")),
]


def _cfg(**kw) -> lowbit.LowbitConfig:
    return lowbit.LowbitConfig(**{"dim": 3, "epochs": 2, "batch_size": 16, "lr": 5e-2, **kw})


def test_every_registered_method_has_a_case():
    assert {c[1]["method"] for c in CASES} == set(lowbit.ATTACH.names())


@pytest.mark.parametrize("kind,kw,names", CASES)
def test_attach_train_export_and_switch_on_the_device(tmp_path, kind, kw, names):
    from edge.runtime import Runtime

    base = _model(kind)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = _cfg(**kw)
    fresh = lowbit.attach(base, cfg)
    assert list(lowbit.adapter_parameters(fresh)) == names
    assert {k for k, p in fresh.named_parameters() if p.requires_grad} == set(names)
    assert set(before) <= set(fresh.state_dict())  # base parameters and buffers keep their names

    x, y = _data(kind)
    if kind == "cnn":  # batches from a DataLoader, and a custom loss
        loader = DataLoader(TensorDataset(torch.as_tensor(x), torch.as_tensor(y)), batch_size=16)
        adapted, losses = lowbit.train_lowbit(base, loader, cfg=cfg, progress=False, loss=F.cross_entropy)
    else:
        adapted, losses = lowbit.train_lowbit(base, x, y, cfg, progress=False)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # attach copies
    for k, v in adapted.state_dict().items():  # two steps moved every adapter matrix and nothing else
        assert torch.equal(v, fresh.state_dict()[k]) == (k not in names), k

    info, slots = lowbit.export_with_slots(
        adapted,
        (torch.as_tensor(x[:2]),),
        tmp_path / "m.onnx",
        name=kind,
        input_names=["x"],
        output_names=["logits"],
        progress=False,
    )
    assert list(slots) == names and {k for k, t in info.tensors.items() if t.slot} == set(names)
    adapter = lowbit.lowbit_adapter(adapted, info, "a", {"case": kind})
    with torch.no_grad():
        want_base, want = base(torch.as_tensor(x)).numpy(), adapted(torch.as_tensor(x)).numpy()
    assert np.abs(want - want_base).max() > 1e-4
    with Runtime(tmp_path / "m.onnx") as rt:
        y0 = rt.run({"x": x})["logits"]
        np.testing.assert_allclose(y0, want_base, atol=1e-5, rtol=1e-4)
        rt.load_adapter(adapter.save(tmp_path / "a.safetensors"), name="a")
        rt.switch("a")
        np.testing.assert_allclose(rt.run({"x": x})["logits"], want, atol=1e-5, rtol=1e-4)
        rt.switch(None)
        np.testing.assert_array_equal(rt.run({"x": x})["logits"], y0)


@pytest.mark.parametrize(
    "kind,kw,match",
    [
        ("mlp", dict(method="adapter", modules=("inp",)), r"\['inp'\] match no parallel"),  # 10 -> 16: not square
        ("mlp", dict(method="adapter", modules=("mlp", "nope")), r"\['nope'\]"),
        ("mlp", dict(method="adapter"), "no 'blocks'.*'mlp'"),
        ("cnn", dict(method="lora", modules=("stem", "pw")), r"\['stem'\] match no nn.Linear or 1x1 conv"),
        ("cnn", dict(method="adapter", modules=("block",), layers=(0,)), "layers"),
        ("mlp", dict(method="lora", layers=(0,)), "layers=.0,. picks blocks"),
        ("cnn", dict(method="adapter", modules=("block",), placement="inside"), "placement"),
        ("cnn", dict(method="adapter", modules=("block",), head="bn"), "nn.Linear named 'bn'"),
        ("emb", dict(method="adapter", modules=("emb",)), r"\['emb'\] match no parallel"),  # ids in: no width
    ],
)
def test_bad_targets_raise_config_errors_naming_them(kind, kw, match):
    with pytest.raises(ConfigError, match=match):
        lowbit.attach(_model(kind), _cfg(**kw))


def test_batches_need_a_length_for_the_schedule():
    x, y = _data("mlp")
    gen = ((x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8))
    with pytest.raises(ConfigError, match="len"):
        lowbit.train_lowbit(_model("mlp"), gen, cfg=_cfg(method="lora", epochs=1), progress=False)
