"""The lead's mends of review H's findings on the device trainer's tail: HardSwish's gradient at its kinks (-3 and
3) is torch's (it was -0.5 and 1.5: a first layer's gradient 64 % off), and a tanh-approximated GELU is trained as
one (onnx gives the attribute as bytes: it was trained as the exact GELU, gradients 3.5e-4 off)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from cnn_C18_zoo import legacy, torch_grads  # noqa: E402

from edge.learn.device_trainer import DeviceTrainer  # noqa: E402


def _agree(m: nn.Module, x: np.ndarray, path) -> None:
    y = np.arange(len(x)) % 4
    dt = DeviceTrainer(path)
    loss, grads = dt.loss_and_grads(x, y)
    t_loss, t_grads = torch_grads(m, x, y, dt.params)
    assert len(dt.params) == 2 and loss == pytest.approx(t_loss, rel=1e-6)
    for p in dt.params:
        assert np.abs(grads[p] - t_grads[p]).max() <= 1e-5 * np.abs(t_grads[p]).max(), p


def test_hardswish_gradient_at_its_kinks_is_torchs(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 6), nn.Hardswish(), nn.Linear(6, 4)).eval()
    with torch.no_grad():  # pre-activations are the inputs' first six columns: exactly -3, 3 or 1
        m[0].weight.zero_()
        m[0].weight[:, :6] = torch.eye(6)
        m[0].bias.zero_()
    x = np.random.default_rng(0).choice([-3.0, 3.0, 1.0], size=(64, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path, _ = legacy(m, x, tmp_path / "kinks.onnx", opset=17)
    _agree(m, x, path)


def test_tanh_gelu_is_trained_as_tanh_gelu(tmp_path):
    from exporters.onnx import export_onnx

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(nn.functional.gelu(self.a(x), approximate="tanh"))

    m = Net().eval()
    x = (3 * np.random.default_rng(1).standard_normal((64, 8))).astype(np.float32)
    path = tmp_path / "gelu.onnx"
    export_onnx(
        m, (torch.from_numpy(x[:2]),), path, input_names=["x"], output_names=["logits"], name="gelu", progress=False
    )
    _agree(m, x, path)
