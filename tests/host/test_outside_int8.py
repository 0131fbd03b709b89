"""int8 models made by the user's own pipeline (issue 18, from outside): onnxruntime.quantization, litert-torch.

A user exports with ``torch.onnx.export`` and quantizes with onnxruntime's ``quantize_dynamic`` or
``quantize_static`` (QDQ or QOperator, per tensor or channel, int8 or uint8, symmetric, ``MatMulConstBOnly``, a
subset of op types, any calibration method). Such a file records no grids for adapters, so ``edge import-onnx``
refuses it in one typed line naming ``edge quantize`` (also when only part of it is quantized: importing the float
rest would leave the integer layers silently without adapters), and so do ``edge.Runtime`` and ``edge quantize``
when the quantizer ran after the import; litert-torch's own int8 ``.tflite`` is refused naming quantize_tflite.

The README's path (import the float file, then ``exporters.quantize_onnx`` with the same options) is checked case by
case: each target's integer initializer, scale, zero point and channel axis; integer and float SHiRA adapters
written exactly (outputs equal onnxruntime on a file with those integers written in), fusion saturation refused or
clipped and counted, undo bit-exact, and the three strategies writing the same. ``edge quantize`` takes the users'
options (weight and activation types, symmetric) and names the weights onnxruntime left per tensor under
``per_channel``. The models (an MLP, a CNN with BatchNorm and a depthwise conv, a one-layer BERT) are built once per
session, seeded.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
oq = pytest.importorskip("onnxruntime.quantization")
from onnx import numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.cpu_int8 import u8s8_saturates  # noqa: E402
from edge.errors import ConfigError, FormatError  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.format.modelinfo import onnx_info  # noqa: E402
from edge.fusion import SaturationError  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from exporters.quantize import quantize_onnx  # noqa: E402
from tests.host.test_outside_onnx_exports import cnn  # noqa: E402  (BatchNorm and a depthwise conv)

STRATEGIES = ("hybrid", "bound", "rebuild")


class MLP(nn.Module):  # Linear layers on 3-D input: torch exports MatMul (a 2-D input gives Gemm: the CNN's head)
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def deconv() -> nn.Module:  # a ConvTranspose: its output channels are its weight's axis 1
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(6, 5, 2, stride=2),
        nn.ReLU(),
        nn.Conv2d(5, 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class Bert(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            type_vocab_size=1,
        )
        self.m = BertModel(config, add_pooling_layer=False)

    def forward(self, ids):
        return self.m(input_ids=ids).last_hidden_state.mean(1)


#: name -> (model, input name, draw n inputs)
MODELS = {
    "mlp": (MLP, "x", lambda r, n: r.standard_normal((n, 3, 8)).astype(np.float32)),
    "cnn": (cnn, "x", lambda r, n: r.standard_normal((n, 3, 6, 6)).astype(np.float32)),
    "deconv": (deconv, "x", lambda r, n: r.standard_normal((n, 3, 6, 6)).astype(np.float32)),
    "bert": (Bert, "ids", lambda r, n: r.integers(0, 50, (n, 8)).astype(np.int64)),
}


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """name -> (torch.onnx export, its import by edge, calibration feed, check feed)."""
    root = tmp_path_factory.mktemp("outside-int8")
    out = {}
    for name, (make, inp, draw) in MODELS.items():
        if name == "bert" and not _has("transformers"):
            continue
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        calib, x = {inp: draw(rng, 32)}, {inp: draw(rng, 4)}
        path = root / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                make().eval(),
                (torch.from_numpy(x[inp][:2]),),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=[inp],
                output_names=["y"],
                dynamic_axes={inp: {0: "b"}},
            )
        import_onnx(path, root / f"{name}.edge.onnx")
        out[name] = (path, root / f"{name}.edge.onnx", calib, x)
    return out


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _model(exported, name):
    if name not in exported:
        pytest.skip(f"{name} needs transformers")
    return exported[name]


class _Reader(oq.CalibrationDataReader):
    def __init__(self, feed):
        ((name, array),) = feed.items()
        self.items = iter([{name: array[i : i + 8]} for i in range(0, len(array), 8)])

    def get_next(self):
        return next(self.items, None)


Q, U = oq.QuantType.QInt8, oq.QuantType.QUInt8
QDQ, QOP = oq.QuantFormat.QDQ, oq.QuantFormat.QOperator
#: how users call onnxruntime's quantizer: (mode, its keyword arguments)
FOREIGN = {
    "dynamic-uint8": ("dynamic", {"weight_type": U}),
    "dynamic-channel-reduce": ("dynamic", {"weight_type": Q, "per_channel": True, "reduce_range": True}),
    "dynamic-matmul-only": ("dynamic", {"weight_type": Q, "op_types_to_quantize": ["MatMul"]}),  # convs stay float
    "dynamic-saved-optimized": ("optimized", {"weight_type": Q}),  # onnxruntime's optimized graph: contrib ops only
    "qdq-s8s8-channel-symmetric": (
        "static",
        {"quant_format": QDQ, "activation_type": Q, "weight_type": Q, "per_channel": True}
        | {"extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True}},
    ),
    "qdq-u8u8-entropy": (
        "static",
        {"quant_format": QDQ, "activation_type": U, "weight_type": U}
        | {"calibrate_method": oq.CalibrationMethod.Entropy},
    ),
    "qdq-constb-percentile": (
        "static",
        {"quant_format": QDQ, "activation_type": U, "weight_type": Q, "extra_options": {"MatMulConstBOnly": True}}
        | {"calibrate_method": oq.CalibrationMethod.Percentile},
    ),
    "qdq-weight-pairs": ("static", {"quant_format": QDQ, "extra_options": {"AddQDQPairToWeight": True}}),
    "qdq-conv-only": ("static", {"quant_format": QDQ, "op_types_to_quantize": ["Conv"]}),  # the head stays float
    "qoperator-u8s8": ("static", {"quant_format": QOP, "activation_type": U, "weight_type": Q}),
    "qoperator-u8u8-channel": (
        "static",
        {"quant_format": QOP, "activation_type": U, "weight_type": U, "per_channel": True},
    ),
}
REFUSED = [
    ("mlp", "dynamic-uint8"),
    ("mlp", "dynamic-saved-optimized"),  # DynamicQuantizeMatMul and Relu: no op of the standard set
    ("mlp", "qoperator-u8u8-channel"),
    ("cnn", "dynamic-channel-reduce"),
    ("cnn", "dynamic-matmul-only"),  # partly quantized: the head's integers, the convs' floats
    ("cnn", "qdq-conv-only"),  # partly quantized: the convs' integers, the head's floats
    ("cnn", "qdq-weight-pairs"),
    ("cnn", "qoperator-u8s8"),
    ("bert", "dynamic-matmul-only"),  # partly quantized: MatMuls integer, embeddings float
    ("bert", "qdq-s8s8-channel-symmetric"),
    ("bert", "qdq-u8u8-entropy"),
    ("bert", "qdq-constb-percentile"),
]


def _foreign(src, out, case, calib):
    mode, kwargs = FOREIGN[case]
    logging.getLogger().disabled, was = True, logging.getLogger().disabled  # onnxruntime's pre-processing banner
    try:
        if mode in ("dynamic", "optimized"):
            oq.quantize_dynamic(src, out, **kwargs)
        else:
            oq.quantize_static(src, out, _Reader(calib), **kwargs)
    finally:
        logging.getLogger().disabled = was
    if mode == "optimized":  # as a user keeps what onnxruntime runs: SessionOptions.optimized_model_filepath
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(out.with_suffix(".opt.onnx"))
        ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
        out = out.with_suffix(".opt.onnx")
        assert {n.op_type for n in onnx.load(str(out)).graph.node} == {"DynamicQuantizeMatMul", "Relu"}
    return out


@pytest.mark.parametrize("name,case", REFUSED, ids=[f"{n}-{c}" for n, c in REFUSED])
def test_a_model_quantized_elsewhere_is_refused_in_one_line_naming_edge_quantize(
    exported, tmp_path, capsys, name, case
):
    path, _, calib, _ = _model(exported, name)
    q = _foreign(path, tmp_path / "q.onnx", case, calib)
    with pytest.raises(ConfigError, match=r"already quantized \(.+\): import the float model.*`edge quantize`"):
        import_onnx(q, tmp_path / "out.onnx")
    capsys.readouterr()
    assert main(["import-onnx", str(q), "--out", str(tmp_path / "cli.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already quantized" in err[0] and "edge quantize" in err[0], err
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "cli.onnx").exists()


@pytest.mark.parametrize("case", ["dynamic-uint8", "qdq-s8s8-channel-symmetric", "qoperator-u8s8"])
def test_quantizing_the_imported_file_elsewhere_is_refused_naming_edge_quantize(exported, tmp_path, capsys, case):
    _, imported, calib, _ = exported["cnn"]
    q = _foreign(imported, tmp_path / "q.onnx", case, calib)  # onnxruntime keeps our metadata, renames the weights
    for strategy in STRATEGIES:
        with pytest.raises(FormatError, match=r"quantized after export by another tool.*`edge quantize`"):
            Runtime(q, strategy=strategy)
    with pytest.raises(ConfigError, match=r"already quantized \(.+\): import the float model"):  # not a KeyError
        quantize_onnx(q, tmp_path / "again.onnx", calib=calib)
    capsys.readouterr()
    assert main(["quantize", str(q), "--out", str(tmp_path / "again.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already quantized" in err[0], err
    assert not (tmp_path / "again.onnx").exists()


#: the same users' options through the README's path: exporters.quantize_onnx on the imported float file
SUPPORTED = {
    "mlp-dynamic-uint8": ("mlp", {"mode": "dynamic", "weight_type": "uint8"}),
    "mlp-static-symmetric": (
        "mlp",
        {"mode": "static", "activation_type": "int8"}
        | {"extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True}},
    ),
    # MatMulConstBOnly: read by onnxruntime's dynamic quantizer only (static QDQ ignores it; quantize_onnx refuses)
    "mlp-dynamic-constb": ("mlp", {"mode": "dynamic", "extra_options": {"MatMulConstBOnly": True}}),
    "cnn-dynamic-channel": ("cnn", {"mode": "dynamic", "per_channel": True}),
    "cnn-dynamic-reduce": ("cnn", {"mode": "dynamic", "reduce_range": True}),
    "cnn-dynamic-matmul-only": ("cnn", {"mode": "dynamic", "op_types": ["MatMul"]}),  # convs stay float targets
    "cnn-static-s8s8-channel": ("cnn", {"mode": "static", "activation_type": "int8", "per_channel": True}),
    "cnn-static-u8u8-entropy": ("cnn", {"mode": "static", "weight_type": "uint8", "calibrate_method": "entropy"}),
    "deconv-static-channel": ("deconv", {"mode": "static", "per_channel": True}),
    "bert-dynamic": ("bert", {"mode": "dynamic"}),
    "bert-static-percentile": ("bert", {"mode": "static", "calibrate_method": "percentile"}),
    "bert-static-s8s8-channel": ("bert", {"mode": "static", "activation_type": "int8", "per_channel": True}),
}


def _stored(path, info):
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    return {k: t.from_stored(inits[t.initializer]) for k, t in info.tensors.items()}, inits


def _written(qpath, info, weights) -> ort.InferenceSession:
    """onnxruntime on the quantized file with ``weights`` (source layout) written into their initializers."""
    model = onnx.load(str(qpath))
    inits = {t.name: t for t in model.graph.initializer}
    for k, w in weights.items():
        t = info.tensors[k]
        inits[t.initializer].CopyFrom(numpy_helper.from_array(t.to_stored(w).reshape(t.stored_shape), t.initializer))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _adapter(info, base, name, rng, *, scale=None, step=5):
    """Random entries of every target: integers moved up to ``step`` grid steps, or float deltas of ``scale``."""
    tensors = {}
    for k, t in info.tensors.items():
        size = int(np.prod(t.shape))
        flat = np.sort(rng.choice(size, max(1, size // 5), replace=False))
        idx = np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)
        values = (np.float32(scale or 0.05) * rng.standard_normal(flat.size)).astype(np.float32)
        qvalues = None
        if scale is None and t.quant is not None:
            lo, hi = t.quant.bounds
            moved = base[k][tuple(idx)].astype(np.int64) + rng.integers(-step, step + 1, flat.size)
            qvalues = np.clip(moved, lo, hi).astype(t.quant.dtype)
        tensors[k] = SparseDelta(idx, values, qvalues)
    return Adapter(name, info.fingerprint, tensors, {k: tuple(t.shape) for k, t in info.tensors.items()})


def _expected(info, base, inits, pairs):
    """What a switch to ``[(adapter, alpha), ...]`` leaves (clipped), and how many entries it clipped."""
    out, clipped = {}, 0
    for k, t in info.tensors.items():
        acc, hit = np.zeros(t.shape, np.float32), np.zeros(t.shape, bool)
        for a, alpha in pairs:
            d, at = a.tensors[k], tuple(a.tensors[k].indices)
            if d.qvalues is not None:
                acc[at] += np.float32(alpha) * (d.qvalues.astype(np.float32) - base[k][at].astype(np.float32))
            elif t.quant is not None:
                acc[at] += np.float32(alpha) * t.grid_units(d.indices, d.values, inits[t.quant.scale])
            else:
                acc[at] += np.float32(alpha) * d.values
            hit[at] = True
        w = base[k].copy()
        if t.quant is None:
            w[hit] = base[k][hit] + acc[hit]
        else:
            lo, hi = t.quant.weight_bounds(inits[t.quant.zero_point])  # symmetric int8: [-127, 127]
            q = base[k].astype(np.int64) + np.rint(acc).astype(np.int64)
            clipped += int((hit & ((q < lo) | (q > hi))).sum())
            w[hit] = np.clip(q, lo, hi)[hit].astype(base[k].dtype)
        out[k] = w
    return out, clipped


@pytest.mark.parametrize("case", SUPPORTED)
def test_options_users_pick_give_exact_adapters_through_edge_quantize(exported, tmp_path, case):
    name, options = SUPPORTED[case]
    if options.get("weight_type", "int8") == "int8" and u8s8_saturates() is not False:
        # this CPU's U8S8 kernels saturate on full-range int8 weights (x86 without VNNI): the outputs would drift for
        # that alone (tests/host/test_int8cpu_saturation.py); what this test checks, adapters, runs on 7 bits here
        options = {**options, "reduce_range": True}
    _, imported, calib, x = _model(exported, name)
    report = quantize_onnx(imported, tmp_path / "q.onnx", calib=calib, **options)
    qpath, info = tmp_path / "q.onnx", report.info
    assert not report.dropped and sorted(report.quantized + report.float_targets) == sorted(info.tensors)
    assert report.quantized and min(report.cosine.values()) > 0.99
    base, inits = _stored(qpath, info)
    fbase, _ = _stored(imported, onnx_info(onnx.load(str(imported))))
    want_dtype = options.get("weight_type", "int8")
    for k in report.quantized:
        t = info.tensors[k]
        scale, zero = inits[t.quant.scale], inits[t.quant.zero_point]
        assert base[k].dtype == t.quant.dtype == zero.dtype and scale.dtype == np.float32 and scale.size == zero.size
        if "embeddings" not in k:  # onnxruntime quantizes a Gather table as an activation: uint8 unless asked
            assert t.quant.dtype == want_dtype
        if scale.size == 1:  # per tensor (onnxruntime's ConvInteger and Gather are, even with per_channel)
            assert t.quant.axis is None
        else:  # one scale per output channel: source axis 0 (a MatMul's stored axis 1), a ConvTranspose's axis 1
            out_axis = 1 if (name, k) == ("deconv", "2.weight") else 0  # its ConvTranspose, as torch names it
            assert t.quant.axis == out_axis and scale.size == t.shape[out_axis] and options.get("per_channel")
        step = np.broadcast_to(scale.reshape(t.quant_shape), t.shape)
        assert np.all(np.abs(t.dequantize(inits[t.initializer], scale, zero) - fbase[k]) <= 0.5 * step * 1.001 + 1e-7)
    if options.get("per_channel") and options["mode"] == "static":
        assert all(inits[info.tensors[k].quant.scale].size > 1 for k in report.quantized if "embeddings" not in k)
        assert name != "deconv" or info.tensors["2.weight"].quant.axis == 1

    rng = np.random.default_rng(1)
    a, b = _adapter(info, base, "a", rng), _adapter(info, base, "b", rng)
    steps = 80 if options.get("reduce_range") else 40  # 7-bit bases sit in half the range: twice as far to its ends
    f = _adapter(info, base, "f", rng, scale=float(max(inits[t.quant.scale].max() for t in _q(info))) * steps)
    specs = ["a", "f", {"a": 1.0, "b": -1.0}, {"a": 1.0, "b": 1.0}, None]
    pairs = [[(a, 1.0)], [(f, 1.0)], [(a, 1.0), (b, -1.0)], [(a, 1.0), (b, 1.0)], []]
    seen = {}
    for strategy in STRATEGIES:
        with Runtime(qpath, strategy=strategy) as rt:
            rt.load_adapter(a)
            rt.load_adapter(b)
            with pytest.raises(SaturationError, match="clip=True"):  # `steps` steps leave the range somewhere
                rt.load_adapter(f)
            rt.load_adapter(f, clip=True)
            for spec, pair in zip(specs, pairs):
                want, clipped = _expected(info, base, inits, pair)
                if clipped and spec != "f":  # a fusion leaving the range: refused, nothing written
                    before = {k: np.array(rt.weights(k)) for k in info.tensors}
                    with pytest.raises(SaturationError):
                        rt.switch(spec)
                    assert all(np.array_equal(rt.weights(k), before[k]) for k in before)
                rt.switch(spec, clip=True)
                rt.wait_settled(30)
                assert rt.clipped == clipped
                got = {k: np.ascontiguousarray(rt.weights(k)) for k in info.tensors}
                for k in info.tensors:
                    np.testing.assert_array_equal(got[k], want[k], err_msg=f"{strategy} {spec} {k}")
                out = rt.run(x)["y"]
                ref = _written(qpath, info, got).run(None, x)[0]
                if strategy == "bound" and report.float_targets:  # float kernels without prepacking: last bits
                    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
                else:
                    np.testing.assert_array_equal(out, ref, err_msg=f"{strategy} {spec}")
                seen.setdefault(str(spec), []).append({k: v.tobytes() for k, v in got.items()})
            for k in info.tensors:  # undo: the saved values back, bit for bit; scales never touched
                assert rt.weights(k).tobytes() == np.ascontiguousarray(base[k]).tobytes()
            for t in _q(info):
                for n in (t.quant.scale, t.quant.zero_point):
                    np.testing.assert_array_equal(rt.backend.constant(n), inits[n])
    assert all(w == ws[0] for ws in seen.values() for w in ws)  # the three strategies wrote the same
    assert {len(ws) for ws in seen.values()} == {len(STRATEGIES)}


def test_per_channel_weights_onnxruntime_leaves_per_tensor_are_said(exported, tmp_path, caplog):
    """onnxruntime's dynamic ConvInteger takes one weight scale whatever per_channel says: a warning names them."""
    _, imported, calib, _ = exported["cnn"]
    with caplog.at_level(logging.WARNING, logger="exporters.quantize"):
        report = quantize_onnx(imported, tmp_path / "q.onnx", calib=calib, mode="dynamic", per_channel=True)
    convs = sorted(k for k, t in report.info.tensors.items() if len(t.shape) == 4)
    assert len(convs) == 3 and all(report.info.tensors[k].quant.axis is None for k in convs)
    assert all(t.quant.axis == 0 for k, t in report.info.tensors.items() if k not in convs)  # the Gemm head
    (said,) = [r.getMessage() for r in caplog.records if "per_channel" in r.getMessage()]
    assert "3 target(s)" in said and all(k in said for k in convs)


def test_edge_quantize_takes_the_options_users_pick(exported, tmp_path, capsys):
    """--weight-type, --activation-type and --symmetric reach onnxruntime; pairs it cannot run exit 2."""
    _, imported, calib, _ = exported["mlp"]
    np.savez(tmp_path / "s.npz", **calib)
    cmd = ["quantize", str(imported), "--calib", str(tmp_path / "s.npz"), "--mode", "static", "--out"]
    assert main([*cmd, str(tmp_path / "u.onnx"), "--weight-type", "uint8", "--symmetric"]) == 0
    model = onnx.load(str(tmp_path / "u.onnx"))
    info, inits = onnx_info(model), {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert {t.quant.dtype for t in info.tensors.values()} == {"uint8"}
    assert all(v.dtype == np.uint8 and np.all(v == 128) for k, v in inits.items() if k.endswith("zero_point"))
    assert main([*cmd, str(tmp_path / "s8.onnx"), "--activation-type", "int8"]) == 0
    info = onnx_info(onnx.load(str(tmp_path / "s8.onnx")))
    assert info.extra["quantization"]["activation_type"] == "int8"
    assert {t.quant.dtype for t in info.tensors.values()} == {"int8"}
    for bad, said in (
        (["--mode", "dynamic", "--activation-type", "int8"], "with --mode static only"),
        (["--weight-type", "uint8", "--activation-type", "int8"], "--weight-type uint8 must be int8"),
    ):
        capsys.readouterr()
        assert main([*cmd, str(tmp_path / "bad.onnx"), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err
        assert not (tmp_path / "bad.onnx").exists()


def _q(info):
    return [t for t in info.tensors.values() if t.quant is not None]


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-range", "full-integer"])
def test_a_litert_model_quantized_by_litert_torch_is_refused_naming_quantize_tflite(tmp_path, dynamic):
    """litert-torch's own PT2E quantization (in `.venv-tflite`): no grids recorded, so refused saying what to use."""
    litert_torch = pytest.importorskip("litert_torch")
    pt2e = pytest.importorskip("litert_torch.quantize.pt2e_quantizer")
    from litert_torch.quantize.quant_config import QuantConfig

    steps = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")  # what litert-torch's quantizer uses

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), (torch.randn(2, 8),)
    quantizer = pt2e.PT2EQuantizer().set_global(
        pt2e.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = steps.prepare_pt2e(torch.export.export(model, x).module(), quantizer)
        prepared(*x)  # calibration
        done = steps.convert_pt2e(prepared, fold_quantize=False)
        litert_torch.convert(done, x, quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(
            str(tmp_path / "q.tflite")
        )
    for strategy in ("hybrid", "builtin"):
        with pytest.raises(FormatError, match=r"no 'edge' metadata.*export_tflite.*quantize_tflite"):
            Runtime(tmp_path / "q.tflite", backend="tflite", strategy=strategy)
