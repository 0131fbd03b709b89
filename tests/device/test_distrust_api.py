"""A caller of the Python API who is careless or hostile: outputs that are weights, lying names and arrays, model
descriptions replaced, adapters that skip the signature policy, and a Ctrl-C landing in the middle of a switch.

The rule under test: a caller never changes weights except through an adapter the policy admits, and no call leaves
the runtime half-switched. Models are built here (a few KB, onnx and LiteRT's schema only, no torch).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from edge.errors import ConfigError, SignatureError
from edge.format.adapter import Adapter
from edge.format.feeds import FeedChecker, InputSpec
from edge.format.modelinfo import ModelInfo, ReadOnlyDict, TensorInfo
from edge.format.signing import generate_key
from edge.fusion import merge_weights, normalise
from edge.runtime import Runtime
from runtimes import get_backend

ORT = get_backend("onnxruntime").STRATEGIES
#: findings whose fix is in edge/runtime.py or edge/fusion.py, which another helper held this session: these tests
#: fail until the change in helper D's report is applied (then drop the marker; strict, so a pass says so)


def _onnx_aliases(path: Path) -> Path:
    """x[B,4], ids[N] -> logits[B,3] = x @ (fc.weight + fc.slot); g = emb.weight[ids]; and outputs that are the
    weights themselves: through Identity, Transpose and Reshape, a slot through Identity, and a table and a slot
    listed as graph outputs directly (the table is read only by Gather, so the prepacked session feeds it)."""
    import _tiny

    rng = np.random.default_rng(0)
    stored = {
        "fc.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "fc.slot": np.zeros((4, 3), np.float32),
        "emb.weight": rng.standard_normal((5, 4)).astype(np.float32),
        "shape": np.array([12], np.int64),
    }
    nodes = [
        helper.make_node("Add", ["fc.weight", "fc.slot"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["logits"]),
        helper.make_node("Identity", ["fc.weight"], ["w_id"]),
        helper.make_node("Transpose", ["fc.weight"], ["w_t"], perm=[1, 0]),
        helper.make_node("Reshape", ["fc.weight", "shape"], ["w_r"]),
        helper.make_node("Identity", ["fc.slot"], ["s_id"]),
        helper.make_node("Gather", ["emb.weight", "ids"], ["g"]),
    ]
    tensors = {
        "fc.weight": TensorInfo("fc.weight", (3, 4), transposed=True),
        "fc.slot": TensorInfo("fc.slot", (4, 3), slot=True),
        "emb.weight": TensorInfo("emb.weight", (5, 4)),
    }
    x, ids = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("x", x, ["b", 4]), helper.make_tensor_value_info("ids", ids, ["n"])]
    shapes = {"logits": ["b", 3], "w_id": [4, 3], "w_t": [3, 4], "w_r": [12], "s_id": [4, 3], "g": ["n", 4]}
    shapes |= {"emb.weight": [5, 4], "fc.slot": [4, 3]}
    outputs = [helper.make_tensor_value_info(k, x, s) for k, s in shapes.items()]
    _tiny.write_model(path, "aliases", nodes, inputs, outputs, stored, tensors)
    return path


def _tflite_aliases(path: Path) -> Path:
    """x[B,4] -> logits = FC(x, fc1.weight), d1 = FC(x, slot); the weight and the slot are subgraph outputs too."""
    from _tiny_tflite import _FC, _Graph

    w = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    g = _Graph()
    x, slot = g.tensor("x", (1, 4), batch=True), g.tensor("branch.down.weight", (2, 4))
    y, d1 = g.tensor("logits", (1, 6), batch=True), g.tensor("d1", (1, 2), batch=True)
    wt = g.tensor("fc1.weight", w.shape, w)
    g.op(_FC, [x, wt, -1], [y])
    g.op(_FC, [x, slot, -1], [d1])
    g.sg.inputs, g.sg.outputs = [x, slot], [y, d1, wt, slot]
    tensors = {
        "fc1.weight": TensorInfo("fc1.weight", (6, 4)),
        "branch.down.weight": TensorInfo("branch.down.weight", (2, 4), slot=True),
    }
    outs = ("logits", "d1", "fc1.weight", "branch.down.weight")
    g.save(path, ModelInfo(name="aliases", fingerprint="", tensors=tensors, inputs=("x",), outputs=outs))
    return path


@pytest.fixture(scope="module")
def aliases(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("aliases")
    return {"onnxruntime": _onnx_aliases(d / "aliases.onnx"), "tflite": _tflite_aliases(d / "aliases.tflite")}


def _feed(backend: str) -> dict[str, np.ndarray]:
    """A batch of as many rows as the table (ONNX: emb.weight [5, 4]) or weight (LiteRT: fc1.weight [6, 4]) has."""
    rows = 5 if backend == "onnxruntime" else 6
    x = np.linspace(-1, 1, rows * 4, dtype=np.float32).reshape(rows, 4)
    return {"x": x, "ids": np.array([0, 3, 4])} if backend == "onnxruntime" else {"x": x}


def _stored(rt: Runtime) -> list[np.ndarray]:
    return [rt.backend.read(t.initializer) for t in rt.info.tensors.values()]


# -- 1. what run hands back ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backend,strategy", [(b, s) for b in ("onnxruntime", "tflite") for s in get_backend(b).STRATEGIES]
)
def test_outputs_that_are_weights_are_the_callers_own_copies(aliases, backend, strategy):
    """An output computed as a weight (Identity, Transpose, Reshape of it, or the weight or slot listed as an output
    directly) is a fresh array: no view of the arena, and writing into it changes no later output and no weight."""
    with Runtime(aliases[backend], backend=backend, strategy=strategy) as rt:
        feed = _feed(backend)
        first = {k: v.copy() for k, v in rt.run(feed).items()}
        weights = {k: rt.weights(k) for k in rt.info.tensors}
        assert set(first) == set(rt.backend.output_names) and len(first) >= 4
        for _ in range(2):  # the second run comes from each strategy's steady session
            out = rt.run(feed)
            for name, v in out.items():
                assert not any(np.shares_memory(v, s) for s in _stored(rt)), f"{name} is a view of the weights"
                v[...] = np.nan  # the caller's own array: writable, and nobody else's
        again = rt.run(feed)
        for name, v in first.items():
            np.testing.assert_array_equal(again[name], v, err_msg=name)
        for k, w in weights.items():
            np.testing.assert_array_equal(rt.weights(k), w, err_msg=k)


# -- 2. names and arrays that lie ------------------------------------------------------------------------------------
class _Posing(str):
    """A name whose characters are a weight's but which hashes and compares as the input ``x``: what a dict lookup
    sees is ``x``, what onnxruntime binds by (the characters) is the weight."""

    def __hash__(self) -> int:
        return hash("x")

    def __eq__(self, other) -> bool:
        return isinstance(other, str) and str.__eq__("x", other)


def test_the_feed_checker_hands_on_only_the_models_own_names():
    """Before: once a plain feed had passed, a dict keyed by a ``str`` subclass posing as ``x`` passed the remembered
    signature and was handed on as given, its key naming a weight."""
    spec = {"x": InputSpec("x", np.dtype(np.float32), ("batch", 4))}
    check = FeedChecker(spec, frozenset({"emb.weight"}))
    x = np.ones((5, 4), np.float32)
    for _ in range(2):  # remembered after the first
        assert list(check({"x": x})) == ["x"]
    for _ in range(2):
        out = check({_Posing("emb.weight"): x})
        assert [(type(k), str.__str__(k)) for k in out] == [(str, "x")], out


@pytest.mark.parametrize(
    "backend,strategy",
    [*(("onnxruntime", s) for s in ORT), ("tflite", "auto")],
)
def test_a_name_posing_as_an_input_cannot_rebind_a_weight(aliases, backend, strategy):
    """Before (``bound``): the weight ``emb.weight`` was bound to the caller's array from then on, so every later run
    read the caller's values (which it could keep changing), while ``weights()`` still showed the file's; ``hybrid``
    and ``rebuild`` raised onnxruntime's own ``Fail`` (two feeds named ``emb.weight``, none ``x``). Runtime.run
    inlines the checker's first step, so it needs the same plain-``str`` test."""
    with Runtime(aliases[backend], backend=backend, strategy=strategy) as rt:
        feed = _feed(backend)
        ref = rt.run(feed)
        table = "emb.weight" if backend == "onnxruntime" else "fc1.weight"
        mine = np.full(rt.backend.read(table).shape, 42.0, np.float32)  # shaped as the x the last run had
        for _ in range(3):
            try:
                rt.run({**{k: v for k, v in feed.items() if k != "x"}, _Posing(table): mine})
            except ConfigError:
                pass  # refused is fine; taken as "x" is fine; reaching the weight is not
        assert rt.wait_settled(30)
        again = rt.run(feed)
        for name, v in ref.items():
            np.testing.assert_array_equal(again[name], v, err_msg=name)


class _Sub(np.ndarray):
    pass


class _ArrayLike:
    def __array__(self, dtype=None, copy=None):
        return np.ones((2, 10), np.float32)


class _LyingDict(dict):
    def __getitem__(self, key):
        return np.ones((2, 10), np.float32) if key == "x" else super().__getitem__(key)


ODD_FEEDS = {
    "ndarray subclass": lambda x: {"x": x.view(_Sub)},
    "__array__": lambda x: {"x": _ArrayLike()},
    "memoryview": lambda x: {"x": memoryview(x)},
    "0-d array": lambda x: {"x": np.array(1.0, np.float32)},
    "numpy scalar": lambda x: {"x": np.float32(1)},
    "nested lists": lambda x: {"x": x.tolist()},
    "bytes name": lambda x: {b"x": x},
    "int name": lambda x: {1: x},
    "empty lying dict": lambda x: _LyingDict(),
    "lying dict": lambda x: _LyingDict({"x": x}),
    "object array": lambda x: {"x": np.full(x.shape, object())},
    "big-endian": lambda x: {"x": x.astype(">f4")},
    "transposed": lambda x: {"x": np.ascontiguousarray(x.T).T},
    "empty batch": lambda x: {"x": x[:0]},
    "float64": lambda x: {"x": x.astype(np.float64)},
    "None": lambda x: None,
}


@pytest.mark.parametrize("backend,strategy", [("onnxruntime", "bound"), ("onnxruntime", "hybrid"), ("tflite", "auto")])
def test_odd_feeds_run_or_raise_a_typed_error_and_change_no_weight(mlp, backend, strategy):
    """Array-likes, subclasses, 0-d arrays, names that are not ``str``, a dict whose ``__getitem__`` answers names it
    does not hold: each runs as the input it is checked as, or is refused with an ``EdgeError``; never a raw
    engine error, never a changed weight."""
    from edge.errors import EdgeError

    with Runtime(mlp[backend]["model"], backend=backend, strategy=strategy) as rt:
        x = np.linspace(-1, 1, 20, dtype=np.float32).reshape(2, 10)
        ref, weights = rt.run({"x": x})["logits"], {k: rt.weights(k) for k in rt.info.tensors}
        outcomes = {}
        for what, make in ODD_FEEDS.items():
            try:
                out = rt.run(make(x))
                outcomes[what] = type(out["logits"]).__name__
            except EdgeError as e:
                outcomes[what] = type(e).__name__
        assert set(outcomes.values()) <= {"ndarray", "ConfigError"}, outcomes
        assert outcomes["bytes name"] == outcomes["big-endian"] == outcomes["0-d array"] == "ConfigError", outcomes
        np.testing.assert_array_equal(rt.run({"x": x})["logits"], ref)
        for k, w in weights.items():
            np.testing.assert_array_equal(rt.weights(k), w, err_msg=k)


@pytest.fixture(scope="module")
def head_model(tmp_path_factory) -> Path:
    import _tiny

    from edge.route.taps import Head, tap_model

    d = tmp_path_factory.mktemp("head")
    _tiny.make_mlp(d / "m.onnx", seed=3, sizes=(10, 32, 4))
    return Path(tap_model(d / "m.onnx", d / "m.head.onnx", ["h2"], head=Head(domains=3, classes=4)).path)


class _ShapeLiar(np.ndarray):
    """An array whose ``shape`` says what the checks want to hear."""

    claimed: tuple = ()

    @property
    def shape(self):
        return self.claimed


class _TwoFaced:
    """An array-like whose ``__array__`` answers the right shape once, then a longer array."""

    def __init__(self, shape: tuple, longer: np.ndarray) -> None:
        self.shape_, self.longer, self.calls = shape, longer, 0

    def __array__(self, dtype=None, copy=None):
        self.calls += 1
        return np.zeros(self.shape_, np.float32) if self.calls == 1 else self.longer


@pytest.mark.parametrize("strategy", ["bound", "hybrid"])
@pytest.mark.parametrize("liar", ["shape property", "__array__ twice"])
@pytest.mark.parametrize("door", ["set_head", "switch"])
def test_a_head_value_that_lies_about_its_shape_writes_nothing(head_model, strategy, liar, door):
    """Before: the shape was checked on what the object said, then its copy written whole, at whatever length: a
    longer one ran past the head into the weights after it in the arena (here ``fc1.weight``): weights changed with
    no adapter and no signature. Now the copy's own shape is checked (``edge.heads``)."""
    with Runtime(head_model, strategy=strategy) as rt:
        x = {"x": np.linspace(-1, 1, 20, dtype=np.float32).reshape(2, 10)}
        before, weights = rt.run(x), {k: rt.weights(k) for k in rt.info.tensors}
        offset = rt.backend._offset  # the head laid out right before a weight: the one a longer write reaches
        head = max(rt.heads, key=lambda h: offset[rt.info.tensors[h].initializer])
        shape = tuple(rt.info.tensors[head].shape)
        longer = np.full(int(np.prod(shape)) + 64, 7.0, np.float32)
        if liar == "shape property":
            value = longer.view(_ShapeLiar)
            value.claimed = shape
        else:
            value = _TwoFaced(shape, longer)
        with pytest.raises(ConfigError, match="has shape"):
            rt.set_head({head: value}) if door == "set_head" else rt.switch(None, head={head: value})
        assert rt.wait_settled(30)
        for k, w in weights.items():
            np.testing.assert_array_equal(rt.weights(k), w, err_msg=k)
        for k, v in before.items():
            np.testing.assert_array_equal(rt.run(x)[k], v, err_msg=k)


def test_the_model_description_cannot_be_replaced_to_make_a_weight_a_head(head_model):
    """Before: ``rt.info`` was a plain attribute (its ``tensors`` read-only, but the whole description could be
    replaced): with a copy marking ``fc2.weight`` a head, ``set_head`` overwrote that weight."""
    with Runtime(head_model) as rt:
        x = {"x": np.ones((1, 10), np.float32)}
        before = rt.run(x)["logits"]
        t = rt.info.tensors["fc2.weight"]
        forged = replace(rt.info, tensors=ReadOnlyDict({**rt.info.tensors, "fc2.weight": replace(t, head=True)}))
        with pytest.raises(AttributeError):
            rt.info = forged
        with pytest.raises(ConfigError, match="not a detector-head tensor"):
            rt.set_head({"fc2.weight": np.zeros(t.shape, np.float32)})
        assert rt.wait_settled(30)
        np.testing.assert_array_equal(rt.run(x)["logits"], before)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> dict:
    """The tiny MLP for both engines (same weights) and two random SHiRA adapters of it, files per engine."""
    import _tiny
    import _tiny_tflite

    d = tmp_path_factory.mktemp("mlp")
    info = _tiny.make_mlp(d / "m.onnx", seed=3, sizes=(10, 32, 4))
    tinfo = _tiny_tflite.make_mlp(d / "m.tflite", seed=3, sizes=(10, 32, 4))
    out = {"onnxruntime": {"model": d / "m.onnx"}, "tflite": {"model": d / "m.tflite"}, "info": info}
    for i, n in enumerate(("a", "b")):
        a = _tiny.random_adapter(info, i, density=0.3 + 0.2 * i, name=n)
        out["onnxruntime"][n] = a.save(d / f"{n}.safetensors")
        out["tflite"][n] = replace(a, base_fingerprint=tinfo.fingerprint).save(d / f"{n}.tflite.safetensors")
    return out


@pytest.mark.parametrize("weight", [10**400, -(10**5000), "fraction"], ids=["1e400", "-1e5000", "fraction"])
def test_a_weight_too_large_for_a_float_is_a_config_error(mlp, weight):
    """Before: ``float(10**400)`` raised a bare OverflowError out of ``switch`` (and the repr of ``10**5000`` a
    ValueError): an integer weight is a real number, but not a finite float."""
    from fractions import Fraction

    weight = Fraction(10**400, 3) if weight == "fraction" else weight
    with Runtime(mlp["onnxruntime"]["model"]) as rt:
        rt.load_adapter(mlp["onnxruntime"]["a"])
        rt.switch("a")
        with pytest.raises(ConfigError, match="finite"):
            rt.switch({"a": weight})
        assert rt.active == {"a": 1.0}


# -- 3. the signature policy has one door -----------------------------------------------------------------------------
def test_no_adapter_object_reaches_a_runtime_that_requires_signatures(mlp, tmp_path):
    """An ``Adapter``, a subclass of it, and an adapter the device trainer grows here are all refused: only a file
    signed by a trusted key loads (``edge.learn`` hands back objects, so growth under a policy goes through a file
    the owner signs)."""
    from edge.format.adapter import load_adapter as read_adapter
    from edge.learn.device_trainer import DeviceTrainer
    from edge.learn.space import Arch

    class Sub(Adapter):
        pass

    path = mlp["onnxruntime"]["model"]
    plain = read_adapter(mlp["onnxruntime"]["a"])
    sub = Sub(**{f: getattr(plain, f) for f in plain.__dataclass_fields__})
    x = np.random.default_rng(0).standard_normal((32, 10)).astype(np.float32)
    grown = DeviceTrainer(path, epochs=2, seed=0).train(Arch("shira", 0.3, "tail"), x, np.arange(32) % 4, "grown")
    with Runtime(path, trusted_keys=[generate_key(tmp_path / "k.pem")]) as rt:
        before = {k: rt.weights(k) for k in rt.info.tensors}
        for adapter in (plain, sub, grown):
            with pytest.raises(SignatureError, match="in-memory"):
                rt.load_adapter(adapter)
        with pytest.raises(SignatureError, match="unsigned"):
            rt.load_adapter(grown.save(tmp_path / "grown.safetensors"))
        assert rt.adapters == [] and rt.active == {}
        for k, w in before.items():
            np.testing.assert_array_equal(rt.weights(k), w)


# -- 4. a Ctrl-C in the middle of a switch ---------------------------------------------------------------------------
def _interrupt_at(k: int, call) -> int:
    """Run ``call`` with a KeyboardInterrupt raised at its ``k``-th interruptible point inside ``Runtime.switch`` and
    the backend's ``write``: where CPython (3.10+) delivers a signal, after each call returns (profile events; not out
    of a ``__del__``, where an exception is printed and dropped) and at each pass of the arena write's loop (line
    events). Returns the points seen: ``k`` when it was raised; ``k=0`` counts them all."""
    import inspect

    import runtimes.base as rb

    lines, start = inspect.getsourcelines(rb.ArenaBackend.write)
    loop = {start + i for i, line in enumerate(lines) if "arena[pos] = val" in line}
    assert loop, "the arena write's loop moved: point the test at it again"
    seen = [0]

    def point() -> None:
        seen[0] += 1
        if seen[0] == k:
            sys.setprofile(None)
            sys.settrace(None)
            raise KeyboardInterrupt

    def watched(frame) -> bool:  # Runtime.switch, or a backend's write
        code = frame.f_code if frame is not None else None
        return (
            code is not None
            and code.co_name in ("switch", "write")
            and Path(code.co_filename).parent.name
            in (
                "edge",
                "runtimes",
            )
        )

    def profile(frame, event, arg) -> None:
        if event == "c_return" and watched(frame):
            point()
        elif event == "return" and watched(frame.f_back) and frame.f_code.co_name != "__del__":
            point()

    def trace(frame, event, arg):
        if frame.f_code is not rb.ArenaBackend.write.__code__:
            return None

        def local(fr, ev, a):
            if ev == "line" and fr.f_lineno in loop:
                point()
            return local

        return local

    sys.setprofile(profile)
    sys.settrace(trace)
    try:
        call()
    except KeyboardInterrupt:
        assert seen[0] == k
    finally:
        sys.setprofile(None)
        sys.settrace(None)
    return seen[0]


TRANSITIONS = [(None, "a"), ("a", {"a": 0.5, "b": 0.5}), ({"a": 0.5, "b": 0.5}, "b")]  # fast, fused, fast from fused


def _key(state) -> str:
    return repr(sorted(normalise(state).items()))


@pytest.mark.parametrize(
    "backend,strategy", [(b, s) for b in ("onnxruntime", "tflite") for s in get_backend(b).STRATEGIES]
)
def test_a_ctrl_c_anywhere_in_a_switch_leaves_the_state_it_found(mlp, backend, strategy):
    """Before: an interrupt after the backend's write (or between two of its parts) left the weights in the new state,
    or a mix, while the runtime recorded the old one: ``active`` lied, and the next switch undid the wrong entries, so
    from base -> "a" on, no switch (not even back to the base) gave the exact weights again."""
    with Runtime(mlp[backend]["model"], backend=backend, strategy=strategy) as rt:
        base = {k: rt.weights(k) for k in rt.info.tensors}
        for n in ("a", "b"):
            rt.load_adapter(mlp[backend][n])
        refs = {}
        for state in {_key(s): s for t in TRANSITIONS for s in t}.values():
            rt.switch(state)
            assert rt.wait_settled(30)
            refs[_key(state)] = rt.run({"x": np.ones((2, 10), np.float32)})["logits"]

        def check(*states) -> None:  # the runtime is in one of ``states``, wholly: its weights and what it serves
            assert rt.active in [normalise(s) for s in states]
            want = merge_weights(base, [(rt.adapter(n), w) for n, w in rt.active.items()])
            for k, w in want.items():
                np.testing.assert_array_equal(rt.weights(k), w, err_msg=f"{k} after an interrupted switch")
            assert rt.wait_settled(30)
            out = rt.run({"x": np.ones((2, 10), np.float32)})["logits"]
            np.testing.assert_array_equal(out, refs[repr(sorted(rt.active.items()))])

        for src, dst in TRANSITIONS:
            rt.switch(src)
            points = _interrupt_at(0, lambda: rt.switch(dst))  # noqa: B023 - called at once
            check(dst)
            assert points > 5, f"only {points} interruptible points in a switch {src} -> {dst}: is the test aiming?"
            for k in range(1, points + 1):
                rt.switch(src)
                assert _interrupt_at(k, lambda: rt.switch(dst)) == k  # noqa: B023
                check(src, dst)  # the old state, or the new one when the interrupt came after the switch was done
        rt.switch(None)
        check(None)
