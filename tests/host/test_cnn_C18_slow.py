"""The CNNs users ship, end to end (issue 18, helper C). Slow: eleven models, three exports each, int8 twins.

Each model of ``cnn_C18_zoo`` (MobileNetV3, EfficientNet, ShuffleNetV2, DenseNet, RegNet, GroupNorm, InstanceNorm,
ConvNeXt, a 1-D audio CNN, dilated convs, AdaptiveAvgPool + Flatten + Dropout + Linear) is exported three ways:
``exporters.export_onnx`` (dynamo, BatchNorm kept as an op), torch's legacy exporter and torch's dynamo exporter
(both fold each BatchNorm into the conv before it) brought in by ``import_onnx`` with the state dict; and quantized by
``quantize_onnx`` (dynamic and static, 32 calibration samples). Then on ``edge.Runtime``:

* every Conv/Linear weight is a target (depthwise and grouped convs too), and a folded BatchNorm is recorded as the
  conv's channel scale; an adapter on every target switches to what torch computes with the merged weights (float)
  or to onnxruntime on the merged integers (int8), and undoes bit-exactly;
* the host trainer's adapter (``train_shira`` on a depthwise conv and the classifier) serves what torch trained, on
  the export that folded the BatchNorm too;
* ``auto`` taps are the CNN ``stages``: one pooled map per resolution, never an output, a weight or the scores; the
  int8 twins get the same stages (they found none before: ``ConvInteger`` and QDQ pairs were not map ops), and the
  router's detector routes two domains of digits;
* ``edge update --taps auto`` learns with ncm, slda and ranpac, and shira-head over the tensor its refusal names;
* the device trainer's tail matches torch autograd, growth adapts only the tail's own targets, and an int8 twin is
  refused saying what to do instead.
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from cnn_C18_zoo import MODELS, build, digits, legacy, torch_grads  # noqa: E402
from torch import nn  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from edge.format.modelinfo import onnx_info  # noqa: E402
from edge.learn.device_trainer import DeviceTrainer  # noqa: E402
from edge.learn.growth import grow  # noqa: E402
from edge.learn.tail import TAIL_SPACE  # noqa: E402
from edge.route.hdc import HDC  # noqa: E402
from edge.route.taps import FEATURES, tap_model  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from exporters.quantize import quantize_onnx  # noqa: E402
from tests.host.test_outside_int8 import _adapter, _expected, _stored, _written  # noqa: E402

pytestmark = pytest.mark.slow
NAMES = list(MODELS)
FLOAT = ("dyn", "leg", "tdyn")
INT8 = ("dyn-dynamic", "dyn-static", "leg-dynamic", "leg-static")
STAGES = {"audio1d": 3, "poolflat": 3}  # resolutions after the input (16x16 -> 8 -> 4, or 64 -> 32 -> 16); else 2
TAILS = {
    "mobilenetv3": ("classifier.0.weight", "classifier.3.weight"),  # through HardSwish
    "efficientnet": ("features.4.0.weight", "classifier.1.weight"),  # through BatchNorm and SiLU
    "shufflenetv2": ("conv5.0.weight", "fc.weight"),  # bias=False before BatchNorm: dynamo's zero bias folded
    "regnet": ("trunk.2.c.0.weight", "fc.weight"),  # and through the residual sum
    "convnext": ("stage2.pw2.weight", "head.weight"),  # through layer scale, the permute to NCHW, the residual
}  # the others end in a 3x3 conv, a norm or a Concat (DenseNet): the classifier alone
_CACHE: dict = {}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """name -> (model, {export: path}, x, y); built on first use."""

    def get(name):
        if name not in _CACHE:
            torch.manual_seed(0)
            x, y = digits(name)
            m = build(name, x, y)
            d = tmp_path_factory.mktemp(name)
            files = {"dyn": d / "dyn.onnx"}
            export_onnx(m, (torch.from_numpy(x[:2]),), files["dyn"], input_names=["x"], output_names=["logits"],
                        name=name, progress=False)  # fmt: skip
            files["leg"] = legacy(m, x, d / "leg.onnx")[0]
            files["tdyn"] = _torch_dynamo(m, x, d / "tdyn.onnx")
            for src in ("dyn", "leg"):
                for mode in ("dynamic", "static"):
                    out = d / f"{src}-{mode}.onnx"
                    r = quantize_onnx(files[src], out, mode=mode, calib={"x": x[:32]}, check={"x": x[1300:1316]})
                    assert r.dropped == {} and len(r.quantized) == len(r.info.tensors), (name, src, mode, r.dropped)
                    files[f"{src}-{mode}"] = out
            _CACHE[name] = (m, files, x, y)
        return _CACHE[name]

    return get


def _torch_dynamo(m, x, path):
    import warnings

    from safetensors.torch import save_file

    from edge.convert.onnx_import import import_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.from_numpy(x[:2]),), str(path), dynamo=True, opset_version=18, input_names=["x"],
                          output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},),
                          verbose=False)  # fmt: skip
    sd = path.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in m.state_dict().items() if v.dtype.is_floating_point}, str(sd))
    out = path.with_name("tdyn-edge.onnx")
    import_onnx(path, out, state_dict=sd)
    return out


def _folded(m: nn.Module) -> set[str]:
    """Conv weights a BatchNorm directly follows (in a Sequential): what an exporter folds."""
    out = set()
    for prefix, mod in m.named_modules():
        if isinstance(mod, nn.Sequential):
            kids = list(mod.named_children())
            for (a, ca), (_, cb) in zip(kids, kids[1:]):
                if isinstance(ca, nn.modules.conv._ConvNd) and isinstance(cb, nn.modules.batchnorm._BatchNorm):
                    out.add(f"{prefix}.{a}.weight" if prefix else f"{a}.weight")
    return out


@pytest.mark.parametrize("name", NAMES)
def test_every_conv_and_linear_weight_is_a_target_and_folded_batchnorms_are_recorded(zoo, name):
    m, files, _, _ = zoo(name)
    weights = {k for k, v in m.named_parameters() if v.ndim >= 2}
    folded = _folded(m)
    grouped = {f"{k}.weight" for k, mod in m.named_modules() if isinstance(mod, nn.Conv2d) and mod.groups > 1}
    for key, path in files.items():
        info = onnx_info(onnx.load(str(path)))
        assert set(info.tensors) == weights, (key, weights ^ set(info.tensors))
        scaled = {k for k, t in info.tensors.items() if t.channel_scale is not None}
        if key in ("leg", "tdyn"):  # the exporter folded each BatchNorm: named by the state dict, scale recorded
            assert scaled == folded, key
        elif key == "dyn":  # export_onnx keeps BatchNormalization as an op
            assert not scaled
    assert grouped <= weights  # depthwise and grouped convs are targets too
    if name in ("mobilenetv3", "efficientnet", "shufflenetv2", "regnet", "convnext"):
        assert grouped


@pytest.mark.parametrize("name", NAMES)
def test_an_adapter_on_every_target_switches_exactly_and_undoes_bit_exactly(zoo, name):
    m, files, x, _ = zoo(name)
    xb = x[1300:1316]
    for key, path in files.items():
        info = onnx_info(onnx.load(str(path)))
        base, inits = _stored(path, info)
        a = _adapter(info, base, "a", np.random.default_rng(1))
        with Runtime(path, strategy="bound") as rt:
            before = rt.run({"x": xb})["logits"]
            rt.load_adapter(a)
            rt.switch("a")
            on = rt.run({"x": xb})["logits"]
            rt.switch(None)
            np.testing.assert_array_equal(rt.run({"x": xb})["logits"], before)  # undone bit for bit
        if key in INT8:  # the merged integers, as onnxruntime computes with them
            want, _ = _expected(info, base, inits, [(a, 1.0)])
            np.testing.assert_allclose(on, _written(path, info, want).run(None, {"x": xb})[0], rtol=0, atol=1e-5)
        else:  # torch with the deltas added to its own weights (a folded BatchNorm scales them in the file)
            merged = copy.deepcopy(m)
            params = dict(merged.named_parameters())
            with torch.no_grad():
                for k, dl in a.tensors.items():
                    params[k][tuple(torch.from_numpy(dl.indices.astype(np.int64)))] += torch.from_numpy(dl.values)
                ref = merged(torch.from_numpy(xb)).numpy()
            np.testing.assert_allclose(on, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        assert np.abs(on - before).max() > 1e-3, key  # the adapter moved the outputs


@pytest.mark.parametrize("name", ["mobilenetv3", "efficientnet", "convnext"])
def test_host_trained_adapter_on_depthwise_convs_serves_what_torch_trained(zoo, name):
    from exporters.shira import make_masks, merge_shira, shira_adapter, train_shira

    m, files, x, y = zoo(name)
    xs = (1.0 - x).astype(np.float32)
    depthwise = [f"{k}.weight" for k, mod in m.named_modules() if isinstance(mod, nn.Conv2d) and mod.groups > 1]
    head = [k for k, v in m.named_parameters() if v.ndim == 2][-1]
    masks = make_masks(m, [*depthwise, head], density=0.1)
    trained = train_shira(m, masks, (xs[700:900], y[700:900]), epochs=3, lr=1e-2, progress=False)
    tuned = merge_shira(m, trained)
    for key in ("dyn", "leg"):
        info = onnx_info(onnx.load(str(files[key])))
        adapter = shira_adapter(trained, info, "inv", {"mask": "wm"}, model=m)
        assert set(adapter.tensors) == {*depthwise, head}
        with Runtime(files[key]) as rt:
            rt.load_adapter(adapter)
            rt.switch("inv")
            got = rt.run({"x": xs[900:932]})["logits"]
        with torch.no_grad():
            want = tuned(torch.from_numpy(xs[900:932])).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("name", NAMES)
def test_auto_taps_are_one_pooled_map_per_stage_and_route_two_domains(zoo, name, tmp_path):
    m, files, x, y = zoo(name)
    xs = (1.0 - x).astype(np.float32)
    feats = {}
    for key in ("dyn", "leg", *INT8):
        path = files[key]
        proto = onnx.load(str(path))
        t = tap_model(path, tmp_path / f"{key}.onnx", "auto")
        assert t.tap_set == "auto (stages)" and len(t.tensors) == STAGES.get(name, 2), (key, t.tensors)
        stored = {i.name for i in proto.graph.initializer}
        outputs = {o.name for o in proto.graph.output}
        assert not set(t.tensors) & (stored | outputs)  # never a weight, never the scores
        with Runtime(t.path) as rt:
            fa, fb = rt.run({"x": x[:400]})[FEATURES], rt.run({"x": xs[:400]})[FEATURES]
            lg = np.concatenate([rt.run({"x": x[:400]})["logits"], rt.run({"x": xs[:400]})["logits"]])
            ta, tb = rt.run({"x": x[1300:1500]})[FEATURES], rt.run({"x": xs[1300:1500]})[FEATURES]
        assert fa.shape == (400, t.width)  # pooled: one row per input
        feats[key] = fa
        det = HDC().fit(np.concatenate([fa, fb]), lg, np.concatenate([y[:400]] * 2), np.repeat([0, 1], 400))
        assert (det.route(ta)[1] == 0).mean() > 0.9 and (det.route(tb)[1] == 1).mean() > 0.9, key
    for key in INT8:  # the int8 twin taps the same stages: its features are the float ones within rounding
        src = feats[key.split("-")[0]]
        assert np.abs(feats[key] - src).max() <= 0.25 * np.abs(src).max(), key


def _update(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err.strip().splitlines()


@pytest.mark.parametrize("name", NAMES)
def test_edge_update_learns_with_every_method(zoo, name, tmp_path, capsys):
    _, files, x, y = zoo(name)
    xs = (1.0 - x).astype(np.float32)
    np.savez(tmp_path / "train.npz", x=xs[700:900], y=y[700:900])
    np.savez(tmp_path / "eval.npz", x=xs[900:1100], y=y[900:1100])
    for key in ("dyn", "leg", "dyn-dynamic"):
        args = ["update", "--model", str(files[key]), "--data", str(tmp_path / "train.npz"), "--eval",
                str(tmp_path / "eval.npz"), "--state", str(tmp_path / f"{key}.state")]  # fmt: skip
        for method in ("ncm", "slda", "ranpac") if key != "dyn-dynamic" else ("slda",):
            code, out, err = _update([*args, "--taps", "auto", "--method", method], capsys)
            assert code == 0, err
            assert json.loads(out)["eval_acc"] > 0.25, (key, method)  # chance: 0.1
            (tmp_path / f"{key}.state").unlink()
        if key == "dyn-dynamic":
            continue
        code, out, err = _update([*args, "--taps", "auto", "--method", "shira-head"], capsys)
        assert code == 2 and len(err) == 1
        taps, head = re.search(r"pass --taps (\S+) -o head=(\S+)", err[0]).groups()
        code, out, err = _update([*args, "--taps", taps, "--method", "shira-head", "-o", f"head={head}"], capsys)
        assert code == 0, err
        assert json.loads(out)["eval_acc"] > 0.2, key  # the head alone, over the features it reads


@pytest.mark.parametrize("name", NAMES)
def test_device_trainer_tail_gradients_and_growth_on_the_models_own_targets(zoo, name):
    m, files, x, y = zoo(name)
    xs = (1.0 - x).astype(np.float32)
    head = [k for k, v in m.named_parameters() if v.ndim == 2][-1]
    for key in FLOAT:
        dt = DeviceTrainer(files[key], epochs=20)
        assert dt.params == TAILS.get(name, (head,)), key
        if len(dt.params) == 1:
            assert dt._tail.why_short, key  # where the walk stopped is said
        loss, grads = dt.loss_and_grads(xs[700:764], y[700:764])
        t_loss, t_grads = torch_grads(m, xs[700:764], y[700:764], dt.params)
        assert loss == pytest.approx(t_loss, rel=1e-5), key
        for p in dt.params:
            scale = np.abs(t_grads[p]).max()
            assert scale > 0 and np.abs(grads[p] - t_grads[p]).max() <= 1e-4 * scale, (key, p)
    dt = DeviceTrainer(files["leg"], epochs=20)
    with Runtime(files["leg"]) as rt:
        r = grow(rt, xs[700:900], y[700:900], trainer=dt, space=TAIL_SPACE)
        assert r.adapter.tensors and set(r.adapter.tensors) <= set(dt.params) <= set(rt.info.tensors)
    for key in ("leg-dynamic", "dyn-static"):
        with pytest.raises(ConfigError, match="int8 weights .* edge update --method ncm, slda or ranpac"):
            DeviceTrainer(files[key])


@pytest.mark.parametrize("name", list(TAILS))
def test_a_tail_adapter_through_the_new_ops_serves_what_the_trainer_scored(zoo, name):
    """Through HardSwish, SiLU, a BatchNorm op (export_onnx) or folded (channel scale), under every strategy."""
    from edge.learn.space import Arch

    _, files, x, y = zoo(name)
    xs = (1.0 - x).astype(np.float32)
    for key in FLOAT:
        dt = DeviceTrainer(files[key], epochs=30)
        a = dt.train(Arch("shira", 0.5, "tail"), xs[700:900], y[700:900], "inv")
        assert set(a.tensors) == set(TAILS[name])
        want = dt.logits(xs[900:1000], a)
        for strategy in ("bound", "hybrid", "rebuild"):
            with Runtime(files[key], strategy=strategy) as rt:
                rt.load_adapter(a)
                rt.switch("inv")
                got = rt.run({"x": xs[900:1000]})["logits"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
