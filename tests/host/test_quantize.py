"""Host side of issue 18: quantize an exported torch model, train integer SHiRA with the grid in the loop."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge.errors import ConfigError, ExportValidationError  # noqa: E402
from edge.format.adapter import load_adapter  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from exporters.qshira import int_shira_adapter, quantized_base, train_shira_int  # noqa: E402
from exporters.quantize import quantize_onnx  # noqa: E402
from exporters.shira import make_masks, select_targets  # noqa: E402


class Tiny(torch.nn.Module):
    """A conv stem, a linear layer read through a transposed MatMul, and a head (Gemm-like)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(64, 32)
        self.head = torch.nn.Linear(32, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean(1).flatten(1)
        return self.head(torch.relu(self.fc(h)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    model = Tiny().eval()
    x = torch.rand(8, 1, 8, 8)
    info = export_onnx(model, (x,), d / "m.onnx", input_names=["x"], output_names=["y"], name="tiny", progress=False)
    rng = np.random.default_rng(0)
    data = rng.random((96, 1, 8, 8)).astype(np.float32)
    return model, d / "m.onnx", info, data


@pytest.mark.parametrize(
    "mode,per_channel", [("dynamic", False), ("dynamic", True), ("static", False), ("static", True)]
)
def test_quantized_export_maps_every_target_and_loads_on_every_strategy(exported, tmp_path, mode, per_channel):
    model, path, info, data = exported
    out = tmp_path / "q.onnx"
    report = quantize_onnx(path, out, mode=mode, per_channel=per_channel, calib={"x": data})
    q = report.info
    assert set(report.quantized) | set(report.float_targets) | set(report.dropped) == set(info.tensors)
    assert "fc.weight" in report.quantized and "head.weight" in report.quantized
    assert q.float_fingerprint == info.fingerprint and q.fingerprint != info.fingerprint
    assert report.bytes_after < report.bytes_before or mode == "static"  # QDQ adds activation scales
    assert min(report.cosine.values()) > 0.98
    for name in report.quantized:
        t = q.tensors[name]
        assert t.quant is not None and t.quant.dtype == "int8"
    for name in ("fc.weight", "head.weight"):  # (dynamic ConvInteger is per tensor whatever is asked)
        assert q.tensors[name].quant.axis == (0 if per_channel else None)  # output channel, torch layout
    for strategy in ("hybrid", "bound", "rebuild"):
        with Runtime(out, strategy=strategy) as rt:
            got = rt.run({"x": data[:4]})["y"]
            want = model(torch.as_tensor(data[:4])).detach().numpy()
            cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
            assert cos > 0.98


def test_static_needs_calibration_and_a_drifting_model_is_refused(exported, tmp_path):
    _, path, _, data = exported
    with pytest.raises(ConfigError, match="calib"):
        quantize_onnx(path, tmp_path / "q.onnx", mode="static", check={"x": data[:4]})
    with pytest.raises(ExportValidationError, match="cosine"):
        quantize_onnx(path, tmp_path / "q.onnx", mode="dynamic", calib={"x": data}, min_cosine=1.0 + 1e-9)
    assert not (tmp_path / "q.onnx").exists()  # nothing written when the check fails


def test_integer_shira_trains_on_the_grid_and_the_device_writes_exactly_its_integers(exported, tmp_path):
    model, path, _, data = exported
    out = tmp_path / "q.onnx"
    quantize_onnx(path, out, mode="dynamic", per_channel=True, calib={"x": data}, reduce_range=True)
    qinfo, base = quantized_base(out)
    y = np.asarray(model(torch.as_tensor(data)).argmax(1).numpy() + 1) % 3  # a shifted task to learn
    targets = select_targets(model)
    masks = make_masks(model, targets, density=0.1, kind="wm")
    trained = train_shira_int(model, masks, base, data, y, epochs=20, lr=2e-2)
    adapter = int_shira_adapter(trained, qinfo, "shift")
    saved = load_adapter(adapter.save(tmp_path / "a.safetensors"), model=qinfo)
    for k, (idx, applied, q) in trained.items():
        if q is None:
            continue
        b = base[k]
        lo, hi = b.bounds
        assert q.dtype == np.int8 and q.min() >= lo and q.max() <= hi
        moved = q.astype(np.int64) - b.q[tuple(idx)]
        scale = np.broadcast_to(b.scale, b.q.shape)[tuple(idx)]
        np.testing.assert_allclose(applied, moved * scale, rtol=1e-5, atol=1e-8)  # applied = whole steps
    assert any(np.any(q != base[k].q[tuple(i)]) for k, (i, _, q) in trained.items() if q is not None)
    with Runtime(out, strategy="bound") as rt:
        base_acc = float((rt.run({"x": data})["y"].argmax(1) == y).mean())
        rt.load_adapter(saved)
        rt.switch("shift")
        for k, (idx, _, q) in trained.items():
            if q is not None:
                np.testing.assert_array_equal(rt.weights(k)[tuple(idx)], q)
        acc = float((rt.run({"x": data})["y"].argmax(1) == y).mean())
        rt.switch(None)
        for k, b in base.items():
            np.testing.assert_array_equal(rt.weights(k), b.q)
    assert acc > base_acc + 0.2  # the device, writing the integers, learned the shifted task


def test_headroom_widens_the_grid_so_adapted_entries_can_grow(exported, tmp_path):
    model, path, info, data = exported
    report = quantize_onnx(path, tmp_path / "q.onnx", mode="static", calib={"x": data}, headroom=3.0)
    _, base = quantized_base(tmp_path / "q.onnx")
    for name in ("fc.weight", "head.weight"):
        w = dict(model.named_parameters())[name].detach().numpy()
        b = base[name]
        assert abs(float(b.scale.reshape(-1)[0]) - 3.0 * np.abs(w).max() / 127.5) < 0.02 * float(b.scale.reshape(-1)[0])
        assert np.abs(b.q).max() <= 43  # a third of the range used: room for entries to triple
    assert report.info.extra["quantization"]["headroom"] == 3.0  # recorded in the model metadata
    with pytest.raises(ConfigError, match="headroom"):
        quantize_onnx(path, tmp_path / "p.onnx", mode="dynamic", calib={"x": data}, per_channel=True, headroom=2.0)
