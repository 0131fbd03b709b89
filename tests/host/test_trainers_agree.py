"""The numpy device trainer and the torch host trainer run the same recipe on the same tail, and agree.

A tiny pre-LN block (``fc1`` -> GELU -> ``fc2``, residual, LayerNorm, mean over tokens,
``head``) exported to ONNX: the graph-found tail is ``fc2`` and ``head``. Same samples,
same SNIP mask, zero deltas, AdamW with the same epochs, learning rate, minibatch and
weight decay: full-batch steps reach the same loss (float64 vs float32), minibatches
with different shuffles a comparable one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edge.learn.device_trainer import DeviceTrainer
from edge.learn.space import Arch
from exporters.host_trainer import HostTrainer
from exporters.onnx import export_onnx

TAIL = ("fc2.weight", "head.weight")


class TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(nn.functional.gelu(self.fc1(x)))
        return self.head(self.norm(x).mean(dim=1))


def _same(module):  # HostTrainer's loader: the checkpoint is the module itself
    return module


def _cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits - logits.max(1, keepdims=True)
    return float(-(z - np.log(np.exp(z).sum(1, keepdims=True)))[np.arange(len(y)), y].mean())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    model = TinyBlock().eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4, 8)).astype(np.float32)  # more than one mask calibration batch (256)
    y = (x.mean(1) @ rng.normal(size=(8, 4))).argmax(1)  # a rule the base head does not know
    path = tmp_path_factory.mktemp("trainers") / "tiny.onnx"
    info = export_onnx(
        model, (torch.as_tensor(x[:2]),), path, input_names=["x"], output_names=["logits"], name="tiny", progress=False
    )
    return model, path, info, x, y


def _pair(tiny, batch: int, epochs: int = 60):
    model, path, info, x, y = tiny
    opts = {"epochs": epochs, "lr": 3e-2, "batch": batch, "weight_decay": 1e-4, "seed": 0}
    device = DeviceTrainer(path, info, **opts)
    host = HostTrainer(model, info, load=_same, **opts)
    arch = Arch("shira", 0.5, "tail")
    return device, device.train(arch, x, y, "device"), host.train(arch, x, y, "host")


def test_same_tail_same_gradients(tiny):
    model, path, info, x, y = tiny
    device = DeviceTrainer(path, info)
    assert device.params == TAIL
    loss, grads = device.loss_and_grads(x, y)
    params = dict(model.named_parameters())
    value = nn.functional.cross_entropy(model(torch.as_tensor(x)), torch.as_tensor(y))
    expected = torch.autograd.grad(value, [params[p] for p in TAIL])
    assert loss == pytest.approx(value.item(), rel=1e-5)
    for p, g in zip(TAIL, expected):
        np.testing.assert_allclose(grads[p], g.numpy(), rtol=1e-4, atol=1e-6)


def test_full_batch_steps_reach_the_same_loss(tiny):
    *_, x, y = tiny
    device, a_dev, a_host = _pair(tiny, batch=len(y))
    for p in TAIL:  # the same entries, and deltas equal up to float32 vs float64 arithmetic
        np.testing.assert_array_equal(a_dev.tensors[p].indices, a_host.tensors[p].indices)
        np.testing.assert_allclose(a_dev.tensors[p].values, a_host.tensors[p].values, atol=1e-5)
    base = _cross_entropy(device.logits(x), y)
    dev, host = _cross_entropy(device.logits(x, a_dev), y), _cross_entropy(device.logits(x, a_host), y)
    assert base > 1.0 and dev < 0.5 * base
    assert dev == pytest.approx(host, rel=1e-3, abs=1e-4)


def test_minibatches_reach_a_comparable_loss(tiny):
    *_, x, y = tiny
    device, a_dev, a_host = _pair(tiny, batch=16)
    for p in TAIL:
        np.testing.assert_array_equal(a_dev.tensors[p].indices, a_host.tensors[p].indices)
    base = _cross_entropy(device.logits(x), y)
    dev, host = _cross_entropy(device.logits(x, a_dev), y), _cross_entropy(device.logits(x, a_host), y)
    assert dev < 0.5 * base and host < 0.5 * base
    assert abs(dev - host) < 0.05 * base  # different shuffles (numpy vs torch), the same recipe
    acc = {k: float((device.logits(x, a).argmax(1) == y).mean()) for k, a in (("dev", a_dev), ("host", a_host))}
    assert abs(acc["dev"] - acc["host"]) <= 0.1
