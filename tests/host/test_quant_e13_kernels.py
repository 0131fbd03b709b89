"""Static int8 of a model whose average pool runs in ceil mode (every Hugging Face EfficientNet's pooler).

``torch.nn.AvgPool2d(k, ceil_mode=True)`` exports as ``AveragePool(ceil_mode=1, count_include_pad=1)``. onnxruntime
1.32's integer kernel for it (``QLinearAveragePool``, fused from QDQ) divides a window that runs past the input by
the whole kernel, where the float op and torch divide by the cells inside: EfficientNet's pooler (a kernel wider than
the map) came out as zeros and its static twin was refused at cosine 0.0 (tiny random EfficientNet, on N(0,1) inputs
and on the matrix's samples alike). Without pads, ``count_include_pad=0`` is the same function and the integer kernel
computes it right: static quantization rewrites the attribute so, and the pool stays quantized. A pool with pads is
kept in float. A pool without the overhang (floor mode) is quantized as it was.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from edge.cpu_int8 import u8s8_saturates  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from exporters.quantize import quantize_onnx  # noqa: E402

SEVEN = u8s8_saturates() is not False  # this CPU's U8S8 kernels saturate on full-range weights: 7-bit ones


class _Pooled(torch.nn.Module):
    """Conv -> SiLU -> AvgPool2d(kernel, ceil_mode) -> Linear: EfficientNet's tail in miniature."""

    def __init__(self, kernel: int, ceil: bool, pad: int = 0) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = torch.nn.AvgPool2d(kernel, ceil_mode=ceil, padding=pad)
        self.fc = torch.nn.Linear(8 * (1 if kernel > 4 else 4), 4)

    def forward(self, x):
        return self.fc(self.pool(torch.nn.functional.silu(self.conv(x))).flatten(1))


def _export(path, kernel: int, ceil: bool, pad: int = 0):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)  # the conv's map: 4x4
    export_onnx(
        _Pooled(kernel, ceil, pad).eval(), (x,), path, input_names=["x"], output_names=["y"], name="p", progress=False
    )
    return path


def _pool(path):
    return next(n for n in onnx.load(str(path)).graph.node if n.op_type == "AveragePool")


X = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)  # N(0,1), as edge quantize makes


def _attrs(node) -> dict:
    return {a.name: a.i for a in node.attribute if a.name in ("ceil_mode", "count_include_pad")}


@pytest.mark.parametrize("kernel", [128, 3])  # wider than the 4x4 map (EfficientNet's pooler); 3 over 4: overhangs
def test_a_ceil_mode_average_pool_is_rewritten_and_the_static_twin_is_kept(tmp_path, kernel):
    src = _export(tmp_path / "m.onnx", kernel, ceil=True)
    pool = _pool(src)
    assert _attrs(pool) == {"ceil_mode": 1, "count_include_pad": 1}  # what torch writes for AvgPool2d(ceil_mode)
    report = quantize_onnx(src, tmp_path / "q.onnx", mode="static", calib={"x": X}, reduce_range=SEVEN)
    assert report.cosine["y"] > 0.99  # was 0.75 with kernel 3 (refused); EfficientNet (the slow test below): 0.0
    q = onnx.load(str(tmp_path / "q.onnx"))
    node = next(n for n in q.graph.node if n.name == pool.name)
    assert _attrs(node) == {"ceil_mode": 1, "count_include_pad": 0}  # the same function without pads
    producer = {o: n.op_type for n in q.graph.node for o in n.output}
    assert producer[node.input[0]] == "DequantizeLinear"  # still quantized: the integer kernel computes it right
    assert sorted(report.quantized) == ["conv.weight", "fc.weight"]  # the weight ops are int8 as before
    assert _attrs(_pool(src))["count_include_pad"] == 1  # the float model itself is left as it was


def test_a_ceil_mode_average_pool_with_pads_stays_float(tmp_path):
    """With pads, count_include_pad counts them: the pool is left out of quantization and the check judges."""
    src = _export(tmp_path / "m.onnx", 3, ceil=True, pad=1)
    pool = _pool(src).name
    report = quantize_onnx(src, tmp_path / "q.onnx", mode="static", calib={"x": X}, reduce_range=SEVEN)
    q = onnx.load(str(tmp_path / "q.onnx"))
    node = next(n for n in q.graph.node if n.name == pool)
    assert _attrs(node) == {"ceil_mode": 1, "count_include_pad": 1}
    assert report.cosine["y"] > 0.98


def test_the_pool_is_quantized_where_its_kernel_is_exact(tmp_path):
    """Floor mode has no overhang: onnxruntime's integer pool agrees with the float one, and it stays quantized."""
    src = _export(tmp_path / "m.onnx", 2, ceil=False)
    pool = _pool(src).name
    report = quantize_onnx(src, tmp_path / "q.onnx", mode="static", calib={"x": X}, reduce_range=SEVEN)
    assert report.cosine["y"] > 0.99
    q = onnx.load(str(tmp_path / "q.onnx"))
    node = next(n for n in q.graph.node if n.name == pool)
    producer = {o: n.op_type for n in q.graph.node for o in n.output}
    assert producer[node.input[0]] == "DequantizeLinear"  # its input is quantized: the QDQ pool onnxruntime fuses


@pytest.mark.slow
def test_a_tiny_hf_efficientnet_static_twin_is_no_longer_refused(tmp_path):
    """The model that was refused: test_hf_families' tiny EfficientNet (cosine 0.0 before, on N(0,1) inputs)."""
    pytest.importorskip("transformers")
    from test_hf_families import FAMILIES, SEQ, build

    from exporters.hf import export_hf_encoder

    model, side = build("efficientnet"), FAMILIES["efficientnet"][1]
    export_hf_encoder(model, tmp_path / "m.onnx", image_size=side, seq_len=None if side else SEQ, progress=False)
    x = np.random.default_rng(0).standard_normal((36, 3, side, side)).astype(np.float32)
    calib = {"pixel_values": x}
    report = quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", mode="static", calib=calib, reduce_range=SEVEN)
    assert report.cosine["embeddings"] > 0.99
