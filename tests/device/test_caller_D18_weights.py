"""A caller that must not change weights: what the runtime hands back, head values, feeds and interrupted switches.

Each case was a way around "a caller can never change weights except through an adapter the policy admits" or "a
refused or interrupted call never leaves the runtime half-switched", through the public API only:

- ``rt.info.extra`` was a plain dict, and it decides which base fingerprints an adapter may name
  (``ModelInfo.fits`` reads ``extra["quantization"]["float_fingerprint"]``): writing another model's fingerprint
  there let a signed adapter made for another model load and switch in. It is read-only now, nested.
- the mappings of a held adapter (``rt.adapter(n).tensors``, ``shapes``, ``info``) were plain dicts: a delta put in
  was counted as held (``adapter_bytes``), and ``unload_adapter`` then failed with a bare ``KeyError``.
- ``switch(name, head=...)`` cut short after its write (a Ctrl-C, a failed rebuild) put the old weights back but
  left the new head: old weights scored by the new state's detector. ``set_head`` likewise kept a partial head.
- head values that are not a mapping raised a bare ``AttributeError``; complex, bool, text and object values were
  converted silently (complex lost its imaginary part, ``"1.5"`` was parsed).
- an ndarray subclass whose ``shape`` lies passed the feed check and reached onnxruntime (``bound``, ``hybrid``):
  a bare ``RuntimeError``.
- ``run(outputs=[name])`` with a ``str`` subclass equal to an output but spelling another name was remembered as
  that list: every later ``run(outputs=["logits"])``, from any caller, then failed (onnxruntime: "Invalid output
  name", ``bound`` a bare ``RuntimeError``) or (LiteRT) answered under the subclass's name.
- ``clip="no"`` (a string from a config file) was true: an int8 switch or load clipped silently; ``load_adapter``
  of ``None``, an int or a file's bytes and ``weights`` of an unhashable name raised bare ``TypeError``/``ValueError``.
"""

from __future__ import annotations

import pickle
import threading
from dataclasses import replace

import _tiny
import _tiny_tflite
import numpy as np
import pytest

from edge.errors import AdapterMismatchError, ConfigError
from edge.format.signing import generate_key, sign_file
from edge.route.taps import Head, tap_model
from edge.runtime import Runtime

X = np.random.default_rng(7).standard_normal((4, 10)).astype(np.float32)
EXTRA = {"labels": ["zero", "one"], "nested": {"list": [1, 2], "map": {"k": "v"}}}


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("caller-d18")
    info = _tiny.make_mlp(d / "m.onnx", seed=3, sizes=(10, 16, 4), extra=EXTRA)
    tinfo = _tiny_tflite.make_mlp(d / "m.tflite", seed=3, sizes=(10, 16, 4))
    out = {"onnxruntime": {"model": d / "m.onnx"}, "tflite": {"model": d / "m.tflite"}}
    for i, n in enumerate("ab"):
        a = _tiny.random_adapter(info, seed=i, name=n)
        out["onnxruntime"][n] = a.save(d / f"{n}.safetensors")
        out["tflite"][n] = replace(a, base_fingerprint=tinfo.fingerprint).save(d / f"{n}.tflite.safetensors")
    other = _tiny.make_mlp(d / "other.onnx", seed=9, sizes=(10, 16, 4))
    generate_key(d / "k.pem")
    out["foreign"] = _tiny.random_adapter(other, seed=5, name="foreign").save(d / "foreign.safetensors")
    sign_file(out["foreign"], d / "k.pem")
    out["key"] = d / "k.pub"
    out["head"] = tap_model(d / "m.onnx", d / "m.head.onnx", ["h2"], head=Head(domains=3, classes=4)).path
    return out


def _bytes(rt: Runtime) -> dict[str, bytes]:
    """Every writable tensor of the model (weights and head tensors), as bytes."""
    return {t: rt.weights(t).tobytes() for t in rt.info.tensors}


@pytest.mark.parametrize("backend", ["onnxruntime", "tflite"])
def test_caller_D18_a_held_adapters_mappings_are_read_only(kit, backend):
    with Runtime(kit[backend]["model"], backend=backend) as rt:
        rt.load_adapter(kit[backend]["a"])
        rt.load_adapter(_tiny.random_adapter(rt.info, seed=3, name="mine"))  # an in-memory one, copied
        held = rt.adapter_bytes
        rt.switch("a")
        fused = _bytes(rt)
        for name in ("a", "mine"):
            ad = rt.adapter(name)
            k, d = next(iter(ad.tensors.items()))
            forged = type(d)(np.array(d.indices), np.array(d.values) * 100)
            for change in (
                lambda: ad.tensors.__setitem__(k, forged),  # noqa: B023 - called at once
                lambda: ad.tensors.__setitem__("extra.weight", forged),  # noqa: B023
                lambda: ad.tensors.pop(k),  # noqa: B023
                lambda: ad.shapes.update({k: (1, 1)}),  # noqa: B023
                lambda: ad.info.clear(),  # noqa: B023
            ):
                with pytest.raises(TypeError, match="read-only"):
                    change()
            assert ad.tensors[k] is d and pickle.loads(pickle.dumps(dict(ad.info))) == dict(ad.info)
        assert rt.adapter_bytes == held  # before: the forged delta's arrays counted as held
        rt.switch(None)
        rt.unload_adapter("mine")  # before: a bare KeyError (a buffer no held adapter had been counted with)
        rt.switch("a")
        assert _bytes(rt) == fused and rt.adapters == ["a"]


def test_caller_D18_the_model_metadata_cannot_be_edited_to_admit_another_models_adapter(kit):
    with Runtime(kit["onnxruntime"]["model"], trusted_keys=[kit["key"]]) as rt:
        before = _bytes(rt)
        with pytest.raises(AdapterMismatchError, match="was trained on base"):
            rt.load_adapter(kit["foreign"])  # signed by a trusted key, but made for another model
        fp = rt.info.fits
        lie = {"float_fingerprint": "sha256:" + "0" * 32}
        for change in (
            lambda: rt.info.extra.__setitem__("quantization", lie),
            lambda: rt.info.extra.update(quantization=lie),
            lambda: rt.info.extra.setdefault("quantization", lie),
            lambda: rt.info.extra["nested"].__setitem__("quantization", lie),
            lambda: rt.info.extra["nested"]["list"].append(3),
            lambda: rt.info.extra["labels"].__setitem__(0, "ten"),
            lambda: rt.info.extra["labels"].sort(),
        ):
            with pytest.raises(TypeError, match="read-only"):
                change()
        assert rt.info.fits == fp and rt.info.extra == EXTRA  # equal to the file's, nested
        with pytest.raises(AdapterMismatchError, match="was trained on base"):
            rt.load_adapter(kit["foreign"])
        assert _bytes(rt) == before and rt.adapters == []
        assert pickle.loads(pickle.dumps(rt.info)).extra == EXTRA and '"labels": ["zero", "one"]' in rt.info.to_json()


def _heads(rt: Runtime, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {h: rng.standard_normal(rt.info.tensors[h].shape).astype(np.float32) for h in rt.heads}


@pytest.mark.parametrize("strategy", ["bound", "rebuild", "hybrid"])
def test_caller_D18_a_switch_with_a_head_cut_short_leaves_weights_and_head_as_found(kit, strategy, monkeypatch):
    with Runtime(kit["head"], strategy=strategy) as rt:
        rt.load_adapter(kit["onnxruntime"]["a"])
        rt.load_adapter(kit["onnxruntime"]["b"])
        rt.switch("b", head=_heads(rt, 1))
        found, out = _bytes(rt), rt.run(X)
        write = rt.backend.write

        def cut_short(*prepared):  # the backend's write done, then a Ctrl-C before the runtime records it
            write(*prepared)
            monkeypatch.setattr(rt.backend, "write", write)
            raise KeyboardInterrupt

        for call in (
            lambda: rt.switch("a", head=_heads(rt, 2)),
            lambda: rt.switch({"a": 0.5, "b": 0.5}, head=_heads(rt, 3)),
            lambda: rt.set_head(_heads(rt, 4)),
        ):
            monkeypatch.setattr(rt.backend, "write", cut_short)
            with pytest.raises(KeyboardInterrupt):
                call()
            assert rt.active == {"b": 1.0}
            assert _bytes(rt) == found  # before: the old weights with the new head
            assert rt.wait_settled(30)
            for k, v in rt.run(X).items():
                np.testing.assert_array_equal(v, out[k], err_msg=k)


NOT_HEADS = {
    "list": lambda h: [("edge.head.m", h["edge.head.m"])],
    "None": lambda h: None,
    "str": lambda h: "edge.head.m",
    "array": lambda h: h["edge.head.m"],
    "int key": lambda h: {1: h["edge.head.m"]},
    "weight": lambda h: {"fc1.weight": np.zeros((16, 10), np.float32)},
    "complex": lambda h: {"edge.head.m": h["edge.head.m"] + 1j},
    "bool": lambda h: {"edge.head.m": h["edge.head.m"] > 0},
    "text": lambda h: {"edge.head.m": h["edge.head.m"].astype(str)},
    "objects": lambda h: {"edge.head.m": h["edge.head.m"].astype(object)},
    "too large": lambda h: {"edge.head.m": h["edge.head.m"].astype(np.float64) * 1e300},
    "nan": lambda h: {"edge.head.m": h["edge.head.m"] * np.nan},
    "shape": lambda h: {"edge.head.m": h["edge.head.m"].T},
}


def test_caller_D18_head_values_that_are_not_real_arrays_are_refused_and_change_nothing(kit):
    with Runtime(kit["head"], strategy="bound") as rt:
        rt.load_adapter(kit["onnxruntime"]["a"])
        rt.switch("a", head=_heads(rt, 1))
        found, good = _bytes(rt), _heads(rt, 2)
        for why, make in NOT_HEADS.items():
            calls = [rt.set_head] + ([] if why == "None" else [lambda v: rt.switch(None, head=v)])  # None: no head
            for call in calls:
                with pytest.raises(ConfigError, match="head") as e:
                    call(make(good))
                assert type(e.value) is ConfigError, why  # before: AttributeError, or converted and written
                assert _bytes(rt) == found and rt.active == {"a": 1.0}, why
        m = good["edge.head.m"]
        for fine in (m.astype(">f4"), np.repeat(m, 2, axis=0)[::2], m.astype(np.float64), m.tolist()):
            rt.set_head({"edge.head.m": fine})  # real numbers of the right shape, any layout: written as float32
            assert rt.weights("edge.head.m").tobytes() == m.tobytes()
            rt.set_head({"edge.head.m": np.zeros_like(m)})


class Lying(np.ndarray):
    """An array that reports the model's input shape whatever its own is."""

    shape = property(lambda self: (4, 10))
    ndim = property(lambda self: 2)


@pytest.mark.parametrize(
    "backend,strategy", [("onnxruntime", s) for s in ("bound", "rebuild", "hybrid")] + [("tflite", "hybrid")]
)
def test_caller_D18_a_feed_whose_shape_lies_is_refused_typed(kit, backend, strategy, tmp_path):
    with Runtime(kit[backend]["model"], backend=backend, strategy=strategy) as rt:
        want = rt.run({"x": X})["logits"]
        for real in ((4, 999), (1, 3), (4, 10, 1)):
            with pytest.raises(ConfigError, match="input 'x'"):  # before (onnxruntime bound, hybrid): RuntimeError
                rt.run({"x": np.zeros(real, np.float32).view(Lying)})
        mm = np.memmap(tmp_path / "x.bin", np.float32, "w+", shape=X.shape)
        mm[:] = X
        for feed in (mm, X.view(Lying), X[::-1][::-1]):  # honest subclasses run as the plain array
            np.testing.assert_array_equal(rt.run({"x": feed})["logits"], want)


def test_caller_D18_a_refused_switch_in_the_middle_of_a_list_leaves_every_byte(kit):
    with Runtime(kit["head"], strategy="bound") as rt:
        rt.load_adapter(kit["onnxruntime"]["a"])
        rt.load_adapter(kit["onnxruntime"]["b"])
        rt.switch({"a": 0.5, "b": 0.5}, head=_heads(rt, 1))
        found, out = _bytes(rt), rt.run(X)
        for spec, error in (
            (["a", "nope", "b"], ConfigError),
            ({"a": 1.0, "b": float("inf")}, ConfigError),
            ({"a": 3e38, "b": 3e38}, ConfigError),  # finite weights whose fused values are not
            ({"a": 1.0, 2: 1.0}, ConfigError),
            (["a", "b", "a"], ConfigError),
        ):
            with pytest.raises(error):
                rt.switch(spec, head=_heads(rt, 2))
            assert rt.active == {"a": 0.5, "b": 0.5} and _bytes(rt) == found, spec
            for k, v in rt.run(X).items():
                np.testing.assert_array_equal(v, out[k], err_msg=f"{k} after {spec}")


def test_caller_D18_runs_beside_switches_with_heads_see_one_whole_state(kit):
    """Each state is weights and head together: a run sees one state's outputs exactly (``bound``: no settle)."""
    with Runtime(kit["head"], strategy="bound") as rt:
        rt.load_adapter(kit["onnxruntime"]["a"])
        rt.load_adapter(kit["onnxruntime"]["b"])
        states = [(None, _heads(rt, 1)), ("a", _heads(rt, 2)), ({"a": 0.5, "b": 0.5}, _heads(rt, 3))]
        refs = []
        for spec, head in states:
            rt.switch(spec, head=head)
            refs.append(rt.run(X))
        stop, seen, errors = threading.Event(), [], []

        def runs() -> None:
            try:
                while not stop.is_set():
                    seen.append(rt.run(X))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=runs, daemon=True)
        t.start()
        try:
            for i in range(150):
                rt.switch(*states[i % 3][:1], head=states[i % 3][1])
        finally:
            stop.set()
            t.join(30)
        assert not errors and not t.is_alive() and len(seen) > 10
        for out in seen:
            assert any(all(np.array_equal(out[k], r[k]) for k in r) for r in refs)


class Posing(str):
    """An output name that compares and hashes as ``logits`` whatever it spells."""

    __eq__ = lambda self, other: True  # noqa: E731
    __hash__ = lambda self: hash("logits")  # noqa: E731


@pytest.mark.parametrize(
    "backend,strategy", [("onnxruntime", "bound"), ("onnxruntime", "hybrid"), ("tflite", "hybrid")]
)
def test_caller_D18_an_output_name_posing_as_another_is_not_remembered_for_later_callers(kit, backend, strategy):
    with Runtime(kit[backend]["model"], backend=backend, strategy=strategy) as rt:
        want = rt.run({"x": X})["logits"]
        for spelled in ("fc1.weight", "x", "h0"):
            with pytest.raises(ConfigError, match="not outputs of"):  # its own characters are checked
                rt.run({"x": X}, outputs=[Posing(spelled)])
        for names in (["logits"], [Posing("fc1.weight")]):  # the second: the plain list remembered, answered as is
            out = rt.run({"x": X}, outputs=names)  # before: refused, or keyed by the posing name
            assert [type(k) for k in out] == [str] and list(out) == ["logits"]
            np.testing.assert_array_equal(out["logits"], want)


def test_caller_D18_slips_in_argument_types_are_config_errors_and_change_nothing(kit):
    with Runtime(kit["onnxruntime"]["model"], strategy="bound") as rt:
        rt.load_adapter(kit["onnxruntime"]["a"])
        rt.switch({"a": 0.5})
        found = _bytes(rt)
        data = kit["onnxruntime"]["a"].read_bytes()
        for call, match in (
            (lambda: rt.switch("a", clip="no"), "clip must be True or False"),
            (lambda: rt.switch({"a": 2.0}, clip=None), "clip must be True or False"),
            (lambda: rt.load_adapter(kit["onnxruntime"]["a"], "b", clip="False"), "clip must be True or False"),
            (lambda: rt.load_adapter(None), "takes an adapter file's path"),
            (lambda: rt.load_adapter(123), "takes an adapter file's path"),
            (lambda: rt.load_adapter({"a": 1}), "takes an adapter file's path"),
            (lambda: rt.load_adapter(data), "NUL character"),  # the file's bytes, not its path
            (lambda: rt.weights(["fc1.weight"]), "is not a parameter"),
        ):
            with pytest.raises(ConfigError, match=match):
                call()
            assert rt.active == {"a": 0.5} and rt.adapters == ["a"] and _bytes(rt) == found
        rt.load_adapter(bytes(kit["onnxruntime"]["a"]), "b", clip=np.bool_(False))  # a path as bytes, numpy's bool
        assert rt.adapters == ["a", "b"]
