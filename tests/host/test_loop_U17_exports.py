"""The adaptation loop on torch's other exports of the same foreign models (issue 17, helper U). Slow: dynamo.

MobileNetV2-style (ReLU6) and SqueezeNet-style (1x1-conv classifier, pooled, Softmax) models of
``test_loop_U17_tails`` exported by the dynamo exporter at opset 18 (dynamic batch, and batch fixed at 1) and by the
legacy exporter with the batch fixed at 1: the device trainer finds the same tail with torch's gradients, growth over
:data:`~edge.learn.tail.TAIL_SPACE` adapts only the model's own tail, and ``edge update --taps auto`` learns with all
four methods (shira-head over the tensor its head reads, as the refusal without it says).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from test_loop_U17_tails import MODELS, TAILS, bring_in, digits, torch_grads, train  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.learn.device_trainer import DeviceTrainer  # noqa: E402
from edge.learn.growth import grow  # noqa: E402
from edge.learn.tail import TAIL_SPACE  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

pytestmark = pytest.mark.slow
EXPORTS = {"dynamo-18": {"opset": 18, "dynamo": True}, "dynamo-18-b1": {"opset": 18, "dynamo": True, "batch1": True},
           "legacy-17-b1": {"opset": 17, "batch1": True}}  # fmt: skip


@pytest.fixture(scope="module")
def data():
    x, y = digits()
    return x, y, (1.0 - x).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data):
    x, y, _ = data
    d, out = tmp_path_factory.mktemp("u17x"), {}
    for name in ("mobilenetv2", "squeezenet"):
        torch.manual_seed(0)
        m = train(MODELS[name](), x, y)
        for e, kw in EXPORTS.items():
            out[name, e] = (m, bring_in(m, x, d / f"{name}-{e}.onnx", **kw))
    return out


@pytest.mark.parametrize("export", list(EXPORTS))
@pytest.mark.parametrize("name", ["mobilenetv2", "squeezenet"])
def test_same_tail_and_gradients_on_every_export(exported, data, name, export):
    m, path = exported[name, export]
    _, y, xs = data
    dt = DeviceTrainer(path, epochs=40)
    assert dt.params == TAILS[name]
    loss, grads = dt.loss_and_grads(xs[700:740], y[700:740])  # 40 rows: a batch-1 file runs 40 chunks
    t_loss, t_grads = torch_grads(m, xs[700:740], y[700:740], dt.params)
    assert loss == pytest.approx(t_loss, rel=1e-5)
    for p in dt.params:
        assert np.abs(grads[p] - t_grads[p]).max() <= 1e-4 * np.abs(t_grads[p]).max(), p
    with Runtime(path) as rt:
        r = grow(rt, xs[700:900], y[700:900], trainer=dt, space=TAIL_SPACE)
    assert set(r.adapter.tensors) <= set(TAILS[name]) and r.adapter.tensors
    xt, yt = xs[900:1100], y[900:1100]
    assert (dt.logits(xt, r.adapter).argmax(1) == yt).mean() > (dt.logits(xt).argmax(1) == yt).mean() + 0.1


@pytest.mark.parametrize("export", ["dynamo-18-b1", "legacy-17-b1"])
def test_cli_update_learns_with_every_method(exported, data, tmp_path, capsys, export):
    _, y, xs = data
    _, path = exported["mobilenetv2", export]
    np.savez(tmp_path / "train.npz", x=xs[700:900], y=y[700:900])
    np.savez(tmp_path / "eval.npz", x=xs[900:1100], y=y[900:1100])
    with Runtime(path) as rt:
        base = np.mean([rt.run({"x": xs[i : i + 1]})["logits"].argmax() == y[i] for i in range(900, 1100)])
    args = ["update", "--model", str(path), "--data", str(tmp_path / "train.npz"), "--eval", str(tmp_path / "eval.npz")]
    for method in ("ncm", "slda", "ranpac"):
        code = main([*args, "--taps", "auto", "--method", method])
        cap = capsys.readouterr()
        assert code == 0, cap.err
        assert json.loads(cap.out)["eval_acc"] > base + 0.3, method
    code = main([*args, "--taps", "auto", "--method", "shira-head"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "-o head=classifier.1.weight" in err[0]
    taps = err[0].split("pass --taps ")[1].split()[0]  # the tensor the classifier reads, as the refusal names it
    code = main([*args, "--taps", taps, "--method", "shira-head", "-o", "head=classifier.1.weight"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert json.loads(cap.out)["eval_acc"] > base + 0.3
