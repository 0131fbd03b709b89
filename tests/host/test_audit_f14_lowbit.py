"""Audit F14: a 1-bit bottleneck on a ResNet-like CNN's downsampling block (stride 2, channels kept).

The block keeps its channel count, so it passed as a parallel-bottleneck module, and training crashed inside the
forward hook with torch's raw "The size of tensor a (4) must match the size of tensor b (8)". It is now a
ConfigError that says why and what to pass; serial placement on the same block trains.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from edge.errors import ConfigError  # noqa: E402
from exporters import lowbit  # noqa: E402

torch.set_num_threads(1)


class Down(nn.Module):
    """A ResNet basic block that halves the feature map and keeps 8 channels (the shortcut a strided 1x1 conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(8, 8, 1, 2, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.down(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.layer = Down()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.layer(F.relu(self.stem(x))).mean((2, 3)))


def _data():
    rng = np.random.default_rng(0)
    return rng.random((16, 1, 8, 8), dtype=np.float32), rng.integers(0, 3, 16)


def _cfg(**kw):
    return lowbit.LowbitConfig(**{"method": "adapter", "bits": 1, "dim": 2, "epochs": 1, "batch_size": 8, **kw})


def test_a_parallel_bottleneck_on_a_strided_block_is_refused_saying_why():
    torch.manual_seed(0)
    x, y = _data()
    with pytest.raises(ConfigError, match=r"maps \(8, 8, 8\) to \(8, 4, 4\).*placement='serial'"):
        lowbit.train_lowbit(Net().eval(), x, y, _cfg(modules=("layer",)), progress=False)


def test_serial_placement_on_the_same_block_trains():
    torch.manual_seed(0)
    x, y = _data()
    adapted, losses = lowbit.train_lowbit(Net().eval(), x, y, _cfg(modules=("layer",), placement="serial"), False)
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert list(lowbit.adapter_parameters(adapted)) == ["layer.adapter.down.weight", "layer.adapter.up.weight"]
