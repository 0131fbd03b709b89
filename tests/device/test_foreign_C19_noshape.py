"""An ONNX graph input with no ``shape`` at all (unknown rank), as several converters write fully dynamic inputs.

Before: ``edge import-onnx`` refused such a file. Now it is imported; its :class:`~edge.format.feeds.InputSpec` has
``shape=None``, and every consumer of specs does what it can: ``Runtime.run``, updates and the samples check
accept any rank and check the dtype; a shape the model cannot run is a ConfigError naming the input (not
onnxruntime's own exception); inputs are generated only where a shape is known (else: pass --inputs); the fold
check at import is skipped with a warning saying what to do; ``edge quantize`` (onnx's checker refuses the file)
says how to give the shapes, and the re-import keeps the fingerprint.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from edge.format.feeds import InputSpec, check_feeds, generate_inputs, onnx_input_specs  # noqa: E402
from edge.format.samples import check_headers  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from tests.device.test_elsewhere_onnx import _one_line  # noqa: E402

RNG = np.random.default_rng(19)
W1 = RNG.standard_normal((8, 6)).astype(np.float32)
W2 = RNG.standard_normal((6, 3)).astype(np.float32)


def free_mlp(fold: bool = False) -> onnx.ModelProto:
    """features = relu(x @ w1) @ w2 with ``x`` declaring no shape; ``fold``: w1 stored [6, 8] and read through a
    Reshape to [8, 6] (a layout the import folds, then checks on onnxruntime)."""
    vi = helper.make_tensor_value_info
    x = vi("x", TensorProto.FLOAT, None)
    x.type.tensor_type.ClearField("shape")
    nodes = [
        helper.make_node("MatMul", ["x", "w1r" if fold else "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["features"]),
    ]
    inits = [numpy_helper.from_array(W1.reshape(6, 8) if fold else W1, "w1"), numpy_helper.from_array(W2, "w2")]
    if fold:
        inits.append(numpy_helper.from_array(np.array([8, 6], np.int64), "to"))
        nodes.insert(0, helper.make_node("Reshape", ["w1", "to"], ["w1r"]))
    graph = helper.make_graph(nodes, "g", [x], [vi("features", TensorProto.FLOAT, ["n", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _want(x):
    return np.maximum(x @ W1, 0) @ W2


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("noshape")
    onnx.save(free_mlp(), tmp / "m.onnx")
    report = import_onnx(tmp / "m.onnx", tmp / "m.edge.onnx")
    return tmp, report


def test_imported_with_an_input_of_any_rank(imported):
    tmp, report = imported
    assert sorted(report.info.tensors) == ["w1", "w2"] and report.info.inputs == ("x",)
    written = onnx.load(tmp / "m.edge.onnx")
    assert not written.graph.input[0].type.tensor_type.HasField("shape")  # kept as the file had it
    assert onnx_input_specs(written) == {"x": InputSpec("x", np.dtype(np.float32), None)}


def test_the_runtime_runs_any_rank_and_checks_the_dtype(imported):
    tmp, _ = imported
    with Runtime(tmp / "m.edge.onnx") as rt:
        for shape in ((2, 8), (2, 5, 8), (8,)):
            x = RNG.standard_normal(shape).astype(np.float32)
            np.testing.assert_allclose(rt.run({"x": x})["features"], _want(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(ConfigError, match="input 'x' must be float32, got float64"):
            rt.run({"x": np.ones((2, 8))})
        with pytest.raises(ConfigError, match=r"input\(s\) \['x'\] declare no shape in the model file"):
            rt.run({"x": np.ones((2, 7), np.float32)})  # onnxruntime's MatMul refuses it: said as a ConfigError
        with pytest.raises(ConfigError, match="refused feed"):
            rt.run({"x": np.ones((2, 8), np.float32), "w1": W1})


def test_feed_and_sample_checks_accept_any_rank_but_not_any_dtype():
    specs = {"x": InputSpec("x", np.dtype(np.float32), None), "ids": InputSpec("ids", np.dtype(np.int64), ("n", 4))}
    out = check_feeds({"x": np.ones((3, 2, 2), np.float32)[:, ::2], "ids": np.zeros((3, 4), np.int32)}, specs)
    assert out["x"].shape == (3, 1, 2) and out["x"].flags.c_contiguous and out["ids"].dtype == np.int64
    with pytest.raises(ConfigError, match="input 'x' must be float32, got int64"):
        check_feeds({"x": np.ones(3, np.int64), "ids": np.zeros((3, 4), np.int64)}, specs)
    headers = {"x": ((5, 2, 9), np.dtype(np.float32)), "y": ((5,), np.dtype(np.int64))}
    check_headers("s.npz", headers, ("x",), {"x": specs["x"]})  # any rank: accepted
    headers["x"] = ((5, 2, 9), np.dtype(np.float64))
    with pytest.raises(ConfigError, match="'x' is float64; input 'x' takes float32"):
        check_headers("s.npz", headers, ("x",), {"x": specs["x"]})


def test_inputs_are_generated_only_where_a_shape_is_known(imported, tmp_path, capsys):
    tmp, _ = imported
    with pytest.raises(ConfigError, match=r"declares no shape \(not even its rank\).*pass --inputs X.npz"):
        generate_inputs(tmp / "m.edge.onnx", ["x"])
    line = _one_line(["profile", str(tmp / "m.edge.onnx"), "--device", "x86-dev", "--runs", "2"], capsys)
    assert "input 'x' of m.edge.onnx declares no shape" in line and "--inputs" in line
    np.savez(tmp_path / "in.npz", x=RNG.standard_normal((2, 8)).astype(np.float32))
    args = ["profile", str(tmp / "m.edge.onnx"), "--device", "x86-dev", "--inputs", str(tmp_path / "in.npz")]
    assert main([*args, "--runs", "2", "--warmup", "1", "--switches", "1"]) == 0


def test_the_fold_check_says_it_could_not_run_and_the_import_is_written(tmp_path, caplog):
    onnx.save(free_mlp(fold=True), tmp_path / "m.onnx")
    with caplog.at_level(logging.WARNING, logger="edge.convert.onnx_import"):
        report = import_onnx(tmp_path / "m.onnx", tmp_path / "o.onnx")
    assert report.folded == ("w1",)
    assert "not checked against the original: input 'x' declares no shape" in caplog.text
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    with Runtime(tmp_path / "o.onnx") as rt:
        np.testing.assert_allclose(rt.run({"x": x})["features"], _want(x), rtol=1e-5, atol=1e-5)


def test_quantize_says_how_to_give_the_shapes_and_the_reimport_keeps_the_fingerprint(imported, tmp_path, capsys):
    tmp, report = imported
    line = _one_line(["quantize", str(tmp / "m.edge.onnx"), "--out", str(tmp_path / "q.onnx")], capsys)
    assert "input/output 'x' declares no shape" in line and "make_tensor_value_info(name, elem_type" in line
    assert not (tmp_path / "q.onnx").exists()
    shaped = free_mlp()  # as the message says
    shaped.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]))
    onnx.save(shaped, tmp_path / "s.onnx")
    again = import_onnx(tmp_path / "s.onnx", tmp_path / "s.edge.onnx")
    assert again.info.fingerprint == report.info.fingerprint  # adapters made for one load on the other
