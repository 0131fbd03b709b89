"""Audit F14: `edge update --method shira-head` on a model exported with logits only (a CNN from elsewhere).

`--taps auto` pools the CNN's stages, which the head does not read, so the update is refused; the refusal now names
the flags that work (the tensor the head reads, and the head), and those flags do work.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.convert.onnx_import import import_onnx  # noqa: E402


def _cnn(path, out: str = "logits") -> None:
    """x[N,1,8,8] -> conv -> relu -> conv (stride 2) -> relu -> global pool -> flatten -> Gemm 'fc' -> logits."""
    rng = np.random.default_rng(0)
    inits = {
        "c1.weight": rng.normal(0, 0.5, (6, 1, 3, 3)).astype(np.float32),
        "c2.weight": rng.normal(0, 0.3, (8, 6, 3, 3)).astype(np.float32),
        "fc.weight": rng.normal(0, 0.3, (4, 8)).astype(np.float32),
        "fc.bias": np.zeros(4, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c1.weight"], ["h1"], pads=[1, 1, 1, 1], name="c1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.weight"], ["h2"], pads=[1, 1, 1, 1], strides=[2, 2], name="c2"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], [out], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_shira_head_over_a_tap_set_names_the_flags_that_work(tmp_path, capsys):
    _cnn(tmp_path / "raw.onnx")
    import_onnx(tmp_path / "raw.onnx", tmp_path / "cnn.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.random((40, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 4, 40))
    argv = [
        "update",
        "--model",
        str(tmp_path / "cnn.onnx"),
        "--data",
        str(tmp_path / "d.npz"),
        "--method",
        "shira-head",
    ]
    assert main([*argv, "--taps", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1  # one line, no traceback
    assert "pass --taps flat -o head=fc.weight" in err, err  # the old refusal said only "pass head=NAME"
    out = tmp_path / "head.safetensors"
    assert main([*argv, "--taps", "flat", "-o", "head=fc.weight", "--adapter-out", str(out), "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "shira-head" and report["samples_seen"] == 40 and out.is_file()


def test_a_tensor_tapped_already_gets_no_misleading_hint(tmp_path, capsys):
    """Tapping the head's own input with the wrong head named: the refusal is the method's own, nothing added."""
    _cnn(tmp_path / "raw.onnx")
    import_onnx(tmp_path / "raw.onnx", tmp_path / "cnn.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.random((8, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 4, 8))
    argv = [
        "update",
        "--model",
        str(tmp_path / "cnn.onnx"),
        "--data",
        str(tmp_path / "d.npz"),
        "--method",
        "shira-head",
    ]
    assert main([*argv, "--taps", "flat", "-o", "head=c2.weight"]) == 2
    err = capsys.readouterr().err
    assert "c2.weight" in err and "pass --taps" not in err


def test_logits_under_another_name_are_named_in_the_flags(tmp_path, capsys):
    """torch.onnx.export's user named the output 'y': with --taps the copy has two outputs, so the logits need naming;
    the refusal said only "needs a logits output"."""
    _cnn(tmp_path / "raw.onnx", out="y")
    import_onnx(tmp_path / "raw.onnx", tmp_path / "cnn.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.random((16, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 4, 16))
    argv = [
        "update",
        "--model",
        str(tmp_path / "cnn.onnx"),
        "--data",
        str(tmp_path / "d.npz"),
        "--method",
        "shira-head",
    ]
    assert main([*argv, "--taps", "auto"]) == 2
    err = capsys.readouterr().err
    assert "pass --taps flat -o head=fc.weight -o logit_output=y" in err, err
    assert main([*argv, "--taps", "flat", "-o", "head=fc.weight"]) == 2  # the right tensor, the logits unnamed
    err = capsys.readouterr().err
    assert "-o logit_output=NAME" in err and "pass --taps" not in err, err
    assert main([*argv, "--taps", "flat", "-o", "head=fc.weight", "-o", "logit_output=y", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["samples_seen"] == 16
