"""Models and adapters the outside audits need, built once per test session (no ``edge demo`` cache, no torch).

A fresh checkout (CI) has no ``~/.cache/edge``: tests that read the demo's files skipped there and checked
nothing. These session fixtures (registered by ``tests/conftest.py``) build small stand-ins with the tiny
builders (:mod:`_tiny`, :mod:`_tiny_tflite`), the project's quantizer (``exporters.quantize_onnx``), its device
trainer (SHiRA adapters of the MLPs; a conv filter, which it does not adapt, gets ``_tiny.random_adapter``'s
entries) and its tapper (the detector head).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

NAMES = ("rotate", "noise", "blur")  # the demo's adapter names
SUFFIX = {"onnxruntime": ".safetensors", "tflite": ".tflite.safetensors"}


@dataclass(frozen=True)
class Kit:
    """One model for both backends (the same weights), three SHiRA adapters for each, a batch to run, and the
    ONNX model tapped with a detector head; what ``edge demo`` leaves for the digits ViT."""

    models: dict  # backend -> model file
    adapters: dict  # backend -> {adapter name -> file}
    feed: dict  # input name -> batch
    head_model: Path


def _trained(model: Path, names, seed: int = 0, classes: int = 4) -> dict:
    """One SHiRA adapter per name, trained by the device trainer on its own labelling of one batch: far apart."""
    from edge.learn.device_trainer import DeviceTrainer
    from edge.learn.space import Arch

    trainer = DeviceTrainer(model, epochs=30, seed=seed)
    x = np.random.default_rng(seed).standard_normal((96, 10)).astype(np.float32)
    out = {}
    for i, name in enumerate(names):
        y = (np.arange(len(x)) * (i + 1) + i) % classes
        out[name] = trainer.train(Arch("shira", 0.3, "tail"), x, y, name)
    return out


@pytest.fixture(scope="session")
def mlp_kit(tmp_path_factory) -> Kit:
    """The tiny MLP (``x[B,10] -> logits[B,4]``) as ``.onnx`` and ``.tflite``, the demo's three adapter names."""
    import _tiny  # (lazily: conftest imports this module at start, before any test asks)
    import _tiny_tflite  # LiteRT's schema: imported when a test asks for a .tflite

    from edge.route.taps import Head, tap_model

    d = tmp_path_factory.mktemp("mlp-kit")
    sizes = (10, 32, 4)
    _tiny.make_mlp(d / "encoder.onnx", seed=3, sizes=sizes)
    tinfo = _tiny_tflite.make_mlp(d / "encoder.tflite", seed=3, sizes=sizes)
    adapters = {b: {} for b in SUFFIX}
    for name, a in _trained(d / "encoder.onnx", NAMES).items():
        adapters["onnxruntime"][name] = a.save(d / f"shira-{name}.safetensors")
        # the demo's LiteRT adapters: the ONNX ones, rebased on the .tflite file (lab.pipeline does the same)
        rebased = replace(a, base_fingerprint=tinfo.fingerprint)
        adapters["tflite"][name] = rebased.save(d / f"shira-{name}{SUFFIX['tflite']}")
    head = tap_model(d / "encoder.onnx", d / "encoder.tapped-head.onnx", ["h2"], head=Head(domains=3, classes=4))
    x = np.random.default_rng(7).standard_normal((4, sizes[0])).astype(np.float32)
    models = {"onnxruntime": d / "encoder.onnx", "tflite": d / "encoder.tflite"}
    return Kit(models, adapters, {"x": x}, Path(head.path))


def _conv_onnx(path: Path, seed: int = 0):
    """x[B,4,6,6] -> Conv 3x3 (a BatchNorm scale folded into its filter, recorded) -> Relu -> mean -> Gemm."""
    import _tiny
    from onnx import TensorProto, helper

    from edge.format.modelinfo import TensorInfo

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((5, 4, 3, 3)).astype(np.float32) * 0.5
    s = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    fc = rng.standard_normal((3, 5)).astype(np.float32) * 0.5
    stored = {"conv.weight": w * s[:, None, None, None], "conv.bias": np.full(5, 0.1, np.float32), "fc.weight": fc}
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight"], ["logits"], transB=1),
    ]
    tensors = {
        "conv.weight": TensorInfo("conv.weight", (5, 4, 3, 3), channel_scale=tuple(float(v) for v in s)),
        "fc.weight": TensorInfo("fc.weight", (3, 5)),
    }
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6, 6])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])]
    return _tiny.write_model(path, "tiny-conv", nodes, inputs, outputs, stored, tensors)


@pytest.fixture(scope="session")
def small_models(tmp_path_factory) -> dict[str, Path]:
    """Small stand-ins for each of the demo's digits models (key -> file): a conv net with a folded BatchNorm
    scale (ONNX and LiteRT), int8 twins (onnxruntime's dynamic and static QDQ quantization of the MLP, static of
    the conv net; LiteRT's dynamic-range and full-integer MLP), and folders of float SHiRA adapters of the float
    MLP and conv net (``mlp-float-adapters``, ``conv-float-adapters``: ``shira-rotate/noise.safetensors``)."""
    import _tiny
    import _tiny_tflite

    from exporters.quantize import quantize_onnx

    d = tmp_path_factory.mktemp("small-models")
    out = {"mlp": d / "mlp.onnx", "conv": d / "conv.onnx", "conv-tflite": d / "conv.tflite"}
    infos = {"mlp": _tiny.make_mlp(out["mlp"], seed=4, sizes=(10, 24, 3)), "conv": _conv_onnx(out["conv"])}
    _tiny_tflite.make_conv(out["conv-tflite"], seed=2, scale=True)
    rng = np.random.default_rng(11)
    calib = {"mlp": {"x": rng.standard_normal((64, 10)).astype(np.float32)}}
    calib["conv"] = {"x": rng.standard_normal((64, 4, 6, 6)).astype(np.float32)}
    for src in ("mlp", "conv"):
        out[f"{src}-int8-static"] = d / f"{src}.static.onnx"
        quantize_onnx(out[src], out[f"{src}-int8-static"], mode="static", calib=calib[src], headroom=2.0)
    out["mlp-int8-dynamic"] = d / "mlp.dynamic.onnx"
    quantize_onnx(out["mlp"], out["mlp-int8-dynamic"], mode="dynamic", calib=calib["mlp"], headroom=2.0)
    out["mlp-int8-tflite"] = d / "mlp.dynamic.tflite"
    _tiny_tflite.make_int8_mlp(out["mlp-int8-tflite"], seed=5)
    out["mlp-int8-static-tflite"] = d / "mlp.static.tflite"
    _tiny_tflite.make_int8_mlp(out["mlp-int8-static-tflite"], seed=6, static=True)
    for src in ("mlp", "conv"):  # float adapters of the float model, for its int8 twin
        folder = d / f"{src}-float-adapters"
        folder.mkdir()
        for name, a in _float_adapters(out[src], infos[src], trained=src == "mlp").items():
            a.save(folder / f"shira-{name}.safetensors")
        out[f"{src}-float-adapters"] = folder
    return out


def _float_adapters(model: Path, info, trained: bool) -> dict:
    """Float SHiRA adapters "rotate" and "noise" of a float model: the device trainer's (``trained``: it adapts 2-D
    linears), or entries of every target, conv filters included, drawn by ``_tiny.random_adapter``."""
    import _tiny

    if trained:
        return _trained(model, ("rotate", "noise"), classes=3)
    return {n: _tiny.random_adapter(info, seed, density=0.3, name=n) for seed, n in enumerate(("rotate", "noise"))}


@pytest.fixture(scope="session")
def large_fp32_onnx(tmp_path_factory) -> Path:
    """A float32 ONNX model of about 92 MB (MiniLM's export is 88 MB): too large for a small board's budget."""
    import _tiny
    from onnx import TensorProto, helper

    from edge.format.modelinfo import TensorInfo

    rng = np.random.default_rng(0)
    d_in, d_hid = 1000, 24_000
    block = rng.standard_normal((d_in, 24), dtype=np.float32)  # drawn small, tiled: a draw of 24M is seconds
    stored = {"fc1.weight": np.tile(block, (1, d_hid // 24)), "fc2.weight": np.ones((2, d_hid), np.float32)}
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["h1"]),
        helper.make_node("Gemm", ["h1", "fc2.weight"], ["logits"], transB=1),
    ]
    tensors = {
        "fc1.weight": TensorInfo("fc1.weight", (d_hid, d_in), transposed=True),
        "fc2.weight": TensorInfo("fc2.weight", (2, d_hid)),
    }
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])]
    path = tmp_path_factory.mktemp("large") / "large-mlp.onnx"
    _tiny.write_model(path, "large-mlp", nodes, inputs, outputs, stored, tensors)
    return path


@pytest.fixture(scope="session")
def embedding_tflite(tmp_path_factory) -> Path:
    """A ``.tflite`` whose int32 ``input_ids`` index a 1000-row ``EMBEDDING_LOOKUP`` table (a text encoder's first
    op, as litert-torch writes it)."""
    import _tiny_tflite

    path = tmp_path_factory.mktemp("embedding") / "embedding.tflite"
    _tiny_tflite.make_embedding(path, rows=1000)
    return path
