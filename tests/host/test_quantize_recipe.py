"""Static int8 recipes (issue 18): what onnxruntime really runs, calibration, excluded nodes, activation grids."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge.cpu_int8 import u8s8_saturates  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from exporters.qshira import activation_grid, quantized_base, train_shira_int  # noqa: E402
from exporters.quantize import quantize_onnx  # noqa: E402
from exporters.shira import make_masks, select_targets  # noqa: E402


class Shared(torch.nn.Module):
    """One activation read by three linear layers (like Q, K and V), then a head: a shared quantized tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(16, 32)
        self.q, self.k, self.v = (torch.nn.Linear(32, 32) for _ in range(3))
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.head(torch.relu(self.q(h)) * torch.sigmoid(self.k(h)) + self.v(h))


#: on a CPU whose U8S8 kernels saturate (x86 without VNNI) full-range int8 weights drift for that reason alone
#: (tests/host/test_int8cpu_saturation.py): these tests, about recipes, quantize to 7 bits there
SEVEN_BITS = u8s8_saturates() is not False


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    model = Shared().eval()
    export_onnx(
        model, (torch.rand(8, 16),), d / "m.onnx", input_names=["x"], output_names=["y"], name="shared", progress=False
    )
    data = np.random.default_rng(0).standard_normal((128, 16)).astype(np.float32)
    return model, d / "m.onnx", data


def test_uint8_activations_leave_no_weight_op_in_float_where_int8_ones_do(exported, tmp_path):
    _, path, data = exported
    common = {"mode": "static", "calib": {"x": data}, "reduce_range": SEVEN_BITS}
    s8 = quantize_onnx(path, tmp_path / "s8.onnx", activation_type="int8", **common)
    u8 = quantize_onnx(path, tmp_path / "u8.onnx", **common)  # the default: uint8
    # onnxruntime keeps the MatMuls reading the shared int8 activation in float, over weights dequantized every run
    assert s8.float_compute and set(s8.float_compute) <= _weight_ops(path)
    assert u8.float_compute == []
    assert u8.info.extra["quantization"]["activation_type"] == "uint8"
    assert u8.info.extra["quantization"]["calibrate_method"] == "minmax"
    assert "float_compute" in u8.as_dict() and min(u8.cosine.values()) > 0.98


def _weight_ops(path) -> set[str]:
    import onnx

    return {n.name for n in onnx.load(str(path)).graph.node if n.op_type in ("MatMul", "Gemm")}


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_calibration_methods_give_a_checked_model(exported, tmp_path, method):
    _, path, data = exported
    report = quantize_onnx(
        path, tmp_path / "q.onnx", mode="static", calib={"x": data}, calibrate_method=method, reduce_range=SEVEN_BITS
    )
    assert report.info.extra["quantization"]["calibrate_method"] == method
    assert min(report.cosine.values()) > 0.98 and report.float_compute == []


def test_unknown_options_are_refused_before_any_work(exported, tmp_path):
    _, path, data = exported
    with pytest.raises(ConfigError, match="calibrate_method 'kl'.*methods"):
        quantize_onnx(path, tmp_path / "q.onnx", mode="static", calib={"x": data}, calibrate_method="kl")
    with pytest.raises(ConfigError, match="headroom"):
        quantize_onnx(
            path,
            tmp_path / "q.onnx",
            mode="static",
            calib={"x": data},
            extra_options={"TensorQuantOverrides": {}},
        )
    assert not (tmp_path / "q.onnx").exists()


def test_excluded_nodes_keep_their_weights_float_targets(exported, tmp_path):
    import onnx

    _, path, data = exported
    proto = onnx.load(str(path))
    inits = {t.name for t in proto.graph.initializer}
    first = next(n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & inits)
    by_name = quantize_onnx(path, tmp_path / "a.onnx", mode="static", calib={"x": data}, nodes_to_exclude=[first.name])
    stem = quantize_onnx(path, tmp_path / "b.onnx", mode="static", calib={"x": data}, float_first=True)
    for report in (by_name, stem):
        assert "inp.weight" in report.float_targets and "inp.weight" not in report.quantized
        assert {"q.weight", "k.weight", "v.weight", "head.weight"} <= set(report.quantized)
        assert report.info.extra["quantization"]["float_nodes"] == [first.name]  # stated in the model metadata
    with pytest.raises(ConfigError, match="no node of the graph.*'nope'"):
        quantize_onnx(path, tmp_path / "c.onnx", mode="static", calib={"x": data}, nodes_to_exclude=["nope"])


def test_activation_grids_bring_the_torch_model_to_what_the_static_graph_computes(exported, tmp_path):
    import onnxruntime as ort

    model, path, data = exported
    out = tmp_path / "q.onnx"
    quantize_onnx(path, out, mode="static", calib={"x": data}, headroom=2.0)
    grids = activation_grid(out)
    assert {"inp.weight", "q.weight", "k.weight", "v.weight", "head.weight"} == set(grids)
    assert all(g.input is not None and g.output is not None for g in grids.values())
    assert all(g.input.bounds == (0, 255) for g in grids.values())  # uint8 activations
    info, base = quantized_base(out)
    want = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["y"], {"x": data})[0]
    weights = {k: v.detach() for k, v in model.named_parameters()}
    weights.update({k: torch.as_tensor(b.dequantized()) for k, b in base.items()})
    from exporters.qshira import _hooks  # the hooks train_shira_int installs, checked against onnxruntime here

    with torch.no_grad():
        plain = torch.func.functional_call(model, weights, (torch.as_tensor(data),)).numpy()
        handles = _hooks(model, grids)
        try:
            snapped = torch.func.functional_call(model, weights, (torch.as_tensor(data),)).numpy()
        finally:
            for h in handles:
                h.remove()
    err_plain, err_snapped = np.abs(plain - want).mean(), np.abs(snapped - want).mean()
    assert err_snapped < 0.5 * err_plain  # the grids are the graph's: most of the static error is reproduced
    after = torch.func.functional_call(model, weights, (torch.as_tensor(data),)).detach().numpy()
    np.testing.assert_array_equal(after, plain)  # hooks removed: the model is left as it was

    y = (model(torch.as_tensor(data)).argmax(1).numpy() + 1) % 4
    masks = make_masks(model, select_targets(model), density=0.1, kind="wm")
    trained = train_shira_int(model, masks, base, data, y, epochs=5, lr=2e-2, activations=grids)
    assert set(trained) == set(masks) and all(q is not None for _, _, q in trained.values())


def test_activation_grids_of_a_dynamic_model_are_empty(exported, tmp_path):
    _, path, data = exported
    quantize_onnx(path, tmp_path / "d.onnx", mode="dynamic", calib={"x": data})
    assert activation_grid(tmp_path / "d.onnx") == {}
