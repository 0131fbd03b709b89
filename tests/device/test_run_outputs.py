"""``Runtime.run(feeds, outputs=[...])``: only the outputs asked for, on every backend and strategy (no torch).

Each backend gets a tiny model with several outputs: on onnxruntime the tiny MLP tapped with a detector
head (``logits``, ``edge.features``, ``edge.vote``), on LiteRT the tiny MLP with its hidden layer as a
second output. Every subset must equal the same outputs of a full run, on the prepacked session and on the
bound (IOBinding) one alike, whatever subset the run before asked for.
"""

from __future__ import annotations

from dataclasses import replace

import _tiny
import _tiny_tflite
import numpy as np
import pytest
from _tiny import random_adapter

from edge.errors import ConfigError
from edge.format.modelinfo import META_KEY, ModelInfo
from edge.format.tflite import pack_model, set_metadata, tensor_name, unpack_model
from edge.route.taps import FEATURES, VOTE, Head, tap_model
from edge.runtime import Runtime
from runtimes import backend_names, get_backend

CASES = [(b, s) for b in backend_names() for s in get_backend(b).STRATEGIES]
X = np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32)


def test_every_backend_has_a_multi_output_model():
    assert set(backend_names()) == set(OUTPUTS), "add a multi-output tiny model for the new backend"


def _onnx_model(tmp_path):
    info = _tiny.make_mlp(tmp_path / "m.onnx")
    tapped = tap_model(tmp_path / "m.onnx", tmp_path / "m.tapped.onnx", ["h2"], head=Head(domains=2, classes=2))
    return tapped.path, info


def _tflite_model(tmp_path):
    """The tiny LiteRT MLP with its hidden activation ``h`` as a second output (declared in the metadata)."""
    info = _tiny_tflite.make_mlp(tmp_path / "m.tflite")
    m = unpack_model((tmp_path / "m.tflite").read_bytes())
    sg = m.subgraphs[0]
    sg.outputs = [next(i for i, t in enumerate(sg.tensors) if tensor_name(t) == "h"), *sg.outputs]
    meta = next(e for e in m.metadata if tensor_name(e) == META_KEY)
    old = ModelInfo.from_json(bytes(m.buffers[meta.buffer].data).decode())
    set_metadata(m, META_KEY, replace(old, outputs=("h", "logits")).to_json().encode())
    (tmp_path / "m2.tflite").write_bytes(pack_model(m))
    return tmp_path / "m2.tflite", info


MODELS = {"onnxruntime": _onnx_model, "tflite": _tflite_model}
OUTPUTS = {"onnxruntime": ("logits", FEATURES, VOTE), "tflite": ("h", "logits")}


def _subsets(names):
    """Every non-empty subset, in both orders for pairs, and the full list reversed."""
    out = [[n] for n in names] + [[a, b] for a in names for b in names if a != b]
    return [*out, list(reversed(names))]


def _check(rt, names, x=X, exact=True):
    """Each subset of outputs equals the full run's; not ``exact`` while a hybrid rebuild may land between two runs
    (the two kernel sets, e.g. LiteRT's built-in and XNNPACK, may differ in the last bits)."""
    full = rt.run(x)
    assert tuple(full) == names
    for subset in _subsets(names):
        got = rt.run(x, outputs=subset)
        assert list(got) == subset, (subset, list(got))
        for k in subset:
            if exact:
                np.testing.assert_array_equal(got[k], full[k], err_msg=f"{k} when fetching {subset}")
            else:
                np.testing.assert_allclose(got[k], full[k], rtol=1e-5, atol=1e-6, err_msg=f"{k} fetching {subset}")


@pytest.mark.parametrize("backend,strategy", CASES)
def test_outputs_subset_equals_the_full_run(tmp_path, backend, strategy):
    path, info = MODELS[backend](tmp_path)
    names = OUTPUTS[backend]
    with Runtime(path, backend=backend, strategy=strategy) as rt:
        assert tuple(rt.backend.output_names) == names
        rt.wait_settled(30)
        _check(rt, names)
        rt.load_adapter(random_adapter(info, 1))
        rt.switch("a1")  # hybrid: the next runs are served by the consistent (bound) session until the rebuild
        _check(rt, names, exact=strategy != "hybrid")
        _check(rt, names, X[:1], exact=strategy != "hybrid")  # another batch size: outputs are allocated per run
        rt.wait_settled(30)
        _check(rt, names)


@pytest.mark.parametrize("backend", sorted(MODELS))
def test_bound_session_rebinds_only_what_is_asked(tmp_path, backend):
    """Alternating subsets on the bound strategy (onnxruntime's IOBinding keeps outputs bound between runs)."""
    path, _ = MODELS[backend](tmp_path)
    names = OUTPUTS[backend]
    strategy = "bound" if backend == "onnxruntime" else "builtin"
    with Runtime(path, backend=backend, strategy=strategy) as rt:
        full = rt.run(X)
        for subset in [[names[-1]], list(names), [names[0]], [names[-1], names[0]], [names[0]]]:
            got = rt.run(X, outputs=subset)
            assert list(got) == subset
            for k in subset:
                np.testing.assert_array_equal(got[k], full[k])


@pytest.mark.parametrize("backend", sorted(MODELS))
@pytest.mark.parametrize(
    "outputs,says",
    [
        (["nope"], "['nope'] are not outputs of"),
        (["logits", "nope"], "['nope'] are not outputs of"),
        ([], "names no output of"),
        ("logits", "names no output of"),  # a string is not a list of names
        ([3], "names no output of"),
        ([["logits"]], "names no output of"),
        (7, "names no output of"),
    ],
)
def test_unknown_outputs_are_refused_with_the_allowed_ones(tmp_path, backend, outputs, says):
    path, _ = MODELS[backend](tmp_path)
    with Runtime(path, backend=backend) as rt:
        with pytest.raises(ConfigError, match="pass a list of its outputs") as e:
            rt.run(X, outputs=outputs)
        assert says in str(e.value)
        for n in OUTPUTS[backend]:
            assert repr(n) in str(e.value)
        with pytest.raises(ConfigError):  # refused again: a refused list is never remembered
            rt.run(X, outputs=outputs)


@pytest.mark.parametrize("backend", sorted(MODELS))
def test_repeated_names_are_fetched_once(tmp_path, backend):
    path, _ = MODELS[backend](tmp_path)
    name = OUTPUTS[backend][-1]
    with Runtime(path, backend=backend) as rt:
        got = rt.run(X, outputs=[name, name])
        assert list(got) == [name]
        np.testing.assert_array_equal(got[name], rt.run(X)[name])
        assert list(rt.run(X, outputs=(name,))) == [name]  # a tuple works as well as a list
