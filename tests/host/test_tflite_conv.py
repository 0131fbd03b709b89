"""A MobileNet-style torch CNN on both backends: BatchNorm, depthwise, pointwise, grouped and Conv1d layers.

Exported with :func:`exporters.export_onnx` and :func:`exporters.export_tflite` (litert-torch folds each
BatchNorm into its conv and stores filters OHWI, depthwise ``[1,H,W,C]``, Conv1d as ``[O,1,K,I]``); outputs
vs torch; a SHiRA adapter trained on the torch conv weights switched in (vs torch with the delta merged)
and undone bit-exactly; a conv weight the converter changed beyond a layout and a scale is refused by name.

The TFLite half needs litert-torch, which only the TFLite venv has::

    make test-tflite
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = nn.functional

from edge.errors import ExportValidationError  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from exporters.layout_match import BatchNormFold  # noqa: E402
from exporters.shira import make_masks, merge_shira, select_targets, shira_adapter, train_shira  # noqa: E402

CONVERTER = "TFLite export needs litert-torch, which the main .venv does not have: run `make test-tflite`"
STRATEGIES = {"onnxruntime": ("hybrid", "bound", "rebuild"), "tflite": ("hybrid", "rebuild", "builtin")}
CONVS = ("stem", "dw", "pw", "grouped", "seq")


class MobileNetish(nn.Module):
    """stem conv+BN -> depthwise+BN -> pointwise+BN -> grouped conv -> Conv1d+BN over positions -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.pw, self.bn2 = nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.seq, self.bn3 = nn.Conv1d(12, 6, 3, padding=1), nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = F.relu6(self.bn0(self.stem(x)))
        h = F.relu6(self.bn1(self.dw(h)))
        h = torch.relu(self.grouped(self.bn2(self.pw(h))))
        return self.fc(torch.relu(self.bn3(self.seq(h.flatten(2)))).mean(2))


BATCHNORM = {"stem": "bn0", "dw": "bn1", "pw": "bn2", "seq": "bn3"}


def build() -> MobileNetish:
    torch.manual_seed(0)
    model = MobileNetish()
    with torch.no_grad():  # statistics far from the identity, so a fold shows in every weight
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def close(got, want, tol: float = 1e-5) -> None:
    """Within ``tol``, relative to the largest value when values are large."""
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(1.0, float(np.abs(want).max())))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((24, 3, 16, 16)).astype(np.float32), rng.integers(0, 5, 24)


def _export(backend: str, tmp_path_factory, x: np.ndarray):
    model = build()
    names = dict(input_names=["x"], output_names=["logits"], name="mobilenetish")
    if backend == "onnxruntime":
        from exporters.onnx import export_onnx

        path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
        return backend, model, path, export_onnx(model, (torch.as_tensor(x[:1]),), path, progress=False, **names)
    pytest.importorskip("litert_torch", reason=CONVERTER)
    from exporters.tflite import export_tflite

    path = tmp_path_factory.mktemp("cnn") / "cnn.tflite"
    return backend, model, path, export_tflite(model, (torch.as_tensor(x[:1]),), path, **names)


@pytest.fixture(scope="module")
def onnxruntime_cnn(tmp_path_factory, data):
    return _export("onnxruntime", tmp_path_factory, data[0])


@pytest.fixture(scope="module")
def tflite_cnn(tmp_path_factory, data):
    return _export("tflite", tmp_path_factory, data[0])


@pytest.fixture(params=["onnxruntime", "tflite"])
def exported(request):
    return request.getfixturevalue(f"{request.param}_cnn")


CASES = [
    pytest.param(backend, strategy, id=f"{backend}-{strategy}")
    for backend, strategies in STRATEGIES.items()
    for strategy in strategies
]


def test_every_conv_weight_is_mapped_with_its_layout_and_folded_scale(exported):
    backend, model, path, info = exported
    assert set(info.tensors) == {f"{c}.weight" for c in CONVS} | {"fc.weight"}
    with Runtime(path, backend=backend) as rt:
        for name, t in info.tensors.items():
            source = model.get_parameter(name).detach().numpy()
            bn = BATCHNORM.get(name.split(".")[0])
            if t.channel_scale is None:
                np.testing.assert_array_equal(rt.weights(name), source)
                continue
            assert backend == "tflite" and bn is not None, f"{name} scaled without a BatchNorm after it"
            module = model.get_submodule(bn)
            fold = BatchNormFold.of(module.weight.detach().numpy(), module.running_var.numpy(), module.eps)
            np.testing.assert_allclose(t.channel_scale, fold.scale, rtol=1e-6)
            shape = (-1,) + (1,) * (source.ndim - 1)
            np.testing.assert_allclose(rt.weights(name), source * np.float32(t.channel_scale).reshape(shape), rtol=1e-6)
    if backend == "tflite":  # what litert-torch 0.10 does: OHWI, depthwise [1,H,W,C], BatchNorm2d folded
        layouts = {k: (t.layout, t.channel_scale is not None) for k, t in info.tensors.items()}
        assert {k: layouts[f"{k}.weight"] for k in ("stem", "dw", "pw", "grouped")} == {
            "stem": ((0, 2, 3, 1), True),
            "dw": ((1, 2, 3, 0), True),
            "pw": ((0, 1, 2, 3), True),  # 1x1: OHWI is OIHW's flat order
            "grouped": ((0, 2, 3, 1), False),
        }


@pytest.mark.parametrize("backend, strategy", CASES)
def test_shira_on_conv_weights_switches_like_torch_and_undoes_bit_exactly(request, data, backend, strategy):
    _, model, path, info = request.getfixturevalue(f"{backend}_cnn")
    x, y = data
    targets = select_targets(model, list(CONVS))
    masks = make_masks(model, targets, density=0.25, kind="snip", calib=(x, y), seed=0)
    trained = train_shira(model, masks, x, y, epochs=2, lr=5e-2, batch_size=8, progress=False)
    adapter = shira_adapter(trained, info, "cnn-a", model=model)
    merged = merge_shira(model, trained)
    with torch.no_grad():
        want_base, want = model(torch.as_tensor(x)).numpy(), merged(torch.as_tensor(x)).numpy()
    assert np.abs(want - want_base).max() > 1e-3, "the adapter must change the outputs for the test to mean anything"
    with Runtime(path, backend=backend, strategy=strategy) as rt:
        base = {k: rt.weights(k).copy() for k in targets}
        y0 = rt.run({"x": x})["logits"]
        close(y0, want_base)
        rt.load_adapter(adapter, name="a")
        rt.switch("a")
        rt.wait_settled(30)
        for k in targets:  # the torch delta, landed on the stored (maybe folded) weight
            t = info.tensors[k]
            scale = np.ones(t.shape[0]) if t.channel_scale is None else np.float32(t.channel_scale)
            expect = merged.get_parameter(k).detach().numpy() * scale.reshape((-1,) + (1,) * (len(t.shape) - 1))
            np.testing.assert_allclose(rt.weights(k), expect, rtol=1e-6, atol=1e-7)
        close(rt.run({"x": x})["logits"], want)
        rt.switch(None)
        rt.wait_settled(30)
        for k in targets:
            np.testing.assert_array_equal(rt.weights(k), base[k])
        np.testing.assert_array_equal(rt.run({"x": x})["logits"], y0)


class Flipped(nn.Conv2d):
    """A conv whose forward uses its weight flipped: no layout or scale maps the stored filter back."""

    def forward(self, x):
        return F.conv2d(x, self.weight.flip(3), self.bias, padding=1)


def test_a_conv_weight_found_nowhere_is_refused_by_name_without_blaming_batchnorm(tmp_path):
    pytest.importorskip("litert_torch", reason=CONVERTER)
    from exporters.tflite import export_tflite

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Flipped(4, 4, 3)).eval()
    with pytest.raises(ExportValidationError) as e:
        export_tflite(model, (torch.randn(1, 3, 8, 8),), tmp_path / "f.tflite", name="f", input_names=["x"],
                      output_names=["y"])  # fmt: skip
    text = str(e.value)
    assert "2.weight [4, 4, 3, 3] (conv '2', no BatchNorm after it)" in text and "0.weight" not in text
    assert "folded" not in text and not (tmp_path / "f.tflite").exists()
    info = export_tflite(model, (torch.randn(1, 3, 8, 8),), tmp_path / "f.tflite", name="f", input_names=["x"],
                         output_names=["y"], targets=["0.weight"])  # fmt: skip
    assert list(info.tensors) == ["0.weight"] and info.tensors["0.weight"].layout == (0, 2, 3, 1)


def test_the_onnx_and_tflite_of_one_model_are_twins_and_take_each_others_adapters(tmp_path, data, monkeypatch):
    pytest.importorskip("litert_torch", reason=CONVERTER)
    import edge.engine_cache as ec
    from edge.engines import decide as real_decide
    from exporters.onnx import export_onnx
    from exporters.tflite import export_tflite

    def tflite_wins(found, figures, skipped=None, margin=ec.MARGIN):  # which engine wins is the machine's business
        for b, f in figures["engines"].items():
            f["ratio"] = 1.0 if b == "tflite" else 2.0
        return real_decide(found, figures, skipped, margin)

    monkeypatch.setenv("EDGE_ENGINE_CACHE", str(tmp_path / "choices"))
    monkeypatch.setattr(ec, "decide", tflite_wins)
    x, y = data
    model, names = build(), dict(input_names=["x"], output_names=["logits"], name="mobilenetish")
    example = (torch.as_tensor(x[:1]),)
    onnx_info = export_onnx(model, example, tmp_path / "cnn.onnx", progress=False, **names)
    tfl_info = export_tflite(model, example, tmp_path / "cnn.tflite", **names)
    assert onnx_info.fingerprint != tfl_info.fingerprint  # each file hashes what it stores (BatchNorm folded, OHWI)
    assert onnx_info.source_fingerprint == tfl_info.source_fingerprint is not None
    targets = select_targets(model, list(CONVS))
    masks = make_masks(model, targets, density=0.25, kind="snip", calib=(x, y), seed=0)
    trained = train_shira(model, masks, x, y, epochs=2, lr=5e-2, batch_size=8, progress=False)
    adapter = shira_adapter(trained, onnx_info, "made-for-onnx", model=model)
    with torch.no_grad():
        want = merge_shira(model, trained)(torch.as_tensor(x[:1])).numpy()
    with Runtime(tmp_path / "cnn.onnx", backend="auto") as rt:
        assert rt.backend.name == "tflite" and rt.engine_choice.twins == (onnx_info.fingerprint,)
        assert "adapters for cnn.onnx fit cnn.tflite too" in rt.engine_choice.reason
        rt.load_adapter(adapter)
        rt.switch("made-for-onnx")
        rt.wait_settled(30)
        close(rt.run({"x": x[:1]})["logits"], want)
