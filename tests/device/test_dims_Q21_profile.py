"""``edge profile`` under dims: the engines beside it, the inputs it makes, ``--batch`` (review O21 F2, F4, S4, S5).

Before: with a named backend, the engines beside the model were compared without the dims (a "choice" auto never
makes under them, F2); inputs were generated from the file asked for, not the engine auto chose, so ``edge profile
M.tflite --device D --dim batch=2`` (the .onnx twin runs) failed "can generate inputs only for .onnx models" (F4),
as did any asked .tflite for which auto chose the .onnx (S5); ``--batch N --dim batch=M`` ignored --batch silently
(S4). Now the comparison applies the dims as auto does (:func:`edge.engine_cache.with_dims`), inputs come from the
chosen engine's specs (sizes the dims fix included), and a contradicting ``--batch`` is refused in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from edge import engines  # noqa: E402
from edge.profiling import ProfileConfig, profile_model  # noqa: E402
from tests.device.test_elsewhere_onnx import _one_line  # noqa: E402

DIGITS = Path.home() / ".cache" / "edge" / "digits-07d9c19ac5e7"
X86 = (Path(__file__).resolve().parents[2] / "devices" / "x86-dev.yaml").read_text()
QUICK = ProfileConfig(runs=2, warmup=0, switches=1, progress=False, engine_rounds=1, engine_runs=1)
_RUN = ["--runs", "2", "--warmup", "0", "--switches", "1", "--engine-rounds", "0", "-q"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    if not (DIGITS / "encoder.onnx").is_file() or not (DIGITS / "encoder.tflite").is_file():
        pytest.skip("make demo has not built the digits encoder and its .tflite")
    pytest.importorskip("ai_edge_litert")
    tmp = tmp_path_factory.mktemp("q21prof")
    for name in ("encoder.onnx", "encoder.tflite"):
        shutil.copy(DIGITS / name, tmp / name)
    return tmp


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_ENGINE_CACHE", str(tmp_path / "engines"))


def _profile(tmp: Path, extra: str = "", name: str = "q21prof", only_onnx: bool = False) -> Path:
    text = X86.replace("name: x86-dev", f"name: {name}")
    if only_onnx:  # the tflite entry removed: auto has the .onnx alone
        start = text.index("  - backend: tflite")
        text = text[:start] + text[text.index("threads:") :]
    path = tmp / f"{name}.yaml"
    path.write_text(text + extra)
    return path


def test_the_engines_beside_a_named_backend_are_compared_under_the_dims(digits, tmp_path, monkeypatch):
    result = profile_model(digits / "encoder.onnx", "x86-dev", backend="onnxruntime", config=QUICK, dims={"batch": 2})
    report = result["engines"]
    assert result["dims"] == {"batch": 2} and report["comparison"] is None and report["choice"] is None
    assert "dims {'batch': 2} given: encoder.tflite on tflite takes none" in report["skipped"]["tflite"]
    profiled = profile_model(digits / "encoder.onnx", _profile(tmp_path, "dims: {batch: 3}\n"), config=QUICK)
    assert profiled["dims"] == {"batch": 3} and profiled["inputs"]["pixels"]["shape"] == [3, 1, 8, 8]
    assert "(the device profile's) apply to encoder.onnx" in profiled["engines"]["skipped"]["tflite"]
    from runtimes.litert import LiteRTBackend

    seen = []
    monkeypatch.setattr(LiteRTBackend, "TAKES_DIMS", True)  # two engines that take dims: both compared with them
    monkeypatch.setattr(engines, "compare_engines", lambda found, feeds, **kw: seen.append(found) or {})
    monkeypatch.setattr(engines, "decide", lambda found, figures, skipped: engines.unmeasured("m", found[:1], {}))
    engines.engine_report(digits / "encoder.onnx", None, {}, rounds=1, runs=1, dims={"batch": 2})
    assert [(e.backend, e.dims) for e in seen[0]] == [("onnxruntime", (("batch", 2),)), ("tflite", (("batch", 2),))]


def test_profile_of_a_tflite_with_dims_generates_from_the_onnx_that_runs(digits, tmp_path, capsys):
    from edge.cli import main

    out = tmp_path / "p.json"
    argv = ["profile", str(digits / "encoder.tflite"), "--device", "x86-dev", "--dim", "batch=2", "--json", str(out)]
    assert main([*argv, *_RUN]) == 0
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["backend"] == "onnxruntime" and Path(result["model"]["path"]).name == "encoder.onnx"
    assert result["dims"] == {"batch": 2} and result["inputs"]["pixels"]["shape"] == [2, 1, 8, 8]


def test_profile_of_a_tflite_for_which_auto_chose_the_onnx_without_dims(digits, tmp_path):
    result = profile_model(digits / "encoder.tflite", _profile(tmp_path, only_onnx=True), backend="auto", config=QUICK)
    assert result["backend"] == "onnxruntime" and result["dims"] == {}
    assert result["inputs"]["pixels"] == {"shape": [1, 1, 8, 8], "dtype": "float32", "source": "generated"}


def test_a_batch_that_contradicts_the_dims_exits_2_with_one_line(digits, tmp_path, capsys):
    argv = ["profile", str(digits / "encoder.onnx"), "--device", "x86-dev", "--backend", "onnxruntime"]
    line = _one_line([*argv, "--dim", "batch=2", "--batch", "3", *_RUN], capsys)
    assert "--batch 3 contradicts dims batch=2" in line and "give --dim batch=3" in line
    profiled = _profile(tmp_path, "dims: {batch: 4}\n")
    line = _one_line(
        ["profile", str(digits / "encoder.onnx"), "--device", str(profiled), "--batch", "2", *_RUN], capsys
    )
    assert "--batch 2 contradicts dims batch=4" in line
    result = profile_model(digits / "encoder.onnx", "x86-dev", backend="onnxruntime", config=QUICK, dims={"batch": 2})
    assert result["inputs"]["pixels"]["shape"] == [2, 1, 8, 8]  # --batch left at 1: the dims size it
