"""Cold start of the device's other paths: the device trainer (growth and its ``GrowthJob`` child), the OOD loop
(tapped model with a head, router fit, routing a stream) and the LiteRT backend import no ``onnx`` (whose
``ml_dtypes`` costs 0.7-1.2 s of a fresh process) and answer as they did with it.

Each path runs in a fresh interpreter that prints what it computed and the heavy modules it added; the same
computation in this process (which imported onnx) is the reference.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import _tiny
import _tiny_tflite
import numpy as np
import onnx
import pytest
from _blocking import ROOT
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from edge.convert.onnx_read import attribute_value, read_model
from edge.errors import FormatError

HEAVY = ("onnx", "ml_dtypes", "torch", "transformers")

#: ``edge.learn.device_trainer`` from a path (``new``) or from a pickled trainer (``GrowthJob``'s child): the loss
#: and gradients of the tail on fixed inputs, and the heavy modules imported
TRAINER = """
import json, pickle, sys
import numpy as np
before = set(sys.modules)
if sys.argv[1] == "new":
    from edge.learn.device_trainer import DeviceTrainer
    t = DeviceTrainer(sys.argv[2])
else:
    with open(sys.argv[2], "rb") as f:
        t = pickle.load(f)
x = np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32)
loss, grads = t.loss_and_grads(x, np.arange(16) % 3)
added = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in __HEAVY__)
print(json.dumps({"added": added, "loss": loss, "grads": {k: v.tolist() for k, v in grads.items()}}))
""".replace("__HEAVY__", repr(HEAVY))

#: the OOD loop of README "OOD detection, routing and growth (device side)" on a tapped model with a head
ROUTER = """
import json, sys
from pathlib import Path
import numpy as np
before = set(sys.modules)
from edge.route.router import Reconfigurator, RouterConfig
from edge.route.taps import Head, Tapped
from edge.runtime import Runtime
spec = json.loads(sys.argv[1])
tapped = Tapped(Path(spec["path"]), tuple(spec["tensors"]), spec["width"], head=Head(*spec["head"]))
rt = Runtime(tapped.path, backend="onnxruntime", strategy="bound")
rt.load_adapter(spec["adapter"], "a")
rng = np.random.default_rng(0)
def batch(shift, n):
    return (rng.standard_normal((n, 10)) + shift).astype(np.float32), rng.integers(0, 3, n)
router = Reconfigurator(rt, tapped, RouterConfig(seed=0))
router.add_domain("clean", None, *batch(0.0, 200))
router.add_domain("shift", "a", *batch(3.0, 200))
router.fit()
votes, logits = [], []
for shift in (0.0, 3.0, -6.0):
    for _ in range(5):
        step = router.process(batch(shift, 16)[0])
        votes += step.votes
        logits.append(np.asarray(step.logits).tolist())
added = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in __HEAVY__)
print(json.dumps({"added": added, "votes": votes, "logits": logits, "scoring": router.scoring}))
""".replace("__HEAVY__", repr(HEAVY))

#: LiteRT load, run, switch to an adapter and back
LITERT = """
import json, sys
import numpy as np
before = set(sys.modules)
from edge.runtime import Runtime
rt = Runtime(sys.argv[1], strategy="rebuild")
x = np.random.default_rng(0).standard_normal((2, 10)).astype(np.float32)
first = lambda y: np.asarray(next(iter(y.values())) if isinstance(y, dict) else y).tolist()
y0 = first(rt.run({"x": x}))
rt.load_adapter(sys.argv[2], "a")
rt.switch("a")
y1 = first(rt.run({"x": x}))
rt.switch(None)
y2 = first(rt.run({"x": x}))
rt.close()
added = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in __HEAVY__ + ("onnxruntime", "google"))
print(json.dumps({"added": added, "y": [y0, y1, y2]}))
""".replace("__HEAVY__", repr(HEAVY))


def _child(script: str, *argv: str) -> dict:
    r = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    d = tmp_path_factory.mktemp("coldH19")
    info = _tiny.make_mlp(d / "m.onnx", sizes=(10, 24, 3))
    return d, info


def _trainer_reference(path):
    from edge.learn.device_trainer import DeviceTrainer

    t = DeviceTrainer(path)
    x = np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32)
    return t, t.loss_and_grads(x, np.arange(16) % 3)


@pytest.mark.parametrize("how", ["new", "pickled"])
def test_device_trainer_imports_no_onnx_and_computes_the_same(mlp, how):
    d, _ = mlp
    trainer, (loss, grads) = _trainer_reference(d / "m.onnx")  # this process imported onnx
    arg = str(d / "m.onnx")
    if how == "pickled":  # what GrowthJob's spawned child receives
        arg = str(d / "trainer.pkl")
        (d / "trainer.pkl").write_bytes(pickle.dumps(trainer))
    out = _child(TRAINER, how, arg)
    assert out["added"] == ["onnx.onnx_ml_pb2"]  # onnx's generated classes only, loaded alone
    assert out["loss"] == loss and set(out["grads"]) == set(grads) == {"fc1.weight", "fc2.weight"}
    for k, g in grads.items():
        assert np.array_equal(np.asarray(out["grads"][k]), g), k


def test_a_pickled_trainer_holds_its_graph_as_bytes_and_reads_it_back_equal(mlp):
    d, _ = mlp
    trainer, _ = _trainer_reference(d / "m.onnx")
    assert isinstance(trainer.__getstate__()["_proto"], bytes)
    back = pickle.loads(pickle.dumps(trainer))
    assert back._proto == trainer._proto and isinstance(back._proto, onnx.ModelProto)
    assert back._session is None and back.params == trainer.params


def test_the_ood_loop_imports_no_onnx_and_votes_the_same(mlp):
    from edge.route.taps import Head, tap_model

    d, info = mlp
    tapped = tap_model(d / "m.onnx", d / "m.tapped.onnx", ["h2"], head=Head(domains=4, classes=3))  # host side
    adapter = _tiny.random_adapter(info, seed=3, density=0.3).save(d / "a.safetensors")
    spec = {"path": str(tapped.path), "tensors": list(tapped.tensors), "width": tapped.width, "head": [4, 3, 256]}
    out = _child(ROUTER, json.dumps({**spec, "adapter": str(adapter)}))
    assert out["added"] == ["onnx.onnx_ml_pb2"]  # onnx's generated classes only, loaded alone
    # the same loop in a process that imported onnx first: the same votes and logits
    ref = _child("import onnx\n" + ROUTER, json.dumps({**spec, "adapter": str(adapter)}))
    votes, logits = ref["votes"], [np.asarray(v, np.float32) for v in ref["logits"]]
    assert out["scoring"] == ref["scoring"] == "graph"
    assert out["votes"] == votes
    assert all(np.array_equal(np.asarray(a, np.float32), b) for a, b in zip(out["logits"], logits, strict=True))
    # the stream was routed: clean to the base, the shifted domain to its adapter, the far one OOD (None)
    assert votes[:80].count("clean") >= 75 and votes[80:160].count("shift") >= 75 and votes[160:].count(None) >= 75


def test_litert_load_run_switch_imports_neither_onnx_nor_onnxruntime(tmp_path):
    from edge.runtime import Runtime

    info = _tiny_tflite.make_mlp(tmp_path / "m.tflite")
    adapter = _tiny.random_adapter(info, seed=3, density=0.3).save(tmp_path / "a.safetensors")
    out = _child(LITERT, str(tmp_path / "m.tflite"), str(adapter))
    assert not out["added"], out["added"]
    rt = Runtime(tmp_path / "m.tflite", strategy="rebuild")  # no background build: the same kernels each run
    x = np.random.default_rng(0).standard_normal((2, 10)).astype(np.float32)
    y0 = np.asarray(rt.run({"x": x})["logits"])
    rt.load_adapter(str(adapter), "a")
    rt.switch("a")
    y1 = np.asarray(rt.run({"x": x})["logits"])
    rt.close()
    got = [np.asarray(y, np.float32) for y in out["y"]]
    assert np.array_equal(got[0], y0) and np.array_equal(got[1], y1) and np.array_equal(got[2], y0)
    assert np.abs(y1 - y0).max() > 0


def _attributes() -> list:
    t = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "t")
    g = helper.make_graph([], "g", [], [])
    tp = helper.make_tensor_type_proto(TensorProto.FLOAT, [2])
    sparse = helper.make_sparse_tensor(t, numpy_helper.from_array(np.array([0, 4], np.int64), "i"), [2, 3])
    simple = {"f": 1.5, "i": -3, "s": "gelu", "t": t, "g": g, "fs": [1.0, 2.5], "is": [1, -1], "ss": ["a", "b"]}
    attrs = [helper.make_attribute(k, v) for k, v in simple.items()]
    attrs += [helper.make_attribute("ts", [t, t]), helper.make_attribute("gs", [g]), helper.make_attribute("tp", tp)]
    attrs += [helper.make_attribute("sp", sparse), helper.make_attribute("sps", [sparse])]
    attrs += [helper.make_attribute("tps", [tp, tp]), AttributeProto(name="u", type=AttributeProto.UNDEFINED)]
    return attrs


@pytest.mark.parametrize("attr", _attributes(), ids=lambda a: a.name)
def test_attribute_value_equals_onnx_helper(attr):
    assert attribute_value(attr) == helper.get_attribute_value(attr)


def test_attribute_value_refuses_a_reference_as_onnx_does():
    ref = AttributeProto(name="alpha", ref_attr_name="beta", type=AttributeProto.FLOAT)
    with pytest.raises(ValueError):
        helper.get_attribute_value(ref)
    with pytest.raises(ValueError, match="reference attribute 'alpha'"):
        attribute_value(ref)


def test_read_model_reads_what_read_onnx_reads_external_data_included(mlp, tmp_path):
    from edge.convert.onnx_source import read_onnx

    d, _ = mlp
    assert read_model(d / "m.onnx") == read_onnx(d / "m.onnx") == onnx.load(d / "m.onnx")
    ext = onnx.load(d / "m.onnx")
    onnx.save(ext, tmp_path / "e.onnx", save_as_external_data=True, location="e.data", size_threshold=0)
    raw = onnx.load(tmp_path / "e.onnx", load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in raw.graph.initializer)
    assert read_model(tmp_path / "e.onnx") == read_onnx(tmp_path / "e.onnx")
    assert not any(t.data_location == TensorProto.EXTERNAL for t in read_model(tmp_path / "e.onnx").graph.initializer)


def test_read_model_refuses_what_read_onnx_refuses(tmp_path):
    import os

    (tmp_path / "junk.onnx").write_bytes(b"\xff\xff\xff")
    with pytest.raises(FormatError, match=r"junk\.onnx: not a readable ONNX model"):
        read_model(tmp_path / "junk.onnx")
    (tmp_path / "empty.onnx").write_bytes(helper.make_model(helper.make_graph([], "g", [], [])).SerializeToString())
    with pytest.raises(FormatError, match=r"empty\.onnx is not an ONNX model: its graph has no nodes"):
        read_model(tmp_path / "empty.onnx")
    os.mkfifo(tmp_path / "fifo.onnx")
    with pytest.raises(FormatError, match="FIFO"):
        read_model(tmp_path / "fifo.onnx")
    with pytest.raises(FormatError, match="over the limit"):
        read_model(tmp_path / "junk.onnx", limit=2)
