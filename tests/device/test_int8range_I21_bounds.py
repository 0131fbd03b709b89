"""A symmetric int8 weight (zero point 0) holds [-127, 127]: bounds, fusion's clip, the requantization at load, an
integer adapter's values and the host trainer all keep -128 out of it; asymmetric int8 and uint8 keep their full
range (edge.format.qrange)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _tiny  # noqa: E402
import _tiny_tflite  # noqa: E402

from edge.errors import AdapterMismatchError  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.format.modelinfo import QuantInfo  # noqa: E402
from edge.format.qrange import weight_bounds  # noqa: E402
from edge.fusion import SaturationError, fuse, merged  # noqa: E402
from edge.runtime import Runtime  # noqa: E402


@pytest.mark.parametrize(
    "dtype, zp, want",
    [
        ("int8", np.zeros(1, np.int8), (-127, 127)),  # per tensor, symmetric
        ("int8", np.zeros(7, np.int8), (-127, 127)),  # per channel, symmetric
        ("int8", np.array([0, 0, 3], np.int8), (-128, 127)),  # one channel asymmetric: the whole range
        ("int8", np.array([-5], np.int8), (-128, 127)),
        ("uint8", np.zeros(1, np.uint8), (0, 255)),
        ("uint8", np.array([128], np.uint8), (0, 255)),
    ],
)
def test_weight_bounds_symmetric_int8_only(dtype, zp, want):
    assert weight_bounds(dtype, zp) == want
    q = QuantInfo("s", "z", dtype, None if zp.size == 1 else 0)
    assert q.weight_bounds(zp) == want
    assert q.bounds == {"int8": (-127, 127), "uint8": (0, 255)}[dtype]  # without zero points: what no kernel misreads


def test_merged_and_fuse_clip_to_the_tensor_range():
    base = np.array([-120, -127, 0, 126], np.int8)
    acc = np.array([-30.0, -1.0, 0.0, 5.0], np.float32)
    with pytest.raises(SaturationError, match=r"3 of 4 entries of 'w' outside the int8 range \[-127, 127\]"):
        merged("w", base, acc, clip=False, what="test", bounds=(-127, 127))
    out, n = merged("w", base, acc, clip=True, what="test", bounds=(-127, 127))
    assert out.tolist() == [-127, -127, 0, 127] and n == 3
    out, n = merged("w", base, acc, clip=True, what="test", bounds=(-128, 127))  # asymmetric: -128 allowed
    assert out.tolist() == [-128, -128, 0, 127] and n == 2
    pos = np.arange(4)
    f = fuse({"w": [(pos, acc, base), (pos, acc, base)]}, clip=True, what="t", bounds={"w": (-127, 127)})
    assert f.values["w"].tolist() == [-127, -127, 0, 127] and f.clipped == 3
    f = fuse({"w": [(pos, acc, base)]}, clip=True, what="t", bounds={"w": (-128, 127)})  # asymmetric
    assert f.values["w"].tolist() == [-128, -128, 0, 127] and f.clipped == 2
    f = fuse({"w": [(pos, acc, base)]}, clip=True, what="t")  # no bounds given: the range no kernel misreads
    assert f.values["w"].tolist() == [-127, -127, 0, 127] and f.clipped == 3
    u8 = np.array([3, 250], np.uint8)
    assert merged("u", u8, np.float32([-9, 9]), clip=True, what="t")[0].tolist() == [0, 255]  # uint8: whole range


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny int8 models: onnxruntime dynamic (symmetric, and asymmetric weights), LiteRT dynamic-range."""
    from exporters.quantize import quantize_onnx

    d = tmp_path_factory.mktemp("int8range")
    out = {"mlp": d / "mlp.onnx", "ort": d / "sym.onnx", "ort-asym": d / "asym.onnx", "tflite": d / "mlp.tflite"}
    _tiny.make_mlp(out["mlp"], seed=4, sizes=(10, 24, 3))
    calib = {"x": np.random.default_rng(1).standard_normal((64, 10)).astype(np.float32)}
    quantize_onnx(out["mlp"], out["ort"], mode="dynamic", calib=calib)
    out["ort-channel"] = d / "channel.onnx"
    quantize_onnx(out["mlp"], out["ort-channel"], mode="dynamic", calib=calib, per_channel=True)
    quantize_onnx(out["mlp"], out["ort-asym"], mode="dynamic", calib=calib, extra_options={"WeightSymmetric": False})
    _tiny_tflite.make_int8_mlp(out["tflite"], seed=5)
    return out


def _entries(rt: Runtime, k: int = 6):
    """A quantized target, its source-layout base, and ``k`` positions of its most negative entries."""
    name = next(n for n, t in rt.info.tensors.items() if t.quant is not None)
    t = rt.info.tensors[name]
    base = t.from_stored(rt.backend.read(t.initializer)).reshape(-1)
    flat = np.sort(np.argsort(base, kind="stable")[:k])
    return name, t, base, flat, np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)


def _integer(rt: Runtime, value: int, name: str = "int") -> Adapter:
    tname, t, base, flat, idx = _entries(rt)
    q = np.full(flat.size, value, np.int8)
    q[0] = base[flat[0]]  # one entry left as it is
    tensors = {tname: SparseDelta(idx, np.zeros(flat.size, np.float32), q)}
    return Adapter(name, rt.info.fingerprint, tensors, {tname: tuple(t.shape)})


@pytest.mark.parametrize("key", ["ort", "ort-channel", "tflite"])
def test_integer_adapter_with_minus_128_is_refused_on_a_symmetric_base(models, key):
    with Runtime(models[key], strategy="rebuild") as rt:
        zps = [rt.backend.constant(t.quant.zero_point) for t in rt.info.tensors.values() if t.quant is not None]
        assert not any(z.any() for z in zps) and (key != "ort-channel" or min(z.size for z in zps) > 1)
        assert set(rt.int_bounds().values()) == {(-127, 127)}
        tname = _entries(rt)[0]
        with pytest.raises(AdapterMismatchError) as e:
            rt.load_adapter(_integer(rt, -128))
        msg = str(e.value)
        assert "writes 5 entries outside their weight's range (symmetric int8" in msg
        assert f"in 1 tensor(s): {tname!r} 5 of 6 (-128.." in msg and "allowed [-127, 127]" in msg
        assert "symmetric int8" in msg and "edge bench quantized" in msg and "train_shira_int" in msg
        assert rt.adapters == []
        rt.load_adapter(_integer(rt, -127))  # the grid's own end loads, and is written as it is
        rt.switch("int")
        name, t, _, flat, _ = _entries(rt)
        assert rt.weights(name).reshape(-1)[flat[1:]].tolist() == [-127] * 5


def test_asymmetric_int8_keeps_its_whole_range(models):
    with Runtime(models["ort-asym"], strategy="rebuild") as rt:
        bounds = rt.int_bounds()
        assert bounds and set(bounds.values()) == {(-128, 127)}
        rt.load_adapter(_integer(rt, -128))
        rt.switch("int")
        name, _, _, flat, _ = _entries(rt)
        assert rt.weights(name).reshape(-1)[flat[1:]].tolist() == [-128] * 5


@pytest.mark.parametrize("key", ["ort", "tflite"])
def test_float_adapter_requantized_with_clip_lands_at_minus_127(models, key, caplog):
    with Runtime(models[key], strategy="rebuild") as rt:
        tname, t, base, flat, idx = _entries(rt)
        scale = float(np.max(rt.backend.constant(t.quant.scale)))
        values = np.full(flat.size, -300.0 * scale, np.float32)  # hundreds of grid steps down
        a = Adapter("down", rt.info.fingerprint, {tname: SparseDelta(idx, values)}, {tname: tuple(t.shape)})
        with pytest.raises(SaturationError, match=r"6 of 6 entries .* outside the int8 range \[-127, 127\]"):
            rt.load_adapter(a)
        with caplog.at_level(logging.WARNING, logger="edge.runtime"):
            rt.load_adapter(a, clip=True)
        assert "clips 6 entries" in caplog.text
        rt.switch("down")
        assert rt.clipped == 6
        assert rt.weights(tname).reshape(-1)[flat].tolist() == [-127] * 6
        assert int(min(rt.weights(n).min() for n, t in rt.info.tensors.items() if t.quant)) == -127
        half = Adapter("half", rt.info.fingerprint, {tname: SparseDelta(idx, values / 2)}, {tname: tuple(t.shape)})
        rt.load_adapter(half, clip=True)
        rt.switch({"down": 0.5, "half": 1.0}, clip=True)  # fused: clipped to -127 as well, and counted
        assert rt.clipped == 6 and rt.weights(tname).reshape(-1)[flat].tolist() == [-127] * 6


def test_trainer_keeps_symmetric_int8_in_range(models):
    import torch

    from exporters.qshira import QuantBase, quantized_base, train_shira_int

    _, qbase = quantized_base(models["ort"])
    assert {b.bounds for b in qbase.values()} == {(-127, 127)}
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    q = np.full((3, 4), -120, np.int8)
    # a base made by hand with the old full range: the trainer still keeps to the symmetric grid
    base = {"weight": QuantBase(q, np.full((1, 1), 0.01, np.float32), np.zeros((1, 1), np.int8), (-128, 127), "int8")}
    rng = np.random.default_rng(0)
    x = (np.abs(rng.standard_normal((32, 4))) + 0.5).astype(np.float32)  # positive inputs
    y = np.zeros(32, np.int64)  # class 0 everywhere: rows 1 and 2 are pushed down, row 0 up
    masks = {"weight": np.stack(np.unravel_index(np.arange(12), (3, 4))).astype(np.int32)}
    out = train_shira_int(model, masks, base, x, y, epochs=5, lr=1.0, batch_size=32)
    qv = out["weight"][2].reshape(3, 4)
    assert qv.dtype == np.int8
    assert qv[1:].reshape(-1).tolist() == [-127] * 8  # pushed down past the grid's end: the bound binds, not -128
    assert int(qv.min()) == -127 and int(qv.max()) <= 127
