"""The device trainer's tail on the CNNs users ship (issue 18, helper C): fast checks; the matrix is slow.

* MobileNetV3's classifier is ``Linear -> Hardswish -> Dropout -> Linear`` and EfficientNet's tail is
  ``1x1 conv -> BatchNorm -> SiLU -> pool -> Linear``: the walk stopped at ``HardSwish`` and at SiLU's ``Mul``, so
  only the classifier trained; now both are tail ops (numpy forward and backward) and the layer before trains.
* :func:`exporters.onnx.export_onnx` runs torch's dynamo exporter unoptimized, which writes the zero bias of a
  ``bias=False`` conv as ``Expand(CastLike(0, x), Expand(Shape(weight), [1]))``: the walk refused that conv ("its bias
  is not a constant") on every such export (ShuffleNetV2's and RegNet's last 1x1 conv, before their BatchNorm); the
  constants are folded now (an Expand of more than 2^20 elements is not).

Gradients are compared with torch autograd and with finite differences. The models: ``cnn_C18_zoo``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from cnn_C18_zoo import assert_finite_differences, build, digits, legacy, torch_grads  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.format.modelinfo import onnx_info  # noqa: E402
from edge.learn.device_trainer import DeviceTrainer  # noqa: E402
from edge.learn.tail import find_tail  # noqa: E402
from edge.learn.tail_ops import Op  # noqa: E402

torch.set_num_threads(1)  # small models: threads only contend (as tests/host/test_byom_shira.py)
TAILS = {
    "mobilenetv3": ("classifier.0.weight", "classifier.3.weight"),  # through HardSwish (and Dropout)
    "efficientnet": ("features.4.0.weight", "classifier.1.weight"),  # through BatchNorm (folded), SiLU, pooling
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d, out = tmp_path_factory.mktemp("c18loop"), {}
    for name in TAILS:
        x, y = digits(name)
        m = build(name, x, y, steps=4, rows=128)
        path, report = legacy(m, x, d / f"{name}.onnx")
        out[name] = (m, path, report, x, y)
    return out


@pytest.mark.parametrize("op", [Op("hardswish", "h"), Op("silu", "s")])
def test_hardswish_and_silu_backward_equal_finite_differences_and_torch(op):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 7)) * 4
    x[np.abs(np.abs(x) - 3) < 1e-3] += 0.01  # away from HardSwish's kinks
    w = rng.standard_normal((4, 7))
    y, saved = op.forward(x, {}, {})
    ref = {"hardswish": torch.nn.functional.hardswish, "silu": torch.nn.functional.silu}[op.kind]
    t = torch.from_numpy(x).requires_grad_()
    (ref(t) * torch.from_numpy(w)).sum().backward()
    np.testing.assert_allclose(y, ref(torch.from_numpy(x)).numpy(), rtol=1e-12, atol=1e-12)
    dx, eps = op.backward(w, saved), 1e-6
    np.testing.assert_allclose(dx, t.grad.numpy(), rtol=1e-10, atol=1e-12)
    fd = np.array([(op.forward(x + eps * e, {}, {})[0] * w).sum() - (op.forward(x - eps * e, {}, {})[0] * w).sum()
                   for e in np.eye(x.size).reshape(x.size, *x.shape)]) / (2 * eps)  # fmt: skip
    np.testing.assert_allclose(dx.reshape(-1), fd, rtol=1e-5, atol=1e-8)
    big = op.forward(np.array([-800.0, 800.0]), {}, {})[0]  # no overflow warning, the limits
    np.testing.assert_allclose(big, [0.0, 800.0])


@pytest.mark.parametrize("name", list(TAILS))
def test_tail_reaches_the_layer_before_the_activation_with_torch_gradients(models, name):
    m, path, report, x, y = models[name]
    xs = (1.0 - x).astype(np.float32)
    dt = DeviceTrainer(path)
    assert dt.params == TAILS[name]
    loss, grads = dt.loss_and_grads(xs[700:764], y[700:764])
    t_loss, t_grads = torch_grads(m, xs[700:764], y[700:764], dt.params)
    assert loss == pytest.approx(t_loss, rel=1e-5)
    for p in dt.params:
        scale = np.abs(t_grads[p]).max()
        assert scale > 0 and np.abs(grads[p] - t_grads[p]).max() <= 1e-4 * scale, p
    if name == "efficientnet":  # the legacy exporter folded the BatchNorm: trained in the torch weight's scale
        assert report.info.tensors["features.4.0.weight"].channel_scale is not None


def test_tail_gradients_through_silu_equal_finite_differences(models):
    _, path, _, x, y = models["efficientnet"]
    assert_finite_differences(DeviceTrainer(path), (1.0 - x[700:716]).astype(np.float32), y[700:716])


def _zero_bias_graph(path, expand_to=None):
    """x -> Conv 1x1 (w, zero bias written as dynamo writes it) -> BatchNormalization -> Relu -> mean -> Gemm."""
    rng = np.random.default_rng(0)
    c, o, k = 3, 4, 5
    inits = {
        "w": rng.standard_normal((o, c, 1, 1)), "fc": rng.standard_normal((k, o)), "zero": np.zeros((), np.float32),
        "one": np.ones(1, np.int64), "bn_s": rng.uniform(0.5, 1.5, o), "bn_b": rng.standard_normal(o),
        "bn_m": rng.standard_normal(o), "bn_v": rng.uniform(0.5, 2.0, o), "axes": np.array([2, 3], np.int64),
    }  # fmt: skip
    if expand_to is not None:
        inits["one"] = np.array(expand_to, np.int64)
    nodes = [
        helper.make_node("Shape", ["w"], ["ws"], start=0, end=1),
        helper.make_node("Expand", ["ws", "one"], ["bshape"]),
        helper.make_node("CastLike", ["zero", "x"], ["z"]),
        helper.make_node("Expand", ["z", "bshape"], ["bias"]),
        helper.make_node("Conv", ["x", "w", "bias"], ["h"], name="conv"),
        helper.make_node("BatchNormalization", ["h", "bn_s", "bn_b", "bn_m", "bn_v"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("ReduceMean", ["r", "axes"], ["p"], keepdims=0),
        helper.make_node("Gemm", ["p", "fc"], ["logits"], transB=1),
    ]
    g = helper.make_graph(
        nodes, "zb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", c, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", k])],
        [numpy_helper.from_array(v if v.dtype.kind == "i" else v.astype(np.float32), n) for n, v in inits.items()],
    )  # fmt: skip
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    from edge.convert.onnx_import import import_onnx

    import_onnx(path, path.with_name("zb-edge.onnx"))
    return path.with_name("zb-edge.onnx")


def test_dynamo_zero_bias_of_a_conv_is_a_constant_of_the_tail(tmp_path):
    path = _zero_bias_graph(tmp_path / "zb.onnx")
    proto = onnx.load(str(path))
    tail = find_tail(proto, onnx_info(proto))
    assert tail.params == ("w", "fc") and tail.why_short is None  # was: "Conv node 'conv' (its bias is not ...)"
    assert np.array_equal(tail.steps[0].bias, np.zeros(4))
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((6, 3, 4, 4)).astype(np.float32), np.array([0, 1, 2, 3, 4, 0])
    dt = DeviceTrainer(path)
    from edge.runtime import Runtime

    with Runtime(path) as rt:  # the tail's forward is the model's
        np.testing.assert_allclose(dt.logits(x), rt.run({"x": x})["logits"], rtol=1e-5, atol=1e-5)
    loss, _ = dt.loss_and_grads(x, y)
    assert np.isfinite(loss)


def test_a_huge_expand_of_constants_is_not_folded(tmp_path):
    """A hostile file expanding a constant to 2^40 elements: not materialised; the conv is named as before."""
    path = _zero_bias_graph(tmp_path / "zb.onnx", expand_to=[1 << 20, 1 << 20])
    proto = onnx.load(str(path))
    tail = find_tail(proto, onnx_info(proto))
    assert tail.params == ("fc",) and "its bias is not a constant" in tail.why_short


@pytest.fixture(scope="module")
def shufflenet_int8(tmp_path_factory):
    from exporters.quantize import quantize_onnx

    d = tmp_path_factory.mktemp("c18int8")
    x, y = digits("shufflenetv2")
    path, _ = legacy(build("shufflenetv2", x, y, steps=2, rows=128), x, d / "shufflenet.onnx")
    out = {"float": path}
    for mode in ("dynamic", "static"):
        out[mode] = d / f"{mode}.onnx"
        quantize_onnx(path, out[mode], mode=mode, calib={"x": x[:16]}, check={"x": x[1300:1308]})
    return out, x


def test_int8_twins_tap_the_same_stages_as_the_float_model(shufflenet_int8, tmp_path):
    """A dynamic twin computes each conv as DynamicQuantizeLinear -> ConvInteger -> Cast -> Mul, a static one puts
    QuantizeLinear -> DequantizeLinear on every map (inside the channel shuffle too): `stages` found no map in either
    ("0 CNN stages"), so `edge update --taps auto` and the router refused every int8 CNN."""
    from edge.route.taps import FEATURES, tap_model
    from edge.runtime import Runtime

    files, x = shufflenet_int8
    feats = {}
    for key, path in files.items():
        t = tap_model(path, tmp_path / f"{key}.onnx", "auto")
        assert t.tap_set == "auto (stages)" and len(t.tensors) == 2 and t.width == 40, (key, t.tensors)
        with Runtime(t.path) as rt:
            feats[key] = rt.run({"x": x[:64]})[FEATURES]
    scale = np.abs(feats["float"]).max()
    for key in ("dynamic", "static"):  # the same maps, within int8 rounding
        assert np.abs(feats[key] - feats["float"]).max() <= 0.2 * scale, key


def test_the_device_trainer_on_an_int8_twin_says_what_to_do_instead(shufflenet_int8):
    from edge.errors import ConfigError

    files, _ = shufflenet_int8
    for key in ("dynamic", "static"):
        with pytest.raises(ConfigError, match=r"int8 weights \(an edge quantize twin\).*grow on the float model"):
            DeviceTrainer(files[key])


@pytest.mark.parametrize(
    "op,shape",
    [
        (Op("scale", "g", {"s": np.array([0.5, -2.0, 3.0])}), (4, 5, 3)),
        (Op("transpose", "t", {"perm": [0, 2, 1]}), (4, 5, 3)),
    ],
)
def test_scale_and_transpose_backward_equal_finite_differences(op, shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    y, saved = op.forward(x, {}, {})
    w = rng.standard_normal(y.shape)
    dx, eps = op.backward(w, saved), 1e-6
    fd = np.array([(op.forward(x + eps * e, {}, {})[0] * w).sum() - (op.forward(x - eps * e, {}, {})[0] * w).sum()
                   for e in np.eye(x.size).reshape(x.size, *x.shape)]) / (2 * eps)  # fmt: skip
    np.testing.assert_allclose(dx.reshape(-1), fd, rtol=1e-6, atol=1e-9)


def test_a_constant_that_would_broadcast_the_tensor_is_no_scale():
    with pytest.raises(ValueError, match=r"a constant of shape \[2, 3\] would broadcast it"):
        Op("scale", "g", {"s": np.ones((2, 3))}).forward(np.ones((1, 3)), {}, {})


def test_convnext_tail_reaches_the_last_block_through_layer_scale_and_permute(tmp_path):
    """ConvNeXt: head <- LayerNorm <- mean <- residual Add <- Transpose (NHWC -> NCHW) <- Mul(gamma) <- pw2. The walk
    stopped at the Transpose (only the head trained); now pw2 trains, with torch's gradients."""
    x, y = digits("convnext")
    m = build("convnext", x, y, steps=2, rows=64)
    path, _ = legacy(m, x, tmp_path / "convnext.onnx")
    dt = DeviceTrainer(path)
    assert dt.params == ("stage2.pw2.weight", "head.weight")
    xs = (1.0 - x[700:732]).astype(np.float32)
    loss, grads = dt.loss_and_grads(xs, y[700:732])
    t_loss, t_grads = torch_grads(m, xs, y[700:732], dt.params)
    assert loss == pytest.approx(t_loss, rel=1e-5)
    for p in dt.params:
        scale = np.abs(t_grads[p]).max()
        assert scale > 0 and np.abs(grads[p] - t_grads[p]).max() <= 1e-4 * scale, p
