"""int8 weights two nodes read, integer tables that are not weights, and files quantized after import (issue 18).

torch's export writes a weight two modules share (a Linear applied twice) or two equal weights (the cloned layers
of ``nn.TransformerEncoder``) once, the second reader through an ``Identity``. onnxruntime's dynamic quantizer did
not look through it: one MatMul read the int8 copy, the other the float one, and ``edge quantize`` dropped the target
(4 of the 2-layer encoder's 5). Now both read the one int8 initializer, and an adapter written there reaches both
kernels under every strategy: outputs equal onnxruntime on a file with the merged integers written in, and undo is
bit-exact. An int8 table cast to float is listed under ``skipped`` at import (it was left out unsaid), and an
imported file onnxruntime's 4-bit quantizer rewrote (keeping the float copy for the second reader) is refused by
``edge inspect``/``read_model_info`` as a load refuses it, not described as loadable.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
oq = pytest.importorskip("onnxruntime.quantization")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import FormatError  # noqa: E402
from edge.fusion import SaturationError  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from exporters.quantize import quantize_onnx  # noqa: E402
from runtimes import read_model_info  # noqa: E402
from tests.host.test_outside_int8 import _adapter, _expected, _q, _stored, _written  # noqa: E402

STRATEGIES = ("hybrid", "bound", "rebuild")


class Twice(nn.Module):  # one Linear applied twice: one weight, two MatMul readers
    def __init__(self):
        super().__init__()
        self.l, self.h = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.h(self.l(torch.relu(self.l(x))).mean(1))


class Encoder(nn.Module):  # nn.TransformerEncoder clones its layer: torch's export stores equal weights once
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.e, self.h = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 3)

    def forward(self, x):
        return self.h(self.e(x).mean(1))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (imported float file, calibration feed, check feed)."""
    root, out = tmp_path_factory.mktemp("int8-shared"), {}
    for name, make in (("twice", Twice), ("encoder", Encoder)):
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        calib, x = rng.standard_normal((16, 5, 16)).astype(np.float32), rng.standard_normal((4, 5, 16))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                make().eval(),
                (torch.from_numpy(x[:2].astype(np.float32)),),
                str(root / f"{name}.onnx"),
                dynamo=False,
                opset_version=17,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "b"}},
            )
        import_onnx(root / f"{name}.onnx", root / f"{name}.edge.onnx")
        out[name] = (root / f"{name}.edge.onnx", {"x": calib}, {"x": x.astype(np.float32)})
    return out


@pytest.mark.parametrize("name,targets", [("twice", 2), ("encoder", 5)])
def test_a_weight_two_nodes_read_is_one_int8_target_written_for_both(models, tmp_path, name, targets):
    imported, calib, x = models[name]
    float_model = onnx.load(str(imported))
    weights = {t.initializer for t in read_model_info(imported).tensors.values()}
    shared = {n.input[0] for n in float_model.graph.node if n.op_type == "Identity"} & weights
    assert len(shared) == targets - 1  # the export reads the second use through an Identity (the head: once)
    report = quantize_onnx(imported, tmp_path / "q.onnx", calib=calib, mode="dynamic", reduce_range=True)
    info, qpath = report.info, tmp_path / "q.onnx"
    assert report.dropped == {} and len(report.quantized) == targets == len(info.tensors), report.dropped
    model = onnx.load(str(qpath))
    readers = {}
    for node in model.graph.node:
        for value in node.input:
            readers.setdefault(value, []).append(node.op_type)
    for t in info.tensors.values():  # every reader of a shared weight reads its one int8 copy
        assert t.quant is not None and t.initializer.endswith("_quantized")
        assert set(readers[t.initializer]) == {"MatMulInteger"}
    assert sum(len(readers[t.initializer]) >= 2 for t in info.tensors.values()) == len(shared)
    assert not {t.initializer[: -len("_quantized")] for t in info.tensors.values()} & set(readers)  # no float copy

    base, inits = _stored(qpath, info)
    rng = np.random.default_rng(1)
    a, b = _adapter(info, base, "a", rng), _adapter(info, base, "b", rng)
    f = _adapter(info, base, "f", rng, scale=float(max(inits[t.quant.scale].max() for t in _q(info))) * 80)
    specs = ["a", "f", {"a": 1.0, "b": 1.0}, None]
    pairs = [[(a, 1.0)], [(f, 1.0)], [(a, 1.0), (b, 1.0)], []]
    seen = []
    for strategy in STRATEGIES:
        with Runtime(qpath, strategy=strategy) as rt:
            for adapter in (a, b):
                rt.load_adapter(adapter)
            with pytest.raises(SaturationError, match="clip=True"):
                rt.load_adapter(f)
            rt.load_adapter(f, clip=True)
            seen += switch_exactly(rt, strategy, qpath, info, (base, inits), x, specs, pairs)
    assert len({o for s, o in seen if s == "a"}) == 1  # the three strategies computed the same


def test_static_quantization_of_the_shared_weights_keeps_them_too(models, tmp_path):
    imported, calib, _ = models["encoder"]
    report = quantize_onnx(imported, tmp_path / "q.onnx", calib=calib, mode="static", reduce_range=True)
    assert report.dropped == {} and len(report.quantized) == 5


def _cast_table() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "W")
    q = numpy_helper.from_array(rng.integers(-100, 100, (4, 6)).astype(np.int8), "Q")
    nodes = [
        helper.make_node("Cast", ["Q"], ["Qf"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "Qf"], ["m"]),
        helper.make_node("MatMul", ["m", "W"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [w, q],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_an_int8_table_cast_to_float_is_said_not_adapted(tmp_path):
    onnx.save(_cast_table(), str(tmp_path / "m.onnx"))
    report = import_onnx(tmp_path / "m.onnx", tmp_path / "out.onnx")
    assert list(report.info.tensors) == ["W"]
    assert report.skipped == {"Q": "stored as int8, cast to float with no scale (not adapted)"}
    with Runtime(tmp_path / "out.onnx") as rt:  # the table runs as stored
        x = np.ones((2, 4), np.float32)
        q = numpy_helper.to_array(_cast_table().graph.initializer[1]).astype(np.float32)
        w = numpy_helper.to_array(_cast_table().graph.initializer[0])
        np.testing.assert_allclose(rt.run({"x": x})["y"], x @ q @ w, rtol=1e-5)


def test_an_imported_file_quantized_to_4_bits_keeping_a_float_copy_is_refused_by_inspect(models, tmp_path, capsys):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    imported, _, _ = models["encoder"]
    quantizer = MatMulNBitsQuantizer(onnx.load(str(imported)), block_size=16, is_symmetric=True)
    quantizer.process()
    path = tmp_path / "q4.onnx"
    quantizer.model.save_model_to_file(str(path))
    model = onnx.load(str(path))
    names = {t.name for t in model.graph.initializer}
    info = read_model_info(imported)
    assert "MatMulNBits" in {n.op_type for n in model.graph.node}
    assert all(t.initializer in names for t in info.tensors.values())  # every target's float copy is kept
    said = r"quantized after export by another tool.*`edge quantize`"
    with pytest.raises(FormatError, match=r"`edge import-onnx`, but its graph has MatMulNBits: it was " + said):
        read_model_info(path)
    for strategy in STRATEGIES:
        with pytest.raises(FormatError, match=said):
            Runtime(path, strategy=strategy)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MatMulNBits" in err[0] and "edge quantize" in err[0], err
    assert main(["inspect", str(imported)]) == 0  # the float file it was made from is described


def test_an_edge_quantize_twin_whose_targets_stay_float_is_still_described(models, tmp_path, capsys):
    """AddQDQPairToWeight keeps each weight float behind a Q/DQ pair: an `edge quantize` twin, not a file quantized
    after import; inspect describes it and adapters write its float weights."""
    imported, calib, x = models["twice"]
    extra = {"AddQDQPairToWeight": True}
    report = quantize_onnx(imported, tmp_path / "q.onnx", calib=calib, mode="static", extra_options=extra)
    assert not report.quantized and sorted(report.float_targets) == sorted(report.info.tensors)
    assert read_model_info(tmp_path / "q.onnx").extra["quantization"]["mode"] == "static"
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "q.onnx")]) == 0
    with Runtime(tmp_path / "q.onnx", strategy="bound") as rt:
        assert rt.run(x)["y"].shape == (4, 3)


def switch_exactly(rt, strategy, qpath, info, stored, x, specs, pairs) -> list[tuple[str, bytes]]:
    """Switch ``rt`` (adapters loaded) to each spec (clip=True): the integers written are the expected ones (its
    clipped count too), the outputs a fresh session's of those weights, moved by every adapter; then back to the
    base, bit-exact. Returns ``(str(spec), output bytes)`` per spec."""
    base, inits = stored
    plain, seen = rt.run(x)["y"], []
    for spec, pair in zip(specs, pairs):
        want, clipped = _expected(info, base, inits, pair)
        rt.switch(spec, clip=True)
        rt.wait_settled(30)
        assert rt.clipped == clipped
        got = {k: np.ascontiguousarray(rt.weights(k)) for k in info.tensors}
        for k in info.tensors:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{strategy} {spec} {k}")
        out = rt.run(x)["y"]
        np.testing.assert_array_equal(out, _written(qpath, info, got).run(None, x)[0], err_msg=strategy)
        assert spec is None or np.abs(out - plain).max() > 0  # the writes reach the kernels
        seen.append((str(spec), out.tobytes()))
    assert rt.run(x)["y"].tobytes() == plain.tobytes()
    for k in info.tensors:
        assert rt.weights(k).tobytes() == np.ascontiguousarray(base[k]).tobytes()
    return seen
