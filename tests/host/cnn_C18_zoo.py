"""Small torch versions of the CNNs users ship (issue 18, helper C): random weights, few channels, 16x16 digits.

MobileNetV3-small (Hardswish, squeeze-excite with HardSigmoid, depthwise), EfficientNet-B0-like (SiLU, SE,
expansion), ShuffleNetV2 (channel split, shuffle by Reshape/Transpose, Concat), DenseNet-like (Concat of every earlier
map), RegNet-like (group convs), GroupNorm and InstanceNorm nets, ConvNeXt-like (depthwise 7x7, LayerNorm over
channels-last by permute), a 1-D audio CNN (Conv1d, BatchNorm1d, MaxPool1d), dilated convs, and a net ending in
AdaptiveAvgPool + Flatten + Dropout + Linear. Every BatchNorm gets statistics from the data, so a fold is not the
identity. Not a test module: the ``test_cnn_C18_*`` files import it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

F = nn.functional


def cbn(i, o, k=3, s=1, g=1, d=1, act=nn.ReLU):
    return nn.Sequential(
        nn.Conv2d(i, o, k, s, d * (k // 2), dilation=d, groups=g, bias=False), nn.BatchNorm2d(o), act()
    )


class SE(nn.Module):
    def __init__(self, c, r=4, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.fc1, self.fc2, self.act, self.gate = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1), act(), gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class MBConv(nn.Module):
    def __init__(self, i, o, e, s, act, gate, k=3):
        super().__init__()
        m = i * e
        self.res = s == 1 and i == o
        self.block = nn.Sequential(
            cbn(i, m, 1, act=act), cbn(m, m, k, s, g=m, act=act), SE(m, act=act, gate=gate),
            nn.Conv2d(m, o, 1, bias=False), nn.BatchNorm2d(o),
        )  # fmt: skip

    def forward(self, x):
        y = self.block(x)
        return x + y if self.res else y


class MobileNetV3(nn.Module):
    def __init__(self):
        super().__init__()
        hs = nn.Hardswish
        self.features = nn.Sequential(
            cbn(1, 8, s=2, act=hs), MBConv(8, 8, 2, 1, nn.ReLU, nn.Hardsigmoid),
            MBConv(8, 16, 2, 2, hs, nn.Hardsigmoid), cbn(16, 32, 1, act=hs),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Linear(32, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class EfficientNet(nn.Module):
    def __init__(self):
        super().__init__()
        si, sg = nn.SiLU, nn.Sigmoid
        self.features = nn.Sequential(
            cbn(1, 8, s=2, act=si), MBConv(8, 8, 1, 1, si, sg), MBConv(8, 16, 4, 2, si, sg, k=5),
            MBConv(16, 16, 4, 1, si, sg), cbn(16, 32, 1, act=si),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def shuffle(x, groups=2):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c, down):
        super().__init__()
        self.down = down
        h = c // 2
        i = c if down else h
        s = 2 if down else 1
        self.branch2 = nn.Sequential(cbn(i, h, 1), cbn(h, h, 3, s, g=h, act=nn.Identity), cbn(h, h, 1))
        if down:
            self.branch1 = nn.Sequential(cbn(c, c, 3, 2, g=c, act=nn.Identity), cbn(c, h, 1))

    def forward(self, x):
        if self.down:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        else:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.branch2(b)), 1)
        return shuffle(out)


class ShuffleNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = cbn(1, 16, s=2)
        self.stage2 = nn.Sequential(ShuffleUnit(16, False), ShuffleUnit(16, False))
        self.stage3 = nn.Sequential(ShuffleUnit(16, True), ShuffleUnit(16, False))
        self.conv5 = cbn(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.conv5(self.stage3(self.stage2(self.conv1(x)))).mean([2, 3]))


class DenseNet(nn.Module):
    def __init__(self, growth=4):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, 1, 1, bias=False)
        self.b1 = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(8 + i * growth), nn.ReLU(),
                                              nn.Conv2d(8 + i * growth, growth, 3, 1, 1, bias=False))
                                for i in range(3))  # fmt: skip
        self.trans = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 12, 1, bias=False), nn.AvgPool2d(2))
        self.b2 = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(12 + i * growth), nn.ReLU(),
                                              nn.Conv2d(12 + i * growth, growth, 3, 1, 1, bias=False))
                                for i in range(2))  # fmt: skip
        self.norm, self.classifier = nn.BatchNorm2d(20), nn.Linear(20, 10)

    def forward(self, x):
        h = self.stem(x)
        for layer in self.b1:
            h = torch.cat([h, layer(h)], 1)
        h = self.trans(h)
        for layer in self.b2:
            h = torch.cat([h, layer(h)], 1)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.norm(h)), 1), 1))


class RegNetBlock(nn.Module):
    def __init__(self, i, o, s, g=4):
        super().__init__()
        self.a, self.b = cbn(i, o, 1), cbn(o, o, 3, s, g=o // g)
        self.c = nn.Sequential(nn.Conv2d(o, o, 1, bias=False), nn.BatchNorm2d(o))
        self.proj = nn.Sequential(nn.Conv2d(i, o, 1, s, bias=False), nn.BatchNorm2d(o)) if s != 1 or i != o else None

    def forward(self, x):
        return F.relu((x if self.proj is None else self.proj(x)) + self.c(self.b(self.a(x))))


class RegNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbn(1, 8, s=2)
        self.trunk = nn.Sequential(RegNetBlock(8, 16, 1), RegNetBlock(16, 32, 2), RegNetBlock(32, 32, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.trunk(self.stem(x)).mean([2, 3]))


class NormNet(nn.Module):
    """Conv -> GroupNorm or InstanceNorm (affine) -> ReLU, twice at two resolutions, then a linear head."""

    def __init__(self, kind: str):
        super().__init__()

        def norm(c):
            return nn.GroupNorm(4, c) if kind == "group" else nn.InstanceNorm2d(c, affine=True)

        self.c1, self.n1 = nn.Conv2d(1, 8, 3, 1, 1), norm(8)
        self.c2, self.n2 = nn.Conv2d(8, 16, 3, 2, 1), norm(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = F.relu(self.n2(self.c2(F.relu(self.n1(self.c1(x))))))
        return self.fc(h.mean([2, 3]))


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm, self.pw1, self.pw2 = nn.LayerNorm(c, eps=1e-6), nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        return x + (self.gamma * self.pw2(F.gelu(self.pw1(h)))).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 2, 2)
        self.stage1 = ConvNeXtBlock(16)
        self.down_norm, self.down = nn.LayerNorm(16, eps=1e-6), nn.Conv2d(16, 32, 2, 2)
        self.stage2 = ConvNeXtBlock(32)
        self.norm, self.head = nn.LayerNorm(32, eps=1e-6), nn.Linear(32, 10)

    def forward(self, x):
        h = self.stage1(self.stem(x))
        h = self.down(self.down_norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return self.head(self.norm(self.stage2(h).mean([2, 3])))


class Audio1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(8, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean(2))


class Dilated(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(cbn(1, 8), cbn(8, 8, d=2), cbn(8, 16, s=2), cbn(16, 16, d=3))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean([2, 3]))


class PoolFlatDrop(nn.Module):
    """torchvision's ending: AdaptiveAvgPool2d(1) -> Flatten -> Dropout -> Linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(cbn(1, 8), nn.MaxPool2d(2), cbn(8, 16), cbn(16, 32, s=2))
        self.avgpool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.dropout, self.fc = nn.Dropout(0.3), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.dropout(self.flatten(self.avgpool(self.features(x)))))


MODELS = {
    "mobilenetv3": MobileNetV3, "efficientnet": EfficientNet, "shufflenetv2": ShuffleNetV2, "densenet": DenseNet,
    "regnet": RegNet, "groupnorm": lambda: NormNet("group"), "instancenorm": lambda: NormNet("instance"),
    "convnext": ConvNeXt, "audio1d": Audio1D, "dilated": Dilated, "poolflat": PoolFlatDrop,
}  # fmt: skip
ONE_D = {"audio1d"}


def digits(name: str, size: int = 16):
    """sklearn's digits as the model reads them: [N, 1, 16, 16] images, or [N, 1, 64] rows for the 1-D net."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    if name in ONE_D:
        return x.reshape(-1, 1, 64), d.target.astype(np.int64)
    x = F.interpolate(torch.from_numpy(x)[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return x.numpy(), d.target.astype(np.int64)


def build(name: str, x: np.ndarray, y: np.ndarray, steps: int = 30, rows: int = 512) -> nn.Module:
    """The model with BatchNorm statistics from ``rows`` digits (so no fold is the identity) and a short fit."""
    torch.manual_seed(0)
    m = MODELS[name]()
    for b in m.modules():
        if isinstance(b, nn.modules.batchnorm._BatchNorm):
            b.momentum = None
    with torch.no_grad():
        m.train()(torch.from_numpy(x[:rows]))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for i in range(steps):
        j = (i * 64) % 640
        loss = F.cross_entropy(m(torch.from_numpy(x[j : j + 64])), torch.from_numpy(y[j : j + 64]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def legacy(m: nn.Module, x: np.ndarray, path, opset: int = 17):
    """torch.onnx.export(dynamo=False), dynamic batch, then ``import_onnx`` with the state dict: a user's path."""
    import warnings

    from safetensors.torch import save_file

    from edge.convert.onnx_import import import_onnx

    axes = {"x": {0: "batch"}, "logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.from_numpy(x[:2]),), str(path), dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["logits"], dynamic_axes=axes)  # fmt: skip
    sd = path.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in m.state_dict().items() if v.dtype.is_floating_point}, str(sd))
    out = path.with_name(path.stem + "-edge.onnx")
    return out, import_onnx(path, out, state_dict=sd)


def torch_grads(m: nn.Module, x: np.ndarray, y: np.ndarray, params) -> tuple[float, dict]:
    """Cross-entropy on the logits and its gradients by autograd (float64 copies)."""
    m.zero_grad()
    loss = F.cross_entropy(m(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    named = dict(m.named_parameters())
    return loss.item(), {p: named[p].grad.numpy().astype(np.float64) for p in params}


def assert_finite_differences(dt, x: np.ndarray, y: np.ndarray, picks: int = 2, eps: float = 1e-4) -> None:
    """Each tail parameter's gradient from ``dt.loss_and_grads`` at its largest entry and ``picks`` random ones
    equals central finite differences of the loss (a DeviceTrainer ``dt``, float32 samples ``x``, labels ``y``)."""
    import pytest

    base = dt.base_weights()
    _, grads = dt.loss_and_grads(x, y, base)
    rng = np.random.default_rng(0)
    for p in dt.params:
        g = grads[p]
        for flat in [int(np.argmax(np.abs(g))), *rng.choice(g.size, picks, replace=False)]:
            i = np.unravel_index(flat, g.shape)
            plus, minus = {**base, p: base[p].copy()}, {**base, p: base[p].copy()}
            plus[p][i] += eps
            minus[p][i] -= eps
            fd = (dt.loss_and_grads(x, y, plus)[0] - dt.loss_and_grads(x, y, minus)[0]) / (2 * eps)
            assert g[i] == pytest.approx(fd, rel=1e-4, abs=1e-8), (p, i)
