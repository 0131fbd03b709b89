"""Fused-mode switching on every registered backend and strategy (device side: no torch)."""

from __future__ import annotations

import itertools

import _tiny
import _tiny_tflite
import numpy as np
import pytest
from _tiny import make_mlp, random_adapter

from edge.errors import AdapterMismatchError, ConfigError, EdgeError, FormatError
from edge.format.adapter import Adapter, SparseDelta
from edge.runtime import Runtime, merge_weights
from runtimes import backend_names, get_backend

CASES = [(b, s) for b in backend_names() for s in get_backend(b).STRATEGIES]
TESTED_BACKENDS = {"onnxruntime", "tflite"}
TINY = {"onnxruntime": _tiny, "tflite": _tiny_tflite}  # tiny-model builders with the same API, per backend


def test_every_backend_has_cases():
    assert set(backend_names()) == TESTED_BACKENDS, "add test cases (and a tiny model) for the new backend"


@pytest.fixture
def backend():
    return "onnxruntime"  # tests parametrized over backends override this


@pytest.fixture
def tiny(backend):
    return TINY[backend]


@pytest.fixture
def model(tmp_path, tiny):
    path = tmp_path / f"m{getattr(tiny, 'SUFFIX', '.onnx')}"
    info = tiny.make_mlp(path)
    return path, info


X = np.random.default_rng(0).standard_normal((7, 10)).astype(np.float32)

SEQUENCES = [
    ["a", None],
    ["a", "b", "a"],
    [{"a": 1.0, "b": 0.5}],
    [{"a": 0.3}, "b", {"b": 1.0, "c": -2.0, "a": 0.25}, None, "c"],
]


@pytest.mark.parametrize("backend,strategy", CASES)
@pytest.mark.parametrize("seq", SEQUENCES, ids=lambda s: "-".join(map(str, s)))
def test_switch_sequence_equals_fresh_merged_model(model, tiny, tmp_path, backend, strategy, seq):
    path, info = model
    adapters = {n: random_adapter(info, seed, name=n) for seed, n in enumerate("abc", start=1)}
    base = tiny.base_weights(path, info)
    with Runtime(path, backend=backend, strategy=strategy) as rt:
        assert rt.strategy == strategy
        for a in adapters.values():
            rt.load_adapter(a)
        for step in seq:
            rt.switch(step)
        rt.wait_settled(30)
        spec = {} if seq[-1] is None else ({seq[-1]: 1.0} if isinstance(seq[-1], str) else seq[-1])
        ref = merge_weights(base, [(adapters[n], w) for n, w in spec.items()])
        for k in ref:  # the weights themselves are bit-exact
            np.testing.assert_array_equal(rt.weights(k), ref[k])
        tiny.write_merged(path, info, ref, tmp_path / f"ref{path.suffix}")
        with Runtime(tmp_path / f"ref{path.suffix}", backend=backend, strategy=strategy, verify=False) as fresh:
            np.testing.assert_array_equal(rt.run(X)["logits"], fresh.run(X)["logits"])
        assert rt.active == spec


@pytest.mark.parametrize("backend,strategy", CASES)
def test_switch_back_to_base_is_bit_exact(model, tiny, backend, strategy):
    path, info = model
    base = tiny.base_weights(path, info)
    with Runtime(path, backend=backend, strategy=strategy) as rt:
        y0 = rt.run(X)["logits"]
        for seed in range(1, 4):
            rt.load_adapter(random_adapter(info, seed))
        for names in itertools.permutations(["a1", "a2", "a3"]):
            rt.switch({n: 0.7 for n in names})
            rt.switch(names[0])
        rt.switch(None)
        rt.wait_settled(30)
        for k, w in base.items():
            np.testing.assert_array_equal(rt.weights(k), w)
        np.testing.assert_array_equal(rt.run(X)["logits"], y0)


def _bad_adapters(info):
    good = random_adapter(info, 9, name="bad")
    t = "fc2.weight"
    d = good.tensors[t]

    def with_tensor(delta, **kw):
        tensors = dict(good.tensors)
        tensors[t] = delta
        return dict(name="bad", base_fingerprint=good.base_fingerprint, tensors=tensors, shapes=good.shapes, **kw)

    out_of_range = d.indices.copy()
    out_of_range[0, 0] = 2
    dup = d.indices.copy()
    dup[:, 1] = dup[:, 0]
    nan = d.values.copy()
    nan[0] = np.nan
    return {
        "wrong base": lambda: Adapter(**{**with_tensor(d), "base_fingerprint": "sha256:0000"}),
        "wrong shape": lambda: Adapter(**{**with_tensor(d), "shapes": {**good.shapes, t: (3, 20)}}),
        "unknown tensor": lambda: Adapter(
            "bad", good.base_fingerprint, {**good.tensors, "nope.weight": d}, {**good.shapes, "nope.weight": (2, 20)}
        ),
        "index out of range": lambda: Adapter(**with_tensor(SparseDelta(out_of_range, d.values))),
        "duplicate index": lambda: Adapter(**with_tensor(SparseDelta(dup, d.values))),
        "nan value": lambda: Adapter(**with_tensor(SparseDelta(d.indices, nan))),
        "wrong dtype": lambda: Adapter(**with_tensor(SparseDelta(d.indices, d.values.astype(np.float64)))),
    }


@pytest.mark.parametrize("backend,strategy", CASES)
def test_bad_adapter_is_refused_and_previous_state_kept(model, tmp_path, backend, strategy):
    path, info = model
    with Runtime(path, backend=backend, strategy=strategy) as rt:
        rt.load_adapter(random_adapter(info, 1, name="good"))
        rt.switch("good")
        rt.wait_settled(30)
        before = rt.run(X)["logits"]
        for what, make in _bad_adapters(info).items():
            with pytest.raises(AdapterMismatchError):
                rt.load_adapter(make())
            assert rt.active == {"good": 1.0}, what
            np.testing.assert_array_equal(rt.run(X)["logits"], before)
        # damaged files: refused with a typed error, nothing applied
        good_file = tmp_path / "g.safetensors"
        random_adapter(info, 2, name="g").save(good_file)
        data = good_file.read_bytes()
        damaged = {
            "truncated": data[: len(data) // 2],
            "empty": b"",
            "garbage header": b"\xff" * 8 + data[8:],
            "not json": data[:8] + b"x" * (len(data) - 8),
        }
        for what, blob in damaged.items():
            p = tmp_path / f"{what}.safetensors"
            p.write_bytes(blob)
            with pytest.raises(FormatError):
                rt.load_adapter(p)
            assert rt.active == {"good": 1.0}, what
        with pytest.raises(ConfigError):
            rt.switch("never-loaded")
        with pytest.raises(ConfigError):
            rt.switch({"good": float("nan")})
        assert rt.active == {"good": 1.0}
        np.testing.assert_array_equal(rt.run(X)["logits"], before)


def test_adapter_file_round_trip(model, tmp_path):
    _, info = model
    a = random_adapter(info, 3, name="rt")
    a.save(tmp_path / "a.safetensors")
    from edge.format.adapter import load_adapter

    b = load_adapter(tmp_path / "a.safetensors")
    assert b.name == "rt" and b.base_fingerprint == info.fingerprint and b.info == {"seed": 3}
    for k in a.tensors:
        np.testing.assert_array_equal(a.tensors[k].indices, b.tensors[k].indices)
        np.testing.assert_array_equal(a.tensors[k].values, b.tensors[k].values)


def test_wrong_base_error_names_both_fingerprints(model, tmp_path):
    path, info = model
    other = make_mlp(tmp_path / "other.onnx", seed=5, name="other")
    a = random_adapter(other, 1)
    with Runtime(path) as rt, pytest.raises(AdapterMismatchError) as e:
        rt.load_adapter(a)
    assert other.fingerprint in str(e.value) and info.fingerprint in str(e.value)


def test_tampered_model_is_refused(model, tmp_path):
    import onnx
    from onnx import numpy_helper

    path, _ = model
    m = onnx.load(str(path))
    w = numpy_helper.to_array(m.graph.initializer[0]).copy()
    w.flat[0] += 1
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, m.graph.initializer[0].name))
    onnx.save(m, str(tmp_path / "t.onnx"))
    with pytest.raises(FormatError, match="fingerprint"):
        Runtime(tmp_path / "t.onnx")


def test_unknown_strategy_and_provider(model):
    path, _ = model
    with pytest.raises(ConfigError, match="allowed"):
        Runtime(path, strategy="telepathy")
    with pytest.raises(EdgeError, match="not available"):
        Runtime(path, providers=["NoSuchExecutionProvider"])


def test_default_strategy_is_reported(model):
    path, _ = model
    with Runtime(path) as rt:
        assert rt.strategy == get_backend("onnxruntime").DEFAULT_STRATEGY
        assert rt.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize("backend", sorted(TESTED_BACKENDS))
def test_close_waits_for_the_background_rebuild(model, tiny, backend):
    """A build cut off at interpreter exit aborts the process: close() (also run at exit) joins the thread."""
    path, info = model
    rt = Runtime(path, backend=backend, strategy="hybrid")
    rt.load_adapter(random_adapter(info, seed=1, name="a"))
    rt.switch("a")  # starts a background build
    thread = rt.backend._rebuilder
    assert thread is not None and thread.is_alive()
    rt.close()
    assert not thread.is_alive()


# -- careless callers: run() never changes weights, fusion never writes Inf, closed runtimes refuse ----------------
def _snapshot(rt, info):
    return {p: rt.weights(p) for p in info.tensors}


@pytest.mark.parametrize("backend,strategy", CASES)
def test_run_cannot_change_weights(model, backend, strategy):
    """Under bound/hybrid the weights are graph inputs: a feed naming one must be refused, not bound."""
    path, info = model
    inp = info.inputs[0]
    with Runtime(path, backend=backend, strategy=strategy) as rt:
        base = _snapshot(rt, info)
        rt.load_adapter(random_adapter(info, 1, name="a"))
        rt.switch("a")  # hybrid: right after a switch, the bound session (weights as inputs) serves
        served = _snapshot(rt, info)
        ref = rt.run({inp: X})
        for param, t in info.tensors.items():
            shape = rt.backend.read(t.initializer).shape
            for name in {param, t.initializer}:
                with pytest.raises(ConfigError, match="weights or adapter slots"):
                    rt.run({inp: X, name: np.zeros(shape, np.float32)})
        with pytest.raises(ConfigError, match="not inputs of the model"):
            rt.run({inp: X, "no-such-input": X})
        out = rt.run({inp: X})
        for k in ref:  # LiteRT hybrid may have swapped built-in kernels for XNNPACK in between: other rounding
            np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-6)
        assert all(np.array_equal(_snapshot(rt, info)[p], served[p]) for p in served)  # the weights: bit-exact
        rt.switch(None)
        assert all(np.array_equal(_snapshot(rt, info)[p], base[p]) for p in base)


@pytest.mark.parametrize("backend", sorted(TESTED_BACKENDS))
def test_run_cannot_feed_adapter_slots(tmp_path, tiny, backend):
    path = tmp_path / f"b{getattr(tiny, 'SUFFIX', '.onnx')}"
    info = tiny.make_branch_mlp(path)
    slots = [k for k, t in info.tensors.items() if t.slot]
    assert slots
    with Runtime(path, backend=backend) as rt:
        ref = rt.run(X)
        for s in slots:
            with pytest.raises(ConfigError, match="weights or adapter slots"):
                rt.run({info.inputs[0]: X, s: np.ones(info.tensors[s].shape, np.float32)})
        assert all(np.array_equal(rt.run(X)[k], ref[k]) for k in ref)


BAD_FEEDS = {
    "float64": (lambda x: x.astype(np.float64), "must be float32"),
    "big-endian": (lambda x: x.astype(">f4"), "byte order"),
    "rank 1": (lambda x: x[0], "dimensions"),
    "rank 3": (lambda x: x[None], "dimensions"),
    "wrong width": (lambda x: np.zeros((7, 11), np.float32), "shape"),
    "empty batch": (lambda x: x[:0], "empty"),
    "object array": (lambda x: np.array([None] * 7, dtype=object), "must be float32"),
    "string": (lambda x: "pixels", "must be float32"),
}


@pytest.mark.parametrize("backend", sorted(TESTED_BACKENDS))
@pytest.mark.parametrize("case", sorted(BAD_FEEDS))
def test_bad_feeds_are_typed_errors(model, backend, case):
    path, info = model
    make, match = BAD_FEEDS[case]
    with Runtime(path, backend=backend) as rt:
        with pytest.raises(ConfigError, match=match):
            rt.run({info.inputs[0]: make(X)})
        with pytest.raises(ConfigError, match="dict"):
            rt.run([X])


@pytest.mark.parametrize("backend", sorted(TESTED_BACKENDS))
def test_non_contiguous_feed_gives_the_contiguous_result(model, backend):
    path, _ = model
    wide = np.repeat(X, 2, axis=1)[:, ::2]
    assert not wide.flags.c_contiguous and np.array_equal(wide, X)
    with Runtime(path, backend=backend) as rt:
        a, b = rt.run(wide), rt.run(X)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def _overflowing(info, name, value=3e38):
    t = "fc1.weight"
    idx = np.array([[0, 1], [0, 1]], np.int32)
    return Adapter(
        name, info.fingerprint, {t: SparseDelta(idx, np.full(2, value, np.float32))}, {t: info.tensors[t].shape}
    )


@pytest.mark.parametrize("backend", sorted(TESTED_BACKENDS))
def test_fusion_that_overflows_is_refused_and_changes_nothing(model, backend):
    path, info = model
    with Runtime(path, backend=backend) as rt:
        rt.load_adapter(random_adapter(info, 1, name="a"))
        rt.load_adapter(random_adapter(info, 2, name="b"))
        rt.load_adapter(_overflowing(info, "big1"))
        rt.load_adapter(_overflowing(info, "big2"))
        rt.switch("a")
        assert rt.wait_settled(30)  # ref from the settled engine: a hybrid's two kernel sets need not agree bit-exact
        before, ref = _snapshot(rt, info), rt.run(X)
        for spec in ({"a": 1e300, "b": 1.0}, {"big1": 1.0, "big2": 1.0}, {"a": 3e38, "b": 3e38}):
            with pytest.raises(ConfigError, match="non-finite"):
                rt.switch(spec)
            assert rt.active == {"a": 1.0}
            assert all(np.array_equal(_snapshot(rt, info)[p], before[p]) for p in before)
            assert all(np.array_equal(rt.run(X)[k], ref[k]) for k in ref)


def test_loading_over_the_active_adapter_name_is_refused(model):
    path, info = model
    with Runtime(path) as rt:
        rt.load_adapter(random_adapter(info, 1, name="a"))
        rt.switch("a")
        before = _snapshot(rt, info)
        with pytest.raises(ConfigError, match="is active"):
            rt.load_adapter(random_adapter(info, 2, name="a"))
        assert rt.active == {"a": 1.0}
        assert all(np.array_equal(_snapshot(rt, info)[p], before[p]) for p in before)
        rt.switch(None)
        rt.load_adapter(random_adapter(info, 2, name="a"))  # not active: replacing it is fine
        rt.switch("a")
        assert not all(np.array_equal(_snapshot(rt, info)[p], before[p]) for p in before)


@pytest.mark.parametrize("backend", sorted(TESTED_BACKENDS))
def test_closed_runtime_refuses_every_call(model, backend):
    from edge.runtime import RuntimeClosedError

    path, info = model
    rt = Runtime(path, backend=backend)
    rt.load_adapter(random_adapter(info, 1, name="a"))
    rt.close()
    rt.close()  # twice is fine
    for call in (
        lambda: rt.run(X),
        lambda: rt.switch("a"),
        lambda: rt.switch(None),
        lambda: rt.load_adapter(random_adapter(info, 2, name="b")),
    ):
        with pytest.raises(RuntimeClosedError, match="closed"):
            call()
