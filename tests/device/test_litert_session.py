"""The LiteRT backend's per-call path (:mod:`runtimes.litert_session`): the fast path laid out at build and the
checked path behind it give the same outputs, and every feed the fast path does not take is converted exactly or
refused with a typed error, whether the feeds come through ``Runtime.run`` or straight to the backend."""

from __future__ import annotations

from pathlib import Path

import _tiny_tflite
import numpy as np
import pytest

from edge.errors import ConfigError, EdgeError
from edge.format.adapter import Adapter, DenseDelta
from edge.runtime import Runtime, merge_weights
from runtimes import get_backend
from runtimes.base import BackendOptions, WeightWrite
from runtimes.litert import interpreter_module
from runtimes.litert_session import Session

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
STRATEGIES = get_backend("tflite").STRATEGIES
RNG = np.random.default_rng(7)
X = RNG.standard_normal((5, 10)).astype(np.float32)


def _reference(path: Path, x: np.ndarray) -> np.ndarray:
    """Row by row on a plain interpreter with its public calls (batch 1, the file's shape)."""
    lib, _ = interpreter_module()
    it = lib.Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    rows = []
    for row in x:
        it.set_tensor(i, row[None])
        it.invoke()
        rows.append(it.get_tensor(o)[0])
    return np.stack(rows)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fast_and_checked_paths_agree_and_convert_only_what_is_exact(tmp_path, strategy):
    path = tmp_path / "m.tflite"
    _tiny_tflite.make_mlp(path)
    want = _reference(path, X)
    b = get_backend("tflite")(path, BackendOptions(strategy=strategy, threads=1))
    try:
        run = lambda x, outputs=None: b.run({"x": x}, outputs)["logits"]  # noqa: E731
        for _ in range(2):  # batch 1 (the allocated shape: fast path), 5 (resized), 1 again (resized back)
            np.testing.assert_allclose(run(X[:1]), want[:1], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(run(X), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(run(X[:1].astype(">f4")), run(X[:1]))  # other byte order: same values
        wide = np.zeros((1, 20), np.float32)
        wide[:, ::2] = X[:1]
        np.testing.assert_array_equal(run(wide[:, ::2]), run(X[:1]))  # strided view: the same values
        assert list(b.run({"x": X[:1]}, ("logits",))) == ["logits"]
        for bad, words in [
            (X[:1].astype(np.float64), "must be float32, got float64"),
            (X[:1].tolist(), "must be float32, got float64"),  # Python floats: float64, never silently narrowed
            (X[:1].astype(np.int32), "must be float32, got int32"),
            (X[0], "must have 2 dimensions"),
            (np.zeros((1, 2, 10), np.float32), "must have 2 dimensions"),
            (np.zeros((1, 11), np.float32), r"takes \[\?, 10\]"),  # only the open batch dimension may change
            (np.zeros((0, 10), np.float32), r"takes \[\?, 10\] \(\? any size above 0\)"),
        ]:
            with pytest.raises(ConfigError, match=words):
                run(bad)
        with pytest.raises(ConfigError, match="missing model input"):
            b.run({}, None)
        with pytest.raises(ConfigError, match=r"unknown model input\(s\) \['fc1.weight'\]"):
            b.run({"x": X[:1], "fc1.weight": X[:1]}, None)
        with pytest.raises(ConfigError, match="not an output"):
            b.run({"x": X[:1]}, ("nope",))
        with pytest.raises(ConfigError, match="feeds must be a dict"):
            b.run([X[:1]], None)
        np.testing.assert_allclose(run(X[:1]), want[:1], rtol=1e-5, atol=1e-6)  # refusals left it consistent
    finally:
        b.close()


def test_public_interpreter_calls_give_what_the_native_wrapper_gives(tmp_path):
    """An interpreter without the native wrapper (another LiteRT build) runs through its public calls."""
    path = tmp_path / "m.tflite"
    _tiny_tflite.make_mlp(path)
    lib, _ = interpreter_module()

    class Public:  # only the documented Interpreter API
        def __init__(self) -> None:
            self._it = lib.Interpreter(model_path=str(path), num_threads=1)
            self._it.allocate_tensors()
            for name in ("get_input_details", "get_output_details", "set_tensor", "invoke", "get_tensor"):
                setattr(self, name, getattr(self._it, name))
            self.resize_tensor_input, self.allocate_tensors = self._it.resize_tensor_input, self._it.allocate_tensors

    it = lib.Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    native, public = Session(it, ["x"], {}, ["logits"]), Session(Public(), ["x"], {}, ["logits"])
    assert native.direct and not public.direct
    for x in (X[:1], X, X[:1], X[:1].astype(">f4")):
        np.testing.assert_array_equal(native.run({"x": x}, None, 0)["logits"], public.run({"x": x}, None, 0)["logits"])
    with pytest.raises(ConfigError, match="float64"):
        public.run({"x": X.astype(np.float64)}, None, 0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_slots_are_fed_again_after_a_write_and_after_the_buffers_move(strategy):
    """Slots are fed when a write may have changed them or a resize moved the input buffers, not on every run."""
    path = GOLDEN / "branch-mlp-v1.tflite"
    with Runtime(path, backend="tflite", strategy=strategy, threads=1) as rt:
        info = rt.info
        slots = sorted(k for k, t in info.tensors.items() if t.slot)
        dense = {k: DenseDelta(RNG.standard_normal(info.tensors[k].shape).astype(np.float32) * 0.3) for k in slots}
        rt.load_adapter(Adapter("d", info.fingerprint, dense, {k: info.tensors[k].shape for k in slots}, "adapter"))
        base = {k: rt.weights(k) for k in info.tensors}
        adapted = merge_weights(base, [(rt._adapters["d"].adapter, 1.0)])
        for which, weights in [(None, {}), ("d", adapted), (None, {}), ("d", adapted)]:
            rt.switch(which)
            for x in (X[:1], X, X[:3], X[:1]):  # the file's batch, then others (resized or chunked), then back
                want = _tiny_tflite.reference_branch(path, info, weights, x)
                np.testing.assert_allclose(rt.run(x)["logits"], want, rtol=1e-5, atol=1e-5)


def test_a_slot_only_write_reaches_every_interpreter(tmp_path):
    """hybrid: the XNNPACK and built-in interpreters each keep their own slot copy; a write reaches both."""
    path = GOLDEN / "branch-mlp-v1.tflite"
    b = get_backend("tflite")(path, BackendOptions(strategy="hybrid", threads=1))
    try:
        info = b.info
        slots = [t.initializer for t in info.tensors.values() if t.slot]
        y0 = b.run({"x": X[:1]})["logits"]
        values = {s: RNG.standard_normal(b.read(s).size).astype(np.float32) for s in slots}
        b.write(b.prepare([WeightWrite(s, None, v) for s, v in values.items()]))
        assert b.wait_settled(0), "a slot write must not start a rebuild"
        y1 = b.run({"x": X[:1]})["logits"]
        assert np.abs(y1 - y0).max() > 1e-3
        weights = {k: v.reshape(b.read(k).shape) for k, v in values.items()}
        want = _tiny_tflite.reference_branch(path, info, weights, X[:1])
        np.testing.assert_allclose(y1, want, rtol=1e-5, atol=1e-5)
        builtin = b._builtin.run({"x": X[:1]}, None, b._slot_version)["logits"]  # the other interpreter, same slots
        np.testing.assert_allclose(builtin, y1, rtol=1e-5, atol=1e-5)
    finally:
        b.close()


def test_every_refusal_is_an_edge_error(tmp_path):
    path = tmp_path / "m.tflite"
    _tiny_tflite.make_mlp(path)
    with Runtime(path, backend="tflite", threads=1) as rt:
        for feeds in ({"x": np.full((1, 10), "a")}, {"x": np.zeros((0, 10), np.float32)}, {"x": object()}):
            with pytest.raises(EdgeError):
                rt.run(feeds)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_feeds_a_runtime_checked_take_the_fast_path(tmp_path, monkeypatch, strategy):
    """What Runtime.run hands the backend (the model's inputs at the allocated shapes) never reaches the checked path,
    so a call costs the interpreter's own calls and little else (figures: lab.bench_litert --overhead)."""
    path = tmp_path / "m.tflite"
    _tiny_tflite.make_mlp(path)
    with Runtime(path, backend="tflite", strategy=strategy, threads=1) as rt:
        rt.run(X[:1])  # the allocated shape: fast
        rt.wait_settled(30)

        def refuse(self, feeds, fetch, slots):
            raise AssertionError(f"checked path taken for {[(k, v.dtype, v.shape) for k, v in feeds.items()]}")

        monkeypatch.setattr(Session, "_checked", refuse)
        for x in (X[:1], np.asfortranarray(X[:1]), X[1:2]):
            np.testing.assert_allclose(rt.run(x)["logits"], _reference(path, x), rtol=1e-5, atol=1e-6)
        monkeypatch.undo()
        rt.run(X)  # another batch: checked, resized; from then on that shape is the fast one
        monkeypatch.setattr(Session, "_checked", refuse)
        np.testing.assert_allclose(rt.run(X)["logits"], _reference(path, X), rtol=1e-5, atol=1e-6)


def test_unchecked_feeds_meet_the_runtime_feed_check_only_off_the_fast_path(tmp_path):
    """``run(feeds, outputs, check)``: what the fast path takes never reaches ``check``; everything else is
    checked by it first (the runtime's refusals, word for word), then converted, resized or chunked."""
    path = tmp_path / "m.tflite"
    _tiny_tflite.make_mlp(path)
    with Runtime(path, backend="tflite", strategy="rebuild", threads=1) as rt:
        seen = []

        def check(feeds):
            seen.append(sorted(feeds))
            return rt._check_feeds(feeds)

        b = rt.backend
        assert b.CHECKS_FEEDS
        y = b.run({"x": X[:1]}, None, check)["logits"]
        assert seen == [] and np.array_equal(y, rt.run(X[:1])["logits"])
        np.testing.assert_array_equal(b.run({"x": X}, None, check)["logits"], rt.run(X)["logits"])  # resized
        assert seen == [["x"]]
        for feeds, words in [
            ({"x": X[:1], "fc1.weight": X[:1]}, "weights or adapter slots"),
            ({"x": X[:1].astype(">f4")}, "byte order"),
            ({"x": X[:1].astype(np.float64)}, "must be float32"),
            ({"x": np.zeros((1, 11), np.float32)}, "the model takes"),
        ]:
            with pytest.raises(ConfigError, match=words):
                b.run(feeds, None, check)
            with pytest.raises(ConfigError, match=words):
                rt.run(feeds)
