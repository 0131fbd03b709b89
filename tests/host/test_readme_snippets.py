"""README's Python snippets and shell commands, run as a newcomer copies them, so they cannot go stale.

Each snippet is cut from README.md at run time and executed as written, in a temporary folder that holds the
files it names (built here: a tiny encoder with the input ``pixels``, its adapters, its int8 twin) and with the
names it leaves to the reader bound (``x``, ``target``, ``MyCNN``, ``loader``). Left out, with the reason: the
``q8 = ...`` line (an int8 ``.tflite`` needs the AI Edge Quantizer of ``.venv-tflite``) and the Hugging Face and
LiteRT export snippets (real folders, litert-torch). ``test_readme_commands`` checks the command table's flags;
here every ``edge ...`` line of a shell block must parse as given.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import write_model
from onnx import TensorProto, helper
from torch import nn

import edge
from edge.cli import build_parser
from edge.format.adapter import Adapter, SparseDelta
from edge.format.modelinfo import TensorInfo

README = Path(__file__).resolve().parents[2] / "README.md"
LINES = README.read_text().splitlines()


def _blocks(lang: str) -> list[tuple[int, list[str]]]:
    """Every fenced block of ``lang``: (the README line number of its first line, its lines)."""
    out, start = [], None
    for i, line in enumerate(LINES):
        if start is None and line == f"```{lang}":
            start = i + 1
        elif start is not None and line == "```":
            out.append((start + 1, LINES[start:i]))
            start = None
    return out


def _block_after(heading: str) -> list[str]:
    at = LINES.index(heading)
    return next(lines for first, lines in _blocks("python") if first > at)


def _run(code: str, where: str, ns: dict) -> dict:
    exec(compile(code, f"README.md ({where})", "exec"), ns)  # the README's own snippet, as written
    return ns


def _encoder(folder: Path) -> np.ndarray:
    """``encoder.onnx`` (pixels[B, 10] -> features[B, 20], logits[B, 4]) and its adapters ``rotate`` and ``noise``
    as ``shira-NAME.safetensors``; returns inputs for it."""
    rng = np.random.default_rng(0)
    stored = {
        "fc1.weight": (rng.standard_normal((10, 20)) * 0.5).astype(np.float32),
        "fc1.bias": np.zeros(20, np.float32),
        "head.weight": (rng.standard_normal((4, 20)) * 0.5).astype(np.float32),
        "head.bias": np.zeros(4, np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["pixels", "fc1.weight"], ["h0"]),
        helper.make_node("Add", ["h0", "fc1.bias"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["features"]),
        helper.make_node("Gemm", ["features", "head.weight", "head.bias"], ["logits"], transB=1),
    ]
    info = write_model(
        folder / "encoder.onnx",
        "readme-encoder",
        nodes,
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 10])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 20]),
        ],
        stored,
        {
            "fc1.weight": TensorInfo("fc1.weight", (20, 10), transposed=True),
            "head.weight": TensorInfo("head.weight", (4, 20)),
        },
    )
    for seed, name in enumerate(("rotate", "noise")):
        tensors = {}
        for target, t in info.tensors.items():
            flat = np.sort(rng.choice(int(np.prod(t.shape)), 8, replace=False))
            idx = np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)
            tensors[target] = SparseDelta(idx, (rng.standard_normal(8) * 0.05).astype(np.float32))
        shapes = {k: tuple(t.shape) for k, t in info.tensors.items()}
        Adapter(name, info.fingerprint, tensors, shapes, info={"seed": seed}).save(folder / f"shira-{name}.safetensors")
    return rng.standard_normal((3, 10)).astype(np.float32)


def _int8_twin(folder: Path) -> None:
    """``encoder-int8.onnx`` (exporters.quantize_onnx) and integer adapters ``shira-int-{rotate,noise}.safetensors``
    a few steps from its base."""
    from exporters.qshira import quantized_base
    from exporters.quantize import quantize_onnx

    rng = np.random.default_rng(1)
    calib = {"pixels": rng.standard_normal((64, 10)).astype(np.float32)}
    quantize_onnx(folder / "encoder.onnx", folder / "encoder-int8.onnx", mode="dynamic", calib=calib, headroom=3.0)
    info, base = quantized_base(folder / "encoder-int8.onnx")
    for name in ("rotate", "noise"):
        tensors, shapes = {}, {}
        for target, b in base.items():
            flat = np.sort(rng.choice(b.q.size, 6, replace=False))
            idx = np.stack(np.unravel_index(flat, b.q.shape)).astype(np.int32)
            q = np.clip(b.q[tuple(idx)].astype(np.int64) + rng.integers(-3, 4, flat.size), *b.bounds).astype(b.dtype)
            scale = np.broadcast_to(b.scale, b.q.shape)[tuple(idx)]
            tensors[target] = SparseDelta(idx, ((q - b.q[tuple(idx)].astype(np.float32)) * scale).astype(np.float32), q)
            shapes[target] = b.q.shape
        Adapter(name, info.fingerprint, tensors, shapes).save(folder / f"shira-int-{name}.safetensors")


def _api_parts() -> tuple[str, str, list[str]]:
    """The device API block in two parts (float model; int8 models), and the lines left out of the second."""
    lines = _block_after("## Python API (device side)")
    cut = next(i for i, line in enumerate(lines) if line.startswith("q = edge.Runtime("))
    left_out = [line for line in lines[cut:] if line.startswith("q8 = ")]
    return "\n".join(lines[:cut]), "\n".join(line for line in lines[cut:] if line not in left_out), left_out


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGE_ENGINE_CACHE", str(tmp_path / "engines"))
    return tmp_path


def test_device_api_float_part(folder, capsys):
    code, _, _ = _api_parts()
    ns = _run(code, "Python API, float model", {"x": _encoder(folder)})
    assert set(ns["out"]) == {"logits", "features"}  # every output when none is named
    assert ns["logits"].shape == (3, 4)
    np.testing.assert_allclose(ns["logits"], ns["out"]["logits"], atol=1e-6)  # same state, maybe other kernels
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("hybrid ") and printed[0].endswith(" {}")  # strategy auto; switch(None): none active
    assert "predicted_mb" in printed[1] and "measured_mb" in printed[1] and "adapters_mb" in printed[1]
    assert set(ast.literal_eval(printed[2])) == {"rotate", "noise"}  # adapter_bytes: the loaded adapters by name
    rt = ns["rt"]  # the last one: backend="auto" without a profile
    assert rt.engine_choice.backend == "onnxruntime" and rt.engine_choice.reason in printed[3]


def test_device_api_int8_part(folder, capsys):
    _, code, left_out = _api_parts()
    assert len(left_out) == 1 and 'backend="tflite"' in left_out[0]  # only the LiteRT int8 line is left out
    _encoder(folder)
    _int8_twin(folder)
    ns = _run(code, "Python API, int8 models", {"edge": edge, "target": "fc1.weight"})
    assert ns["q"].weights("fc1.weight").dtype == np.int8  # "a quantized target reads as int8"
    assert capsys.readouterr().out.split()[-1] == "int8"


class MyCNN(nn.Module):
    """A model of the reader's, as the snippet assumes one: BatchNorm and a depthwise conv, 3x32x32 in."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.conv2, self.fc = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.conv2(self.dw(self.bn(self.conv1(x)).relu())).relu().mean((2, 3)))


def test_own_torch_model_snippet(folder):
    torch.manual_seed(0)
    x = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    y = np.arange(16) % 10
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), 8)
    code = "\n".join(
        _block_after("### A torch model (CNN, transformer, anything with Linear, Conv or Embedding weights)")
    )
    ns = _run(code, "Your own model", {"MyCNN": MyCNN, "loader": loader, "x": x})
    assert ns["logits"].shape == (16, 10)
    assert ns["targets"] == ["conv1.weight", "dw.weight", "conv2.weight", "fc.weight"]
    assert ns["rt"].active == {} and (folder / "task-a.safetensors").is_file()
    with edge.Runtime(folder / "cnn.onnx") as fresh:  # "base weights back, bit-exact"
        for target in ns["targets"]:
            assert ns["rt"].weights(target).tobytes() == fresh.weights(target).tobytes()


def test_import_only_snippets_resolve():
    """A block of imports alone (the host API's names) imports as written: a renamed name fails here."""
    only = [
        (first, lines)
        for first, lines in _blocks("python")
        if all(s.startswith(("from ", "import ")) for s in (line.strip() for line in lines) if s)
    ]
    assert len(only) >= 2
    for first, lines in only:
        _run("\n".join(lines), f"line {first}", {})


def _commands() -> list[str]:
    """Every ``edge ...`` command of the README's shell blocks, continuation lines joined, venv prefix dropped."""
    out = []
    for _, lines in _blocks("sh"):
        joined = "\n".join(lines).replace("\\\n", " ")
        out += [line.strip().removeprefix(".venv-tflite/bin/") for line in joined.splitlines()]
    return [c for c in out if c.startswith("edge ")]


@pytest.mark.parametrize("command", _commands())
def test_shell_commands_parse(command):
    words = shlex.split(command, comments=True)[1:]
    try:
        build_parser().parse_args(words)
    except SystemExit as e:
        pytest.fail(f"README command `{command}` does not parse (exit {e.code})")


def test_shell_blocks_have_commands():
    assert len(_commands()) >= 15
