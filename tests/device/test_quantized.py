"""Fused adapters on an int8 base (issue 18): integer arena, integer and float adapters, saturation, undo.

The tiny models are the numpy MLPs of ``_tiny``, quantized by onnxruntime's own tools through
``exporters.quantize`` (numpy, onnx and onnxruntime only: no torch), dynamically and static QDQ,
per tensor and per channel.
"""

from __future__ import annotations

import _tiny
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edge.errors import AdapterMismatchError, FormatError
from edge.format.adapter import Adapter, SparseDelta, adapter_from_bytes, load_adapter
from edge.fusion import SaturationError
from edge.runtime import Runtime, merge_weights
from exporters.quantize import quantize_onnx

X = np.random.default_rng(0).standard_normal((7, 10)).astype(np.float32)
CALIB = np.random.default_rng(1).standard_normal((64, 10)).astype(np.float32)
VARIANTS = [("dynamic", False, "int8"), ("dynamic", True, "int8"), ("static", False, "int8"), ("static", True, "int8")]
VARIANTS += [("dynamic", False, "uint8")]  # onnxruntime's uint8 weights (it stores Gather tables so too)
STRATEGIES = ("hybrid", "bound", "rebuild")


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"{v[0]}-{'channel' if v[1] else 'tensor'}-{v[2]}")
def twin(request, tmp_path_factory):
    """(float path, float info, int8 path, int8 info) for one quantization variant."""
    mode, per_channel, weight_type = request.param
    d = tmp_path_factory.mktemp(f"q-{mode}-{per_channel}-{weight_type}")
    fpath = d / "m.onnx"
    finfo = _tiny.make_mlp(fpath, sizes=(10, 24, 3))
    qpath = d / "q.onnx"
    opts = {"mode": mode, "per_channel": per_channel, "weight_type": weight_type}
    report = quantize_onnx(fpath, qpath, calib={"x": CALIB}, **opts)
    assert sorted(report.quantized) == ["fc1.weight", "fc2.weight"] and not report.dropped
    assert min(report.cosine.values()) > 0.99
    return fpath, finfo, qpath, report.info


def _stored(path, info):
    """Source-layout stored values of every target, and every initializer by name."""
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    return {k: t.from_stored(inits[t.initializer]) for k, t in info.tensors.items()}, inits


def _int_adapter(info, base, seed, step=6, density=0.3, name=None):
    """An integer adapter: random entries moved by up to ``step`` grid steps (kept in range)."""
    rng = np.random.default_rng(seed)
    tensors, shapes = {}, {}
    for k, t in info.tensors.items():
        size = int(np.prod(t.shape))
        flat = np.sort(rng.choice(size, max(1, int(density * size)), replace=False))
        idx = np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)
        lo, hi = t.quant.bounds
        q = np.clip(base[k][tuple(idx)].astype(np.int64) + rng.integers(-step, step + 1, flat.size), lo, hi)
        tensors[k] = SparseDelta(idx, rng.standard_normal(flat.size).astype(np.float32), q.astype(t.quant.dtype))
        shapes[k] = tuple(t.shape)
    return Adapter(name or f"i{seed}", info.fingerprint, tensors, shapes)


def _steps(info, inits, adapter, alpha=1.0, base=None):
    """Reference grid steps of an adapter per target (source layout, dense float32)."""
    out = {}
    for k, d in adapter.tensors.items():
        t = info.tensors[k]
        acc = np.zeros(t.shape, np.float32)
        if d.qvalues is not None:
            acc[tuple(d.indices)] = d.qvalues.astype(np.float32) - base[k][tuple(d.indices)]
        else:
            acc[tuple(d.indices)] = t.grid_units(d.indices, d.values, inits[t.quant.scale])
        out[k] = np.float32(alpha) * acc
    return out


def _reference(info, base, inits, adapters):
    """The integers a switch to ``[(adapter, alpha), ...]`` must leave: base + rint(sum of steps) where touched."""
    ref = {k: v.copy() for k, v in base.items()}
    for k in base:
        acc = np.zeros(base[k].shape, np.float32)
        hit = np.zeros(base[k].shape, bool)
        for a, alpha in adapters:
            if k in a.tensors:
                acc += _steps(info, inits, a, alpha, base)[k]
                hit[tuple(a.tensors[k].indices)] = True
        lo, hi = info.tensors[k].quant.bounds
        q = base[k].astype(np.int64) + np.rint(acc).astype(np.int64)
        ref[k][hit] = np.clip(q, lo, hi)[hit].astype(base[k].dtype)
    return ref


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_integer_adapters_switch_bit_exact_and_match_a_fresh_model(twin, tmp_path, strategy):
    _, _, qpath, info = twin
    base, inits = _stored(qpath, info)
    a, b = _int_adapter(info, base, 1), _int_adapter(info, base, 2, step=3)
    scales = {n: v.copy() for n, v in inits.items() if n.endswith(("_scale", "_zero_point"))}
    with Runtime(qpath, strategy=strategy) as rt:
        assert rt.backend._arena_of, "the int8 weights live in an integer arena"
        for ad in (a, b):
            rt.load_adapter(ad)
        for spec in ("i1", {"i1": 1.0, "i2": 1.0}, {"i2": 0.5, "i1": -1.0}, None, "i2"):
            rt.switch(spec, clip=True)  # the reference clips too (refusal: test_fused_saturation...)
            rt.wait_settled(30)
            pairs = [] if spec is None else ([(b, 1.0)] if spec == "i2" else [(a, 1.0)])
            if isinstance(spec, dict):
                pairs = [({"i1": a, "i2": b}[n], w) for n, w in spec.items()]
            ref = _reference(info, base, inits, pairs)
            for k in ref:
                got = rt.weights(k)
                assert got.dtype == base[k].dtype
                np.testing.assert_array_equal(got, ref[k])
            _tiny.write_merged(qpath, info, ref, tmp_path / "ref.onnx")
            with Runtime(tmp_path / "ref.onnx", strategy="rebuild", verify=False) as fresh:
                np.testing.assert_array_equal(rt.run(X)["logits"], fresh.run(X)["logits"])
        rt.switch(None)
        for k in base:  # undo restores the saved integers, bit for bit
            np.testing.assert_array_equal(rt.weights(k), base[k])
        for t in info.tensors.values():  # the scales and zero points were never touched
            for n in (t.quant.scale, t.quant.zero_point):
                np.testing.assert_array_equal(rt.backend.constant(n), scales[n])
    _, after = _stored(qpath, info)
    assert all(np.array_equal(after[n], v) for n, v in scales.items())


def _scaled(adapter, factor, name):
    return Adapter(
        name,
        adapter.base_fingerprint,
        {k: SparseDelta(d.indices, d.values * np.float32(factor)) for k, d in adapter.tensors.items()},
        adapter.shapes,
    )


def _out_of_range(info, base, inits, adapter):
    """How many entries the adapter alone takes outside the integer range."""
    steps, n = _steps(info, inits, adapter, 1.0, base), 0
    for k, d in adapter.tensors.items():
        q = base[k][tuple(d.indices)].astype(np.int64) + np.rint(steps[k][tuple(d.indices)]).astype(np.int64)
        lo, hi = info.tensors[k].quant.bounds
        n += int(((q < lo) | (q > hi)).sum())
    return n


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float_adapter_of_the_float_twin_is_requantized_onto_the_grid(twin, strategy):
    fpath, finfo, qpath, info = twin
    base, inits = _stored(qpath, info)
    fl = _tiny.random_adapter(finfo, seed=3, name="f")  # trained for the float model: fits its int8 twin
    small, big = _scaled(fl, 0.02, "f"), _scaled(fl, 50, "big")
    with Runtime(qpath, strategy=strategy) as rt:
        for a in (small, big):
            n = _out_of_range(info, base, inits, a)
            if n:  # refused unless asked to clip
                with pytest.raises(SaturationError, match="clip=True"):
                    rt.load_adapter(a)
            rt.load_adapter(a, clip=True)
            rt.switch(a.name)
            rt.wait_settled(30)
            ref = _reference(info, base, inits, [(a, 1.0)])
            for k in ref:
                np.testing.assert_array_equal(rt.weights(k), ref[k])
            assert rt.clipped == n
        assert rt.clipped > 0  # deltas of tens of steps leave the range somewhere
        rt.switch(None)
        for k in base:
            np.testing.assert_array_equal(rt.weights(k), base[k])
    # the same float adapter on the float model: float semantics, unchanged
    with Runtime(fpath) as rt:
        rt.load_adapter(small)
        rt.switch("f")
        fbase, _ = _stored(fpath, finfo)
        ref = merge_weights(fbase, [(small, 1.0)])
        for k in ref:
            np.testing.assert_array_equal(rt.weights(k), ref[k])


def test_edge_profile_refuses_a_saturating_adapter_unless_clip_is_given(twin, tmp_path, capsys):
    """The CLI names its own flag: ``edge profile --clip`` clips (counted in the results), without it exit 2."""
    import json

    from edge.cli import main

    fpath, finfo, qpath, info = twin
    base, inits = _stored(qpath, info)
    big = _scaled(_tiny.random_adapter(finfo, seed=3, name="f"), 50, "big")
    n = _out_of_range(info, base, inits, big)
    assert n > 0
    path = big.save(tmp_path / "big.safetensors")
    argv = ["profile", str(qpath), "--device", "x86-dev", "--adapters", str(path), "-q", "--runs", "2"]
    argv += ["--warmup", "0", "--switches", "1", "--engine-rounds", "0", "--backend", "onnxruntime"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--clip" in err[0], err
    assert main([*argv, "--clip", "--json", str(tmp_path / "p.json")]) == 0
    (figures,) = json.loads((tmp_path / "p.json").read_text())["adapters"]
    assert figures["clipped"] == n


def test_fused_saturation_is_refused_or_clipped_and_reported(twin):
    _, _, qpath, info = twin
    base, inits = _stored(qpath, info)
    lo, hi = info.tensors["fc1.weight"].quant.bounds
    idx = np.array([[0, 1], [0, 1]], np.int32)
    top = np.array([hi, hi - 1], info.tensors["fc1.weight"].quant.dtype)

    def pushing(name):  # both move the same two entries to the top of the range
        return Adapter(
            name,
            info.fingerprint,
            {"fc1.weight": SparseDelta(idx, np.ones(2, np.float32), top)},
            {"fc1.weight": info.tensors["fc1.weight"].shape},
        )

    with Runtime(qpath, strategy="bound") as rt:
        rt.load_adapter(pushing("p"))
        rt.load_adapter(pushing("q"))
        rt.switch("p")
        before = rt.weights("fc1.weight")
        with pytest.raises(SaturationError, match="outside the int8 range|outside the uint8 range"):
            rt.switch({"p": 1.0, "q": 1.0})
        np.testing.assert_array_equal(rt.weights("fc1.weight"), before)  # nothing was written
        assert rt.active == {"p": 1.0}
        rt.switch({"p": 1.0, "q": 1.0}, clip=True)
        got = rt.weights("fc1.weight")
        assert got[0, 0] == hi and rt.clipped >= 1
        np.testing.assert_array_equal(got[1, 1], np.clip(2 * int(hi - 1) - int(base["fc1.weight"][1, 1]), lo, hi))
        rt.switch(None)
        np.testing.assert_array_equal(rt.weights("fc1.weight"), base["fc1.weight"])
        assert rt.clipped == 0


def test_integer_adapter_file_round_trip_and_refusals(twin, tmp_path):
    fpath, finfo, qpath, info = twin
    base, _ = _stored(qpath, info)
    a = _int_adapter(info, base, 5)
    path = a.save(tmp_path / "int.safetensors")
    back = load_adapter(path, model=info)
    for k, d in a.tensors.items():
        np.testing.assert_array_equal(back.tensors[k].qvalues, d.qvalues)
        np.testing.assert_array_equal(back.tensors[k].values, d.values)
        assert back.tensors[k].qvalues.dtype == d.qvalues.dtype
    with pytest.raises(AdapterMismatchError):  # integers fit the quantized base only, not its float twin
        Runtime(fpath).load_adapter(back)
    # a float adapter file is written exactly as before: dtype float32, no "quantized" key
    fl = _tiny.random_adapter(finfo, seed=1)
    raw = fl.save(tmp_path / "f.safetensors").read_bytes()
    assert b'\\"dtype\\": \\"float32\\"' in raw and b"quantized" not in raw
    # a header that disagrees with the payload is a format error
    data = path.read_bytes()
    for old, new in (
        (b'\\"dtype\\": \\"int8\\"', b'\\"dtype\\": \\"uint8\\"'),
        (b'\\"dtype\\": \\"uint8\\"', b'\\"dtype\\": \\"int8\\"'),
    ):
        if old in data:
            with pytest.raises(FormatError):
                adapter_from_bytes(data.replace(old, new))


def test_wrong_dtype_in_the_file_is_refused_before_the_arena(twin, tmp_path):
    _, _, qpath, info = twin
    model = onnx.load(str(qpath))
    t = info.tensors["fc1.weight"]
    for init in model.graph.initializer:
        if init.name == t.initializer:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(FormatError, match="quantized"):
        Runtime(tmp_path / "bad.onnx", verify=False)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_int8_twin_runs_the_fp32_switch_sequences(twin, strategy):
    """The fp32 runtime's switch sequences (test_runtime.SEQUENCES), on the int8 twin with float adapters."""
    _, finfo, qpath, info = twin
    base, inits = _stored(qpath, info)
    adapters = {}
    for seed, n in enumerate("abc", start=1):
        fl = _tiny.random_adapter(finfo, seed, name=n)
        adapters[n] = _scaled(fl, 0.002, n)
    sequences = [
        ["a", None],
        ["a", "b", "a"],
        [{"a": 1.0, "b": 0.5}],
        [{"a": 0.3}, "b", {"b": 1.0, "c": -2.0, "a": 0.25}, None, "c"],
    ]
    with Runtime(qpath, strategy=strategy) as rt:
        for a in adapters.values():
            rt.load_adapter(a, clip=True)  # an entry at the edge of the range may step out: the reference clips
        for seq in sequences:
            for step in seq:
                rt.switch(step, clip=True)
            rt.wait_settled(30)
            last = seq[-1]
            spec = {} if last is None else ({last: 1.0} if isinstance(last, str) else last)
            ref = _reference(info, base, inits, [(adapters[n], w) for n, w in spec.items()])
            for k in ref:
                np.testing.assert_array_equal(rt.weights(k), ref[k])
            assert rt.active == spec


def test_tampered_integers_fail_the_fingerprint_and_bad_quant_metadata_is_a_format_error(twin, tmp_path):
    _, _, qpath, info = twin
    model = onnx.load(str(qpath))
    t = info.tensors["fc2.weight"]
    for init in model.graph.initializer:
        if init.name == t.initializer:
            arr = numpy_helper.to_array(init).copy()
            arr.flat[0] = arr.flat[0] // 2 + 1
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(tmp_path / "tampered.onnx"))
    with pytest.raises(FormatError, match="fingerprint"):
        Runtime(tmp_path / "tampered.onnx")
    from edge.format.modelinfo import ModelInfo

    text = info.to_json()
    assert ModelInfo.from_json(text) == info  # the quantization record round-trips
    for bad in ('"dtype": "int4"', '"axis": 7', '"axis": "0"'):
        broken = text.replace(f'"dtype": "{t.quant.dtype}"', bad) if "dtype" in bad else text
        if "axis" in bad:
            broken = text.replace(f'"axis": {_json_axis(t)}', bad, 1)
        with pytest.raises(FormatError):
            ModelInfo.from_json(broken)


def _json_axis(t) -> str:
    return "null" if t.quant.axis is None else str(t.quant.axis)


def test_a_device_asking_for_int8_refuses_the_float_model_and_takes_the_twin(twin):
    from edge.errors import ConfigError
    from runtimes import BackendOptions, get_backend

    fpath, _, qpath, _ = twin
    ort_backend = get_backend("onnxruntime")
    with pytest.raises(ConfigError, match="runs int8 models.*quantize"):
        ort_backend(fpath, BackendOptions(strategy="bound", precision="int8", device="npu-board"))
    with pytest.raises(ConfigError, match="runs fp32 models"):
        ort_backend(qpath, BackendOptions(strategy="bound", precision="fp32"))
    b = ort_backend(qpath, BackendOptions(strategy="bound", precision="int8"))
    assert b.run({"x": X})["logits"].shape == (7, 3)
    b.close()
