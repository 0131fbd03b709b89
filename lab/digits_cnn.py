"""A tiny CNN over 8x8 digits: the demo's second encoder family (host side).

``DigitsCNN`` is a MobileNet-style stack: a 3x3 stem, a depthwise 3x3 stride-2 conv and
a pointwise 1x1 conv (each with BatchNorm and ReLU), a second depthwise/pointwise pair at
4x4, a global average pool, a linear "pre-head" with ReLU and the linear classifier. The
pre-head gives the device trainer (:mod:`edge.learn.tail`) a last linear layer before the
classifier, so its ``tail`` layer set trains two layers. It exports with BatchNorm as
``BatchNormalization`` nodes, so the feature-tap set ``stages`` finds the last map at
each resolution (8x8 and 4x4). Parameter names are stable because adapters address
them: ``stem.conv``, ``dw{i}.conv``, ``pw{i}.conv``, ``pre``, ``head``.

Trained with :func:`lab.digits_model.pretrain` (``arch="cnn"``) and saved in the same
checkpoint format.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN"]


class _ConvBn(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()


class DigitsCNN(nn.Module):
    """Small CNN over ``[B, 1, 8, 8]`` digits; ``forward`` returns ``(logits [B, 10], features [B, hidden])``.

    ``features`` are the pre-head's output after its ReLU, i.e. exactly what ``head`` sees.
    """

    def __init__(self, width: int = 24, hidden: int = 64, classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        self.config = {"width": width, "hidden": hidden, "classes": classes}
        with torch.random.fork_rng(devices=[]):  # deterministic init that leaves the global RNG state alone
            torch.manual_seed(seed)
            self.stem = _ConvBn(1, width, 3)  # 8x8
            self.dw1 = _ConvBn(width, width, 3, stride=2, groups=width)  # 4x4
            self.pw1 = _ConvBn(width, 2 * width, 1)
            self.dw2 = _ConvBn(2 * width, 2 * width, 3, groups=2 * width)
            self.pw2 = _ConvBn(2 * width, 2 * width, 1)
            self.pre = nn.Linear(2 * width, hidden)
            self.head = nn.Linear(hidden, classes)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pw1(self.dw1(self.stem(pixels)))
        x = self.pw2(self.dw2(x))
        features = torch.relu(self.pre(x.mean(dim=(2, 3))))
        return self.head(features), features
