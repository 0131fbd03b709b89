"""The device's load path reads ONNX with onnx's protobuf classes alone (:mod:`edge.format.onnx_proto`): loading a
model, running it and switching adapters never import ``onnx`` (whose ``ml_dtypes`` costs 0.7-1.2 s of a cold start),
and what it reads equals what ``onnx`` reads.
"""

from __future__ import annotations

import json
import subprocess
import sys

import _tiny
import numpy as np
import onnx
import pytest
from _blocking import ROOT
from onnx import helper, numpy_helper

from edge.errors import FormatError
from edge.format import onnx_proto

CHILD = """
import json, sys
import numpy as np
before = set(sys.modules)
from edge.format.adapter import Adapter, SparseDelta
from edge.runtime import Runtime
path, adapter = sys.argv[1], sys.argv[2]
rt = Runtime(path, backend="onnxruntime", strategy=sys.argv[3])
name = next(iter(rt.info.inputs))
spec = rt.input_specs[name] if hasattr(rt, "input_specs") else None
x = np.random.default_rng(0).standard_normal((2, 10)).astype(np.float32)
y0 = rt.run({name: x})
rt.load_adapter(adapter, "a", clip=True)
rt.switch("a")
y1 = rt.run({name: x})
rt.switch(None)
y2 = rt.run({name: x})
rt.close()
first = lambda y: np.asarray(next(iter(y.values())) if isinstance(y, dict) else y)
print(json.dumps({"added": sorted(set(sys.modules) - before), "moved": float(np.abs(first(y1) - first(y0)).max()),
                  "undone": bool(np.array_equal(first(y2), first(y0)))}))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from exporters import quantize_onnx

    d = tmp_path_factory.mktemp("cold")
    info = _tiny.make_mlp(d / "m.onnx", sizes=(10, 48, 3))
    calib = np.random.default_rng(1).standard_normal((64, 10)).astype(np.float32)
    qinfo = quantize_onnx(d / "m.onnx", d / "q.onnx", calib={"x": calib}, mode="static", per_channel=True).info
    out = {}
    for key, path, inf in (("fp32", d / "m.onnx", info), ("int8", d / "q.onnx", qinfo)):
        a = _tiny.random_adapter(inf, seed=3, density=0.3)  # an int8 base requantizes it at load, clipped
        out[key] = (path, a.save(d / f"{key}.safetensors"))
    return out


@pytest.mark.parametrize("key", ["fp32", "int8"])
@pytest.mark.parametrize("strategy", ["hybrid", "bound", "rebuild"])
def test_load_run_switch_never_import_onnx(models, key, strategy):
    path, adapter = models[key]
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(adapter), strategy],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.splitlines()[-1])
    heavy = [m for m in out["added"] if m.split(".")[0] in ("onnx", "ml_dtypes", "torch")]
    assert heavy == ["onnx.onnx_ml_pb2"]  # onnx's generated classes only, loaded alone
    assert out["moved"] > 0 and out["undone"]


def test_classes_are_onnx_own_whichever_import_comes_first():
    code = (
        "import sys\nfrom edge.format import onnx_proto\nm = onnx_proto.pb2()\nassert 'onnx' not in sys.modules\n"
        "import onnx\nassert onnx.ModelProto is m.ModelProto and onnx.TensorProto is m.TensorProto\n"
        "g = onnx.helper.make_model(onnx.helper.make_graph([], 'g', [], [])).SerializeToString()\n"
        "p = onnx_proto.load_model(g)\n"
        "assert isinstance(p, onnx.ModelProto) and onnx_proto.is_model(p)\nprint('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert onnx_proto.pb2().ModelProto is onnx.ModelProto  # this process imported onnx first


DTYPES = [
    np.float32,
    np.float64,
    np.float16,
    np.int8,
    np.uint8,
    np.int16,
    np.uint16,
    np.int32,
    np.int64,
    np.uint32,
    np.uint64,
    np.bool_,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("raw", [True, False])
def test_to_array_equals_numpy_helper(dtype, raw):
    rng = np.random.default_rng(0)
    v = (rng.standard_normal((3, 4)) * 50).astype(dtype)
    if dtype is np.bool_:
        v = rng.random((3, 4)) > 0.5
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    t = helper.make_tensor("t", elem, v.shape, v.tobytes() if raw else v.reshape(-1).tolist(), raw=raw)
    want, got = numpy_helper.to_array(t), onnx_proto.to_array(t)
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    assert onnx_proto.np_dtype(elem) == np.dtype(dtype) and onnx_proto.elem_type(np.dtype(dtype)) == elem


def test_other_types_go_to_onnx_with_the_same_result():
    t = helper.make_tensor("s", onnx.TensorProto.BFLOAT16, [2], [1.5, -2.0])
    assert np.array_equal(onnx_proto.to_array(t).astype(np.float32), numpy_helper.to_array(t).astype(np.float32))
    s = numpy_helper.from_array(np.array(["a", "bc"], dtype=object), "s")
    assert list(onnx_proto.to_array(s)) == ["a", "bc"]


def test_short_typed_data_is_an_error_as_in_onnx():
    t = onnx.TensorProto(name="t", data_type=onnx.TensorProto.FLOAT, dims=[3, 4])
    t.float_data.extend([1.0, 2.0])
    with pytest.raises(ValueError):
        numpy_helper.to_array(t)
    with pytest.raises(ValueError):
        onnx_proto.to_array(t)


@pytest.mark.parametrize("shape", [[2, "batch", None], [], None])
def test_value_info_equals_onnx_helper(shape):
    want = helper.make_tensor_value_info("v", onnx.TensorProto.INT8, shape)
    assert onnx_proto.value_info("v", onnx.TensorProto.INT8, shape) == want


def test_load_model_refuses_what_onnx_refuses():
    good = helper.make_model(helper.make_graph([], "g", [], [])).SerializeToString()
    assert onnx_proto.load_model(good) == onnx.load_model_from_string(good)
    for bad in (b"\xff\xff\xff", good + b"\x3a\x05ab"):  # garbage; a graph field cut short
        with pytest.raises(FormatError, match="not a readable ONNX model"):
            onnx_proto.load_model(bad)


def test_machine_reads_versions_without_importing_them():
    code = (
        "import sys, json\nfrom edge.machine import machine\nm = machine()\n"
        "print(json.dumps([m.get('onnx'), m.get('onnxruntime'), 'onnx' in sys.modules, 'ml_dtypes' in sys.modules]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    import onnxruntime

    assert json.loads(r.stdout) == [onnx.__version__, onnxruntime.__version__, False, False]


def test_a_device_profile_load_never_imports_onnx(models, tmp_path):
    path, _ = models["fp32"]
    code = (
        "import sys, json\nbefore = set(sys.modules)\nfrom edge.runtime import Runtime\n"
        f"rt = Runtime({str(path)!r}, device='x86-dev')\nrt.close()\n"
        "print(json.dumps(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('onnx', 'ml_dtypes'))))"
    )
    env = {**__import__("os").environ, "EDGE_ENGINE_CACHE": str(tmp_path / "engines")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1]) == ["onnx.onnx_ml_pb2"]


RACE = """
import sys, threading
from edge.format import onnx_proto
path = sys.argv[1]
data = open(path, "rb").read()
errs, barrier = [], threading.Barrier(9)
def load():
    barrier.wait()
    try:
        onnx_proto.load_model(data).graph.node
    except Exception as e:
        errs.append(repr(e))
def imp():
    barrier.wait()
    try:
        import onnx
        onnx.helper.make_graph([], "g", [], [])
    except Exception as e:
        errs.append(repr(e))
ts = [threading.Thread(target=load) for _ in range(8)] + [threading.Thread(target=imp)]
[t.start() for t in ts]
[t.join() for t in ts]
import onnx
print(errs, onnx.ModelProto is onnx_proto.pb2().ModelProto)
"""


def test_threads_loading_while_onnx_imports_all_get_complete_classes(models):
    path, _ = models["fp32"]
    for _ in range(3):  # a race: a half-built module reached another thread in 3 of 10 such runs before
        r = subprocess.run(
            [sys.executable, "-c", RACE, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        assert r.returncode == 0 and r.stdout.strip() == "[] True", (r.stdout, r.stderr[-2000:])


def test_an_old_protobuf_is_one_line_on_the_cli(models):
    path, _ = models["fp32"]
    code = (
        "import sys\nfrom google.protobuf import runtime_version\n"
        "runtime_version.MAJOR, runtime_version.MINOR = 5, 29  # older than onnx's generated code asks\n"
        f"from edge.cli import main\nsys.exit(main(['inspect', {str(path)!r}]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "protobuf" in r.stderr.strip().splitlines()[-1]


def test_load_model_takes_any_buffer():
    good = helper.make_model(helper.make_graph([], "g", [], [])).SerializeToString()
    pad = good + b"\x00" * (-len(good) % 4)  # a float32 view needs whole items; trailing zeros are no valid field
    assert onnx_proto.load_model(memoryview(good)) == onnx.load_model_from_string(good)
    assert onnx_proto.load_model(bytearray(good)) == onnx.load_model_from_string(good)
    if len(pad) == len(good):
        assert onnx_proto.load_model(memoryview(good).cast("B").cast("f")) == onnx.load_model_from_string(good)
