"""``edge quantize`` (and ``edge export --quantize``) end to end: issue 18 from the command line.

Tiny models (tests/_tiny.py: numpy and onnx only; a small torch model where an adapter is trained for the
int8 twin) go through the real ``edge`` entry point: the output loads on :class:`edge.Runtime` with its
integer targets, adapters trained for the int8 twin (integer SHiRA) and float adapters of the fp32 model load
on it, and every refusal exits 2 with one line and writes nothing. The ``.tflite`` tests need
ai-edge-quantizer, which only ``.venv-tflite`` has: ``make test-tflite`` (or run this file with
``.venv-tflite/bin/pytest``); in ``.venv`` they skip saying so, except the one-line refusal when it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile

import numpy as np
import pytest
from _tiny import make_mlp, random_adapter

from edge import cli
from edge.cpu_int8 import u8s8_saturates
from edge.runtime import Runtime
from runtimes import read_model_info

QUANTIZER = importlib.util.find_spec("ai_edge_quantizer") is not None
NEEDS_QUANTIZER = pytest.mark.skipif(
    not QUANTIZER, reason="TFLite quantization needs ai-edge-quantizer: run `make test-tflite` (.venv-tflite)"
)


def edge(monkeypatch, *argv) -> int:
    """``edge ARGV`` with the host ``quantize`` and ``export`` commands joined in (as their entry points do)."""
    from importlib.metadata import entry_points

    installed = {ep.name for ep in entry_points(group=cli.ENTRY_POINT_GROUP)}
    extra = tuple(
        m
        for n in ("quantize", "export")
        if n not in installed and (m := f"exporters.commands.{n}") not in cli.COMMAND_MODULES
    )
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, *extra))
    return cli.main([str(a) for a in argv])


@pytest.fixture
def mlp(tmp_path):
    info = make_mlp(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((40, 10)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x, y=np.zeros(40, np.int64))  # the samples `edge update` reads
    return tmp_path / "m.onnx", info, x


def refused(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("edge: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("mode,grain", [("dynamic", "--per-tensor"), ("static", "--per-channel")])
def test_quantize_writes_an_int8_twin_that_serves_float_adapters(mlp, tmp_path, monkeypatch, capsys, mode, grain):
    path, info, x = mlp
    out = tmp_path / f"q-{mode}.onnx"
    seven = ["--reduce-range"] if u8s8_saturates() is not False else []  # this CPU's U8S8 kernels saturate
    argv = ["quantize", path, "--out", out, "--mode", mode, "--calib", tmp_path / "calib.npz", grain, *seven]
    code = edge(monkeypatch, *argv)
    assert code == 0
    text = capsys.readouterr().out
    assert f"(onnxruntime, {mode}, {grain[2:].replace('-', ' ')})" in text
    assert "int8 targets   2 of 2: fc1.weight, fc2.weight" in text and "float compute  0" in text
    assert "the first 40 of 40 samples of calib.npz" in text
    with Runtime(out) as rt:
        q = rt.info
        assert q.float_fingerprint == info.fingerprint != q.fingerprint
        assert q.extra["quantization"]["mode"] == mode
        assert q.extra["quantization"]["per_channel"] is (grain == "--per-channel")
        assert rt.weights("fc1.weight").dtype == np.int8
        base = rt.run({"x": x})["logits"]
        ref = Runtime(path)
        with ref:
            want = ref.run({"x": x})["logits"]
        assert float((base * want).sum() / np.linalg.norm(base) / np.linalg.norm(want)) > 0.99
        before = {k: rt.weights(k).copy() for k in q.tensors}
        rt.load_adapter(random_adapter(info, 0, density=0.05, name="fp32").save(tmp_path / "a.safetensors"), clip=True)
        rt.switch("fp32")  # a float adapter of the fp32 model, requantized onto the twin's grid
        assert any(np.any(rt.weights(k) != before[k]) for k in before)
        rt.switch(None)
        for k, w in before.items():
            np.testing.assert_array_equal(rt.weights(k), w)


def test_json_summary_and_the_flags_reach_the_quantizer(mlp, tmp_path, monkeypatch, capsys):
    path, info, _ = mlp
    out = tmp_path / "q.onnx"
    argv = ["quantize", path, "--out", out, "--mode", "static", "--calib", tmp_path / "calib.npz", "--json"]
    argv += ["--float-first", "--calibrate-method", "percentile", "--batch", "8", "--reduce-range"]
    assert edge(monkeypatch, *argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["targets"]["total"] == 2 and s["float_compute"] == [] and s["calibration"]["samples"] == 40
    assert s["targets"]["int8"] == ["fc2.weight"] and s["targets"]["float"] == ["fc1.weight"]  # the stem kept float
    assert s["float_nodes"] and s["bytes_after"] == out.stat().st_size and min(s["cosine"].values()) > 0.98
    q = read_model_info(out)
    assert q.extra["quantization"]["calibrate_method"] == "percentile" and q.extra["quantization"]["reduce_range"]
    assert s["fingerprint"] == q.fingerprint and s["float_fingerprint"] == info.fingerprint


def test_dynamic_without_samples_is_checked_on_generated_inputs(mlp, tmp_path, monkeypatch, capsys):
    path, _, _ = mlp
    assert edge(monkeypatch, "quantize", path, "--out", tmp_path / "q.onnx", "--json") == 0
    s = json.loads(capsys.readouterr().out)
    assert s["checked_on"].startswith("generated inputs") and s["calibration"] is None
    code = edge(monkeypatch, "quantize", path, "--out", tmp_path / "r.onnx", "--min-cosine", "1")
    refused(capsys, code, "cosine", "checked on generated inputs", "--calib")
    assert not (tmp_path / "r.onnx").exists()


def test_integer_inputs_need_real_samples(tmp_path, monkeypatch, capsys):
    from _tiny import write_model
    from onnx import TensorProto, helper

    from edge.format.modelinfo import TensorInfo

    table = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    write_model(
        tmp_path / "ids.onnx",
        "ids",
        [
            helper.make_node("Gather", ["emb.weight", "ids"], ["e"]),
            helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["m", "fc.weight"], ["y"]),
        ],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        {"emb.weight": table, "fc.weight": w},
        {
            "emb.weight": TensorInfo("emb.weight", (50, 8)),
            "fc.weight": TensorInfo("fc.weight", (4, 8), transposed=True),
        },
    )
    code = edge(monkeypatch, "quantize", tmp_path / "ids.onnx", "--out", tmp_path / "q.onnx")
    refused(capsys, code, "integer inputs ['ids']", "--calib")
    np.savez(tmp_path / "ids.npz", ids=np.random.default_rng(2).integers(0, 50, (32, 6)).astype(np.int32))
    assert (
        edge(
            monkeypatch,
            "quantize",
            tmp_path / "ids.onnx",
            "--out",
            tmp_path / "q.onnx",
            "--calib",
            tmp_path / "ids.npz",
        )
        == 0
    )
    assert "int8 targets   2 of 2" in capsys.readouterr().out  # int32 ids in the file, narrowed to the model's int64
    np.savez(tmp_path / "big.npz", ids=np.full((4, 6), 1 << 40, np.int64))  # ids past the table
    code = edge(
        monkeypatch, "quantize", tmp_path / "ids.onnx", "--out", tmp_path / "r.onnx", "--calib", tmp_path / "big.npz"
    )
    refused(capsys, code, "the quantizer failed on", "InvalidArgument")  # onnxruntime's own refusal, one line
    assert not (tmp_path / "r.onnx").exists()


def _npz(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in members.items():
            zf.writestr(k, v)


def _npy_header(shape, dtype="<f4") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _bad_inputs(tmp_path):
    """name -> (extra argv, text the one-line error must hold), each a file a user might hand in."""
    t = tmp_path
    np.savez(t / "wide.npz", x=np.zeros((4, 11), np.float32))
    np.savez(t / "f64.npz", x=np.zeros((4, 10)))
    np.savez(t / "named.npz", z=np.zeros((4, 10), np.float32))
    np.savez(t / "empty.npz", x=np.zeros((0, 10), np.float32))
    np.savez(t / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    _npz(t / "bomb.npz", {"x.npy": _npy_header((1 << 28, 10)) + b"\0" * 64})  # 10 GB declared, 64 bytes held
    (t / "text.npz").write_text("not a zip")
    (t / "garbage.onnx").write_bytes(os.urandom(256))
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    onnx.save(helper.make_model(g), str(t / "plain.onnx"))
    os.mkfifo(t / "fifo.npz")
    return {
        "static without samples": (["--mode", "static"], "pass --calib SAMPLES.npz"),
        "model without metadata": (["@plain.onnx"], "no 'edge' metadata"),
        "garbage model": (["@garbage.onnx"], "not a readable ONNX model"),
        "not a model": (["@wide.npz"], "an .onnx or .tflite model"),
        "out is the model": (["--out", t / "m.onnx"], "the float model itself"),
        "out of another kind": (["--out", t / "q.tflite"], "must end in .onnx"),
        "wrong width": (["--calib", t / "wide.npz"], "'x' has shape (4, 11); input 'x' takes [N, 10]"),
        "float64 samples": (["--calib", t / "f64.npz"], "'x' is float64; input 'x' takes float32"),
        "unnamed input": (["--calib", t / "named.npz"], "lacks the model input(s) ['x']"),
        "no samples": (["--calib", t / "empty.npz"], "same number (> 0) of samples"),
        "pickled objects": (["--calib", t / "objects.npz"], "Python objects"),
        "declared 10 GB": (["--calib", t / "bomb.npz"], "would take 10737418240 bytes"),
        "not a zip": (["--calib", t / "text.npz"], "not an .npz"),
        "a fifo": (["--calib", t / "fifo.npz"], "not a regular file"),
        "missing samples": (["--calib", t / "nope.npz"], "cannot read calibration file"),
        "unknown node": (["--exclude", "nope"], "['nope']"),
        "headroom below 1": (["--headroom", "0.5"], "--headroom 0.5 must be >= 1"),
        "drift": (["--calib", t / "calib.npz", "--min-cosine", "1"], "drifts from the float one"),
    }


def test_every_refusal_is_one_line_exit_2_and_writes_nothing(mlp, tmp_path, monkeypatch, capsys):
    path, _, _ = mlp
    cases = _bad_inputs(tmp_path)
    for name, (extra, needle) in cases.items():
        model = [tmp_path / extra.pop(0)[1:]] if extra and str(extra[0]).startswith("@") else [path]
        out = ["--out", tmp_path / "out.onnx"] if "--out" not in extra else []
        err = refused(capsys, edge(monkeypatch, "quantize", *model, *out, *extra), needle)
        assert not (tmp_path / "out.onnx").exists(), (name, err)
    assert not list(tmp_path.glob(".out.onnx.*"))  # no temp file left behind either


def test_a_quantized_model_is_refused_as_input(mlp, tmp_path, monkeypatch, capsys):
    path, _, _ = mlp
    assert edge(monkeypatch, "quantize", path, "--out", tmp_path / "q.onnx") == 0
    capsys.readouterr()
    code = edge(monkeypatch, "quantize", tmp_path / "q.onnx", "--out", tmp_path / "qq.onnx")
    refused(capsys, code, "quantized already", "pass the float model")


def test_tflite_without_the_quantizer_names_the_tflite_venv(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "ai_edge_quantizer" else real(n, *a))
    (tmp_path / "m.tflite").write_bytes(b"\0" * 64)
    code = edge(monkeypatch, "quantize", tmp_path / "m.tflite", "--out", tmp_path / "q.tflite")
    refused(capsys, code, "ai-edge-quantizer", "make test-tflite", ".venv-tflite")
    code = edge(monkeypatch, "quantize", tmp_path / "m.tflite", "--out", tmp_path / "q.tflite", "--float-first")
    refused(capsys, code, "--float-first apply to .onnx models")


# -- an adapter trained for the int8 twin (torch) -------------------------------------------------------------------


def test_an_integer_adapter_trained_for_the_twin_loads_and_switches_exactly(tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    from exporters.onnx import export_onnx
    from exporters.qshira import int_shira_adapter, quantized_base, train_shira_int
    from exporters.shira import make_masks, select_targets

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)).eval()
    data = np.random.default_rng(0).random((96, 12)).astype(np.float32)
    export_onnx(
        model, (torch.as_tensor(data[:4]),), tmp_path / "m.onnx", input_names=["x"], output_names=["y"], name="mlp"
    )
    np.savez(tmp_path / "calib.npz", x=data)
    out = tmp_path / "q.onnx"
    argv = ["quantize", tmp_path / "m.onnx", "--out", out, "--calib", tmp_path / "calib.npz"]
    assert edge(monkeypatch, *argv, "--per-channel", "--reduce-range") == 0
    capsys.readouterr()
    qinfo, base = quantized_base(out)
    y = (np.asarray(model(torch.as_tensor(data)).argmax(1)) + 1) % 3  # a shifted task
    masks = make_masks(model, select_targets(model), density=0.1, kind="wm")
    trained = train_shira_int(model, masks, base, data, y, epochs=20, lr=2e-2)
    adapter = int_shira_adapter(trained, qinfo, "shift").save(tmp_path / "shift.safetensors")
    with Runtime(out, strategy="bound") as rt:
        acc0 = float((rt.run({"x": data})["y"].argmax(1) == y).mean())
        rt.load_adapter(adapter)
        rt.switch("shift")
        for k, (idx, _, q) in trained.items():
            if q is not None:
                np.testing.assert_array_equal(rt.weights(k)[tuple(idx)], q)  # the device holds the trained integers
        acc = float((rt.run({"x": data})["y"].argmax(1) == y).mean())
        rt.switch(None)
        for k, b in base.items():
            np.testing.assert_array_equal(rt.weights(k), b.q)
    assert acc > acc0 + 0.2


def test_export_quantize_writes_the_float_model_and_its_int8_twin(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.ResNetModel(
        transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic")
    )
    model.save_pretrained(tmp_path / "resnet")
    capsys.readouterr()  # its progress bar
    x = np.random.default_rng(0).standard_normal((24, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", pixel_values=x)
    out = tmp_path / "r.onnx"
    argv = ["export", tmp_path / "resnet", "--out", out, "--image-size", "32", "-q"]
    code = edge(monkeypatch, *argv, "--quantize", "static")  # refused before any export
    refused(capsys, code, "pass --calib")
    assert not out.exists()
    code = edge(monkeypatch, *argv, "--calib", tmp_path / "calib.npz")
    refused(capsys, code, "--calib go with --quantize")
    assert edge(monkeypatch, *argv, "--quantize", "static", "--calib", tmp_path / "calib.npz", "--per-channel") == 0
    s = json.loads(capsys.readouterr().out)
    twin = tmp_path / "r-int8.onnx"
    assert s["quantized"]["out"] == str(twin) and s["quantized"]["mode"] == "static"
    assert s["quantized"]["targets"]["int8"] and s["quantized"]["float_fingerprint"] == s["fingerprint"]
    with Runtime(out) as f, Runtime(twin) as q:
        a, b = f.run({"pixel_values": x[:4]})["embeddings"], q.run({"pixel_values": x[:4]})["embeddings"]
    assert float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)) > 0.98


# -- .tflite: AI Edge Quantizer (.venv-tflite) ------------------------------------------------------------------------


@NEEDS_QUANTIZER
def test_tflite_dynamic_and_static_from_the_command_line(tmp_path, monkeypatch, capsys):
    from _tiny_tflite import make_mlp as make_tflite_mlp

    info = make_tflite_mlp(tmp_path / "m.tflite")
    x = np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "q.tflite"
    assert edge(monkeypatch, "quantize", tmp_path / "m.tflite", "--out", out, "--json") == 0
    s = json.loads(capsys.readouterr().out)
    assert (
        s["quantizer"] == "ai-edge-quantizer"
        and s["per_channel"]
        and sorted(s["targets"]["int8"])
        == [
            "fc1.weight",
            "fc2.weight",
        ]
    )
    with Runtime(out, backend="tflite") as rt:
        assert rt.info.float_fingerprint == info.fingerprint and rt.weights("fc1.weight").dtype == np.int8
        rt.load_adapter(random_adapter(info, 0, density=0.05, name="fp32").save(tmp_path / "a.safetensors"), clip=True)
        rt.switch("fp32")
    # static calibration runs the model through its signature: this hand-built file has none
    argv = ["quantize", tmp_path / "m.tflite", "--out", tmp_path / "s.tflite", "--mode", "static"]
    refused(capsys, edge(monkeypatch, *argv, "--calib", tmp_path / "calib.npz"), "no signature")
    torch = pytest.importorskip("torch")
    pytest.importorskip("litert_torch", reason="TFLite export needs litert-torch: run `make test-tflite`")
    from exporters.tflite import export_tflite

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    x = np.random.default_rng(0).random((64, 10)).astype(np.float32)  # image-like [0, 1): int8 activations fit
    np.savez(tmp_path / "calib.npz", x=x)
    export_tflite(
        model, (torch.as_tensor(x[:1]),), tmp_path / "t.tflite", name="t", input_names=["x"], output_names=["y"]
    )
    capsys.readouterr()  # the converter's progress
    argv = ["quantize", tmp_path / "t.tflite", "--out", tmp_path / "s.tflite", "--mode", "static", "--json"]
    assert edge(monkeypatch, *argv, "--calib", tmp_path / "calib.npz") == 0
    s = json.loads(capsys.readouterr().out)
    assert s["mode"] == "static" and len(s["targets"]["int8"]) == 2 and min(s["cosine"].values()) > 0.98
    with Runtime(tmp_path / "s.tflite", backend="tflite") as rt:
        assert rt.info.extra["quantization"]["mode"] == "static"
