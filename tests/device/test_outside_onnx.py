"""`edge import-onnx` on files as other tools write them, and on files no tool should hand it.

Weights an exporter left in Constant nodes, float16 and already-quantized graphs, and sources that
are not regular ONNX files (FIFO, folder, symlink loop, /dev/zero, empty, truncated) or an --out
that cannot be written: each is imported correctly or refused with a typed error naming what to
do (exit 2 and one line on the command line), with nothing written.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
import yaml  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.devices import load_profile  # noqa: E402
from edge.errors import AdapterMismatchError, ConfigError, FormatError  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from tests.device.test_import_onnx_device import LAYOUTS, feeds, foreign_model, run_original  # noqa: E402


def as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every initializer moved into a Constant node (as some converters write it)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in m.graph.initializer]
    nodes = consts + list(m.graph.node)
    del m.graph.initializer[:]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m)
    return m


def mlp(dtype=np.float32) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(dtype), "fc1.weight")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 16)).astype(dtype), "fc2.weight")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "fc1.weight"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "fc2.weight"], ["y"], transB=1),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", elem, ["n", 8])],
        [helper.make_tensor_value_info("y", elem, ["n", 4])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def cli(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and re.match(r"edge( [a-z-]+)?: error: ", lines[0]), err  # "edge X:": usage
    return lines[0]


def test_weights_in_constant_nodes_are_found_switched_and_undone_bit_exactly(tmp_path):
    original = as_constants(foreign_model())
    onnx.save(original, tmp_path / "m.onnx")
    report = import_onnx(tmp_path / "m.onnx", tmp_path / "m.edge.onnx")
    assert set(report.info.tensors) == set(LAYOUTS)
    assert {k: t.shape for k, t in report.info.tensors.items()} == {k: v[0] for k, v in LAYOUTS.items()}
    assert sorted(report.info.extra["imported"]["constants_hoisted"]) == sorted(LAYOUTS)
    rng = np.random.default_rng(5)
    deltas = {}
    for name, (shape, _, _) in LAYOUTS.items():
        flat = rng.choice(int(np.prod(shape)), size=3, replace=False)
        deltas[name] = (
            np.stack(np.unravel_index(flat, shape)).astype(np.int32),
            rng.standard_normal(3).astype(np.float32),
        )
    sparse = {k: SparseDelta(*d) for k, d in deltas.items()}
    adapter = Adapter("a", report.info.fingerprint, sparse, {k: v[0] for k, v in LAYOUTS.items()})
    with Runtime(tmp_path / "m.edge.onnx", strategy="rebuild") as rt:
        base = rt.run(feeds())["y"]
        np.testing.assert_allclose(base, run_original(foreign_model()), atol=1e-5)
        before = {k: np.array(rt.weights(k)) for k in LAYOUTS}
        rt.load_adapter(adapter)
        rt.switch("a")
        np.testing.assert_allclose(rt.run(feeds())["y"], run_original(foreign_model(), deltas), atol=1e-5)
        rt.switch(None)
        assert all(np.array_equal(before[k].view(np.uint32), np.array(rt.weights(k)).view(np.uint32)) for k in LAYOUTS)
        np.testing.assert_array_equal(rt.run(feeds())["y"], base)


def test_float16_weights_are_refused_naming_the_float32_export(tmp_path):
    onnx.save(mlp(np.float16), tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match=r"fc1.weight.*stored as float16.*export the model in float32"):
        import_onnx(tmp_path / "m.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_a_model_quantized_by_onnxruntime_is_refused_naming_edge_quantize(tmp_path, capsys):
    quantization = pytest.importorskip("onnxruntime.quantization")
    onnx.save(mlp(), tmp_path / "m.onnx")
    quantization.quantize_dynamic(tmp_path / "m.onnx", tmp_path / "q.onnx", weight_type=quantization.QuantType.QInt8)
    with pytest.raises(
        ConfigError, match=r"already quantized \(.*MatMulInteger.*\): import the float model.*edge quantize"
    ):
        import_onnx(tmp_path / "q.onnx", tmp_path / "out.onnx")
    assert "already quantized" in cli(
        ["import-onnx", str(tmp_path / "q.onnx"), "--out", str(tmp_path / "o.onnx")], capsys
    )
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "o.onnx").exists()


def _fifo(p):
    os.mkfifo(p)


def _folder(p):
    p.mkdir()


def _loop(p):
    p.symlink_to(p.name)


def _zero(p):
    p.symlink_to("/dev/zero")


def _empty(p):
    p.write_bytes(b"")


def _truncated(p):
    p.write_bytes(mlp().SerializeToString()[:300])


def _outside_data(p):  # external data through a symlink to /dev/zero, beside the model
    model = mlp()
    onnx.save(model, p, save_as_external_data=True, location="w.data", size_threshold=0)
    (p.parent / "w.data").unlink()
    (p.parent / "w.data").symlink_to("/dev/zero")


SOURCES = {
    "FIFO": (_fifo, "not a regular file"),
    "folder": (_folder, "a folder"),
    "symlink loop": (_loop, "symbolic links"),
    "/dev/zero": (_zero, "not a regular file"),
    "missing": (lambda p: None, "No such file"),
    "empty": (_empty, "graph has no nodes"),
    "truncated": (_truncated, "not a readable ONNX file"),
    "external data to /dev/zero": (_outside_data, "cannot read its external data"),
}


@pytest.mark.parametrize("case", SOURCES, ids=list(SOURCES))
def test_unreadable_sources_are_typed_errors_and_exit_2(tmp_path, case, capsys):
    make, match = SOURCES[case]
    src = tmp_path / "m.onnx"
    make(src)
    with pytest.raises(FormatError, match=match):
        import_onnx(src, tmp_path / "out.onnx")
    assert match in cli(["import-onnx", str(src), "--out", str(tmp_path / "out.onnx")], capsys)
    assert not (tmp_path / "out.onnx").exists()


def test_external_data_is_read_in_and_stored_inline(tmp_path):
    onnx.save(mlp(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    import_onnx(tmp_path / "m.onnx", tmp_path / "out" / "m.edge.onnx")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.edge.onnx"]
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    want = ort.InferenceSession(mlp().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with Runtime(tmp_path / "out" / "m.edge.onnx") as rt:
        np.testing.assert_allclose(rt.run({"x": x})["y"], want, atol=1e-6)


def test_an_out_path_that_is_a_folder_is_a_typed_error(tmp_path, capsys):
    onnx.save(mlp(), tmp_path / "m.onnx")
    (tmp_path / "out.onnx").mkdir()
    with pytest.raises(ConfigError, match="cannot write .*out.onnx.*give --out a file path"):
        import_onnx(tmp_path / "m.onnx", tmp_path / "out.onnx")
    line = cli(["import-onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "out.onnx")], capsys)
    assert "argument --out: cannot write" in line and "is a folder" in line  # refused at parse time
    assert list((tmp_path / "out.onnx").iterdir()) == []


@pytest.mark.parametrize("case", ["FIFO", "folder"])
def test_profile_says_a_model_or_adapter_that_is_no_regular_file_is_not_one(tmp_path, case, capsys):
    make, _ = SOURCES[case]
    onnx.save(mlp(), tmp_path / "m.onnx")
    import_onnx(tmp_path / "m.onnx", tmp_path / "m.edge.onnx")
    make(tmp_path / "x.onnx")
    line = cli(["profile", str(tmp_path / "x.onnx"), "--device", "x86-dev", "-q"], capsys)
    kind = {"FIFO": "a FIFO (named pipe)", "folder": "a folder"}[case]
    assert f"x.onnx is {kind}, not a regular file" in line
    make(tmp_path / "a.safetensors")
    argv = ["profile", str(tmp_path / "m.edge.onnx"), "--device", "x86-dev", "-q", "--adapters"]
    assert f"a.safetensors is {kind}, not a regular file" in cli([*argv, str(tmp_path / "a.safetensors")], capsys)


def _model_with(x_shape, weight) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("dims", [[16, 4], [10**9, 10**9]], ids=["short", "huge"])
def test_a_weight_whose_data_does_not_fit_its_declared_shape_is_a_format_error(tmp_path, dims, capsys):
    w = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=dims, raw_data=b"\0" * 8)
    (tmp_path / "m.onnx").write_bytes(_model_with(["n", 16], w).SerializeToString())
    with pytest.raises(FormatError, match="declared shape does not fit"):
        import_onnx(tmp_path / "m.onnx", tmp_path / "out.onnx")
    assert "re-export it" in cli(["import-onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "o.onnx")], capsys)


def test_profile_refuses_to_generate_a_huge_declared_input_before_allocating(tmp_path, capsys):
    w = numpy_helper.from_array(np.ones((16, 4), np.float32), "w")
    onnx.save(_model_with([10**12, 16], w), tmp_path / "m.onnx")
    import_onnx(tmp_path / "m.onnx", tmp_path / "m.edge.onnx")
    line = cli(["profile", str(tmp_path / "m.edge.onnx"), "--device", "x86-dev", "-q"], capsys)
    # the device's memory budget refuses it first: its activations at the declared shape are predicted
    assert "no onnxruntime strategy fits the memory budget of 4096 MB" in line
    data = yaml.safe_load(open(load_profile("x86-dev").source).read())
    data.update(name="roomy", budgets={**data["budgets"], "memory_mb": 10**12})
    (tmp_path / "roomy.yaml").write_text(yaml.safe_dump(data))
    argv = ["profile", str(tmp_path / "m.edge.onnx"), "--device", "roomy", "--devices-dir", str(tmp_path), "-q"]
    line = cli(argv, capsys)  # a budget that admits it: the inputs the profile generates are refused before allocating
    assert "declares shape [1000000000000, 16]" in line and "pass --inputs X.npz" in line


def _refusals(info):
    """Adapters the runtime must refuse, each in the torch layout of the foreign model's stored (often transposed)
    weights: out of range per axis though in range as a flat offset, negative, wrong dtype, another model's,
    integer values for a float base, and a fusion that overflows."""
    shapes = {k: v[0] for k, v in LAYOUTS.items()}

    def one(name, idx, values, fingerprint=info.fingerprint, qvalues=None):
        delta = SparseDelta(np.asarray(idx), np.asarray(values), qvalues)
        return Adapter("bad", fingerprint, {name: delta}, {name: shapes[name]})

    v = np.float32([0.5])
    return {
        "column past a transposed weight": (one, ("w1", [[0], [3]], v)),  # (6, 3): flat offset 3 exists
        "row past a folded conv": (one, ("conv_hwio", [[3], [0], [0], [0]], v)),
        "negative index": (one, ("emb", [[-1], [0]], v)),
        "int64 indices": (one, ("w2", np.array([[0], [0]], np.int64), v)),
        "another model": (one, ("w2", [[0], [0]], v, "sha256:" + "0" * 32)),
        "int8 values on a float base": (one, ("w2", [[0], [0]], v, info.fingerprint, np.int8([3]))),
        "overflowing fusion": (one, ("w4", [[0], [0]], np.float32([3e38]))),
    }


def test_every_refusal_on_a_foreign_model_leaves_the_switched_weights_bit_exact(tmp_path):
    onnx.save(foreign_model(), tmp_path / "m.onnx")
    info = import_onnx(tmp_path / "m.onnx", tmp_path / "m.edge.onnx").info
    shapes = {k: v[0] for k, v in LAYOUTS.items()}
    good = {k: SparseDelta(np.zeros((len(s), 1), np.int32), np.float32([0.25])) for k, s in shapes.items()}
    with Runtime(tmp_path / "m.edge.onnx", strategy="bound") as rt:
        rt.load_adapter(Adapter("good", info.fingerprint, good, shapes))
        rt.switch("good")
        before = {k: np.array(rt.weights(k)) for k in LAYOUTS}
        out = rt.run(feeds())["y"]
        refused = []
        for case, (make, args) in _refusals(info).items():
            try:
                rt.load_adapter(make(*args), "bad")
                rt.switch({"good": 1.0, "bad": 2.0})
            except (AdapterMismatchError, ConfigError, FormatError) as e:
                refused.append(case)
                assert str(e), case
            if "bad" in rt.adapters:  # loaded, refused at the switch
                rt.unload_adapter("bad")
            assert rt.active == {"good": 1.0}, case
            assert all(
                np.array_equal(before[k].view(np.uint32), np.array(rt.weights(k)).view(np.uint32)) for k in LAYOUTS
            )
            np.testing.assert_array_equal(rt.run(feeds())["y"], out)
        assert refused == list(_refusals(info))


def test_a_weight_on_the_left_of_a_matmul_is_said_not_silently_left_out(tmp_path):
    """``W @ x`` (weight as MatMul's first operand) is not a layout the adapters address: reported in ``skipped``
    with why, beside the ``x @ V`` weight that is adapted; a constant table times a weight is not reported."""
    rng = np.random.default_rng(0)
    w, v = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((5, 2)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["w", "x"], ["h"]), helper.make_node("MatMul", ["h", "v"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "left",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    report = import_onnx(tmp_path / "m.onnx", tmp_path / "o.onnx")
    assert list(report.info.tensors) == ["v"]
    assert "left operand" in report.skipped["w"] and "v" not in report.skipped


def test_a_tied_weight_stored_twice_is_said(tmp_path, capsys):
    """An embedding reused as the output projection, stored as two initializers (the table and its transpose):
    both are targets, and the report says they hold the same values, so an adapter on one leaves the other."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((7, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["h"]), helper.make_node("MatMul", ["h", "out"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 7])],
        [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(emb.T.copy(), "out")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    report = import_onnx(tmp_path / "m.onnx", tmp_path / "o.onnx")
    assert sorted(report.info.tensors) == ["emb", "out"]
    assert report.info.extra["imported"]["tied"] == {"out": "emb"}
    assert main(["import-onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "o2.onnx")]) == 0
    assert '"out": "emb"' in capsys.readouterr().out
