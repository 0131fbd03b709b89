"""`edge import-onnx` on a graph written with onnx.helper (no torch): every weight path and layout, then switching."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import ConfigError, FormatError  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

HWIO_TO_OIHW = [3, 2, 0, 1]

#: initializer -> (torch shape, stored -> torch layout, torch -> stored layout)
LAYOUTS = {
    "conv_hwio": ((3, 2, 3, 3), lambda s: s.transpose(HWIO_TO_OIHW), lambda t: t.transpose(2, 3, 1, 0)),
    "w1": ((6, 3), lambda s: s.T, lambda t: t.T),  # MatMul reads [in, out]
    "w2": ((5, 6), lambda s: s, lambda t: t),  # Gemm transB=1 reads [out, in]
    "w3_flat": ((4, 5), lambda s: s.reshape(5, 4).T, lambda t: t.T.reshape(2, 10)),  # Reshape, then MatMul
    "w4": ((4, 4), lambda s: s.T, lambda t: t.T),  # Gemm transB=0
    "emb": ((10, 4), lambda s: s, lambda t: t),  # Gather: an embedding table
}


def foreign_model(share_conv_weight: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    stored = {
        "conv_hwio": rng.standard_normal((3, 3, 2, 3)),
        "w1": rng.standard_normal((3, 6)),
        "w2": rng.standard_normal((5, 6)),
        "w3_flat": rng.standard_normal((2, 10)),
        "w4": rng.standard_normal((4, 4)),
        "emb": rng.standard_normal((10, 4)),
        "b2": rng.standard_normal(5),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in stored.items()]
    inits.append(numpy_helper.from_array(np.array([5, 4], np.int64), "w3_shape"))
    nodes = [
        helper.make_node("Transpose", ["conv_hwio"], ["conv_w"], perm=HWIO_TO_OIHW),
        helper.make_node("Conv", ["x", "conv_w"], ["c"]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "w1"], ["h1"]),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["h2"], transB=1),
        helper.make_node("Reshape", ["w3_flat", "w3_shape"], ["w3"]),
        helper.make_node("MatMul", ["h2", "w3"], ["h3"]),
        helper.make_node("Gemm", ["h3", "w4"], ["h4"]),
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("Add", ["h4", "e"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])]
    if share_conv_weight:  # the HWIO tensor is also read as it is: folding it would change that reader
        nodes.append(helper.make_node("ReduceSum", ["conv_hwio"], ["s"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    graph = helper.make_graph(
        nodes,
        "tf2onnx",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 5, 5]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]),
        ],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="handmade")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((3, 2, 5, 5)).astype(np.float32), "ids": np.array([0, 9, 4])}


def run_original(model: onnx.ModelProto, torch_deltas=None) -> np.ndarray:
    """The foreign file on a plain session, with deltas given in torch layout merged into its stored tensors."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if torch_deltas and t.name in torch_deltas:
            _, to_torch, to_stored = LAYOUTS[t.name]
            w = to_torch(numpy_helper.to_array(t)).copy()
            idx, values = torch_deltas[t.name]
            w[tuple(idx)] += values
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(to_stored(w)), t.name))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], feeds())[0]


def test_every_weight_path_is_found_in_torch_layout(tmp_path):
    model = foreign_model()
    onnx.save(model, tmp_path / "m.onnx")
    report = import_onnx(tmp_path / "m.onnx", tmp_path / "m.edge.onnx")
    info = report.info
    assert {k: (t.shape, t.transposed) for k, t in info.tensors.items()} == {
        "conv_hwio": ((3, 2, 3, 3), False),  # folded: stored as OIHW, the Transpose dropped
        "w1": ((6, 3), True),
        "w2": ((5, 6), False),
        "w3_flat": ((4, 5), True),  # folded: stored as the [5, 4] MatMul reads
        "w4": ((4, 4), True),
        "emb": ((10, 4), False),
    }
    assert sorted(report.folded) == ["conv_hwio", "w3_flat"] and not report.skipped
    assert info.inputs == ("x", "ids") and info.outputs == ("y",) and info.name == "m"
    out = onnx.load(tmp_path / "m.edge.onnx")
    assert [n.op_type for n in out.graph.node if n.op_type in ("Transpose", "Reshape")] == []
    with Runtime(tmp_path / "m.edge.onnx") as rt:
        for name, (_, to_torch, _) in LAYOUTS.items():
            want = to_torch(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)))
            np.testing.assert_array_equal(rt.weights(name), want)
        np.testing.assert_allclose(rt.run(feeds())["y"], run_original(model), atol=1e-6)


def test_adapters_in_torch_layout_switch_and_undo_bit_exactly(tmp_path):
    model = foreign_model()
    onnx.save(model, tmp_path / "m.onnx")
    info = import_onnx(tmp_path / "m.onnx", tmp_path / "m.edge.onnx").info
    rng = np.random.default_rng(2)
    deltas, torch_deltas = {}, {}
    for name, (shape, _, _) in LAYOUTS.items():
        flat = rng.choice(int(np.prod(shape)), size=4, replace=False)
        idx = np.stack(np.unravel_index(flat, shape)).astype(np.int32)
        values = rng.standard_normal(4).astype(np.float32)
        deltas[name], torch_deltas[name] = SparseDelta(idx, values), (idx, values)
    adapter = Adapter("a", info.fingerprint, deltas, {k: v[0] for k, v in LAYOUTS.items()})
    with Runtime(tmp_path / "m.edge.onnx", strategy="rebuild") as rt:
        base = rt.run(feeds())["y"]
        rt.load_adapter(adapter)
        rt.switch("a")
        np.testing.assert_allclose(rt.run(feeds())["y"], run_original(model, torch_deltas), atol=1e-5)
        rt.switch(None)
        np.testing.assert_array_equal(rt.run(feeds())["y"], base)


def test_names_by_value_and_what_cannot_be_folded(tmp_path):
    model = foreign_model(share_conv_weight=True)
    onnx.save(model, tmp_path / "m.onnx")
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    params = {
        "fc1.weight": arrays["w1"].T.copy(),
        "fc2.weight": arrays["w2"],
        "gpt2_conv1d.weight": arrays["w4"],  # stored [in, out] in torch too (HF Conv1D): not transposed
        "embed.weight": arrays["emb"],
        "dropped.weight": np.ones((2, 2), np.float32),
    }
    report = import_onnx(tmp_path / "m.onnx", tmp_path / "n.onnx", state_dict=params)
    assert report.renamed == {
        "w1": "fc1.weight",
        "w2": "fc2.weight",
        "w4": "gpt2_conv1d.weight",
        "emb": "embed.weight",
    }
    assert report.info.tensors["gpt2_conv1d.weight"].transposed is False
    assert report.unmatched == ("w3_flat",) and report.missing == ("dropped.weight",)
    assert "conv_hwio" in report.skipped and "conv_hwio" not in report.info.tensors  # read in two layouts
    with Runtime(tmp_path / "n.onnx") as rt:
        np.testing.assert_array_equal(rt.weights("fc1.weight"), params["fc1.weight"])


def test_bad_inputs_are_refused(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x00not onnx")
    with pytest.raises(FormatError, match="not a readable ONNX file"):
        import_onnx(tmp_path / "junk.onnx", tmp_path / "o.onnx")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "relu.onnx")
    with pytest.raises(ConfigError, match="no initializers"):
        import_onnx(tmp_path / "relu.onnx", tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()
    onnx.save(foreign_model(), tmp_path / "m.onnx")
    import_onnx(tmp_path / "m.onnx", tmp_path / "once.onnx")
    with pytest.raises(ConfigError, match="already carries 'edge' metadata"):
        import_onnx(tmp_path / "once.onnx", tmp_path / "twice.onnx")


def test_import_runs_on_a_device_install(tmp_path):
    """The command with torch, transformers, the exporters and the lab blocked (a device has none of them)."""
    import subprocess
    import sys
    from pathlib import Path

    onnx.save(foreign_model(), tmp_path / "m.onnx")
    code = (
        "import importlib.abc, sys, argparse\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'peft', 'exporters', 'lab'):\n"
        "            raise ImportError(name + ' is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from edge.commands import import_onnx\n"
        "p = argparse.ArgumentParser(); import_onnx.register(p.add_subparsers())\n"
        "args = p.parse_args(sys.argv[1:]); sys.exit(args.func(args))\n"
    )
    argv = ["import-onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "o.onnx"), "--targets", "w*"]
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    assert '"targets": 4' in r.stdout
    with Runtime(tmp_path / "o.onnx") as rt:
        assert sorted(rt.info.tensors) == ["w1", "w2", "w3_flat", "w4"]
