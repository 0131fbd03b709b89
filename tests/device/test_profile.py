"""`edge profile`: the figures it measures, its reports, its errors, and that it runs without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from _blocking import BLOCK_TORCH

from edge.cli import main
from edge.errors import BackendUnavailableError, ConfigError
from edge.format.io import write_json
from edge.profiling import ProfileConfig, format_markdown, generate_inputs, plot, profile_model

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
MODEL = GOLDEN / "tiny-mlp-v1.onnx"
ADAPTER = GOLDEN / "adapter-v1.safetensors"
FAST = ProfileConfig(runs=7, warmup=2, switches=3, progress=False)


def _profile_file(folder: Path, name: str, **overrides) -> Path:
    data = yaml.safe_load((ROOT / "devices" / "x86-dev.yaml").read_text())
    data.update(name=name, **overrides)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def result():
    return profile_model(MODEL, "x86-dev", adapters=[ADAPTER], config=FAST)


def test_figures_are_measured(result):
    lat = result["latency_ms"]
    assert lat["n"] == 7 and len(lat["samples"]) == 7 and lat["warmup"] == 2
    assert 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert result["load_ms"] > 0 and result["first_inference_ms"] > 0
    assert result["providers"] == ["CPUExecutionProvider"] and result["providers_requested"] == ["CPUExecutionProvider"]
    assert result["strategy"] == "hybrid" and result["backend"] == "onnxruntime"
    assert result["model"]["bytes"] == MODEL.stat().st_size
    assert result["memory"]["peak_rss_mb"] > 1
    assert result["inputs"] == {"x": {"shape": [1, 10], "dtype": "float32", "source": "generated"}}
    assert result["device"]["name"] == "x86-dev" and result["device"]["fallback_warning"] is None
    assert result["accuracy"] is None  # CPU ran: nothing to compare against


def test_adapter_figures(result):
    (a,) = result["adapters"]
    assert a["name"] == "golden-a" and a["bytes"] == ADAPTER.stat().st_size and a["load_ms"] > 0
    for key in ("switch_ms", "first_run_after_switch_ms", "settle_ms", "switch_back_ms"):
        assert a[key]["n"] == 3 and a[key]["min"] >= 0
    assert result["switch_p95_ms"] == pytest.approx(a["switch_ms"]["p95"])
    from edge.runtime import Runtime

    with Runtime(MODEL) as rt:  # the bytes the runtime keeps for the adapter, as it reports them itself
        name = rt.load_adapter(ADAPTER)
        assert a["held_bytes"] == rt.adapter_bytes[name] > 0


def test_budgets_against_the_profile(result):
    b = result["budgets"]
    assert set(b) == {"memory_mb", "load_ms", "latency_p95_ms", "switch_p95_ms"}
    assert b["latency_p95_ms"] == {
        "budget": 20.0,
        "measured": result["latency_ms"]["p95"],
        "ok": b["latency_p95_ms"]["ok"],
    }
    assert b["memory_mb"]["ok"] is True  # a 10x20x2 MLP stays far under 4 GB


def test_tiny_budgets_are_reported_over(tmp_path):
    # 17 MB: the model's predicted footprint fits (hybrid about 1 MB), the process's peak (python + onnxruntime) not
    tight = {"memory_mb": 17.0, "load_ms": 0.001, "latency_p95_ms": 0.00001, "switch_p95_ms": 0.00001}
    r = profile_model(MODEL, _profile_file(tmp_path, "tight", budgets=tight), adapters=[ADAPTER], config=FAST)
    assert [v["ok"] for v in r["budgets"].values()] == [False] * 4
    assert "| **no** |" in format_markdown(r)


@pytest.mark.parametrize("memory_mb, strategy", [(4096.0, "hybrid"), (None, "bound")])
def test_the_strategy_profiled_is_the_one_the_memory_budget_picks_on_the_device(tmp_path, memory_mb, strategy):
    """``edge profile`` measured hybrid where ``Runtime(model, device=...)`` runs bound (a budget only bound fits)."""
    import edge
    from runtimes.onnxruntime import OrtBackend

    if memory_mb is None:  # between the two predictions: only bound fits
        memory_mb = sum(OrtBackend.footprint_mb(MODEL, s) for s in ("bound", "hybrid")) / 2
    budgets = {"memory_mb": memory_mb, "load_ms": 5000.0, "latency_p95_ms": 20.0, "switch_p95_ms": 5.0}
    device = _profile_file(tmp_path, "small", budgets=budgets)
    with edge.Runtime(MODEL, device=device) as rt:
        assert rt.strategy == strategy
    assert profile_model(MODEL, device, config=FAST)["strategy"] == strategy


def test_a_memory_budget_no_strategy_fits_is_refused_as_on_the_device(tmp_path):
    """It profiled (and reported "over") a model the device itself refuses to load."""
    import edge
    from runtimes.onnxruntime import OrtBackend

    under = OrtBackend.footprint_mb(MODEL, "bound") * 0.9  # under every strategy's prediction
    budgets = {"memory_mb": under, "load_ms": 5000.0, "latency_p95_ms": 20.0, "switch_p95_ms": 5.0}
    device = _profile_file(tmp_path, "tiny", budgets=budgets)
    with pytest.raises(ConfigError, match="no onnxruntime strategy fits the memory budget of"):
        edge.Runtime(MODEL, device=device)
    with pytest.raises(ConfigError, match="no onnxruntime strategy fits the memory budget of"):
        profile_model(MODEL, device, config=FAST)


def test_no_adapters_means_no_switch_figures():
    r = profile_model(MODEL, "x86-dev", config=FAST)
    assert r["adapters"] == [] and r["switch_p95_ms"] is None and r["budgets"]["switch_p95_ms"]["ok"] is None


def test_json_and_markdown(result, tmp_path):
    write_json(tmp_path / "p.json", result)
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads(json.dumps(result))
    md = format_markdown(result)
    assert md.startswith("## tiny-mlp-v1 on device profile `x86-dev`")
    assert "| inference p95 (ms) |" in md and "| golden-a |" in md and "CPUExecutionProvider" in md


def test_plot_when_matplotlib_is_there(result, tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plot(result, tmp_path / "p.png") is False and not (tmp_path / "p.png").exists()
        return
    assert plot(result, tmp_path / "p.png") is True
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("batch", [1, 3])
def test_generated_inputs_follow_the_model(batch):
    feeds = generate_inputs(MODEL, ["x"], batch=batch)
    assert list(feeds) == ["x"] and feeds["x"].shape == (batch, 10) and feeds["x"].dtype == np.float32


@pytest.mark.parametrize(
    "arrays, words",
    [({"x": np.zeros((2, 10), np.float32)}, None), ({"pixels": np.zeros((1, 10), np.float32)}, ["missing ['x']"])],
)
def test_inputs_from_npz(tmp_path, arrays, words):
    np.savez(tmp_path / "in.npz", **arrays)
    if words is None:
        r = profile_model(MODEL, "x86-dev", inputs=tmp_path / "in.npz", config=FAST)
        assert r["inputs"]["x"]["shape"] == [2, 10] and r["inputs"]["x"]["source"] == str(tmp_path / "in.npz")
        return
    with pytest.raises(ConfigError) as e:
        profile_model(MODEL, "x86-dev", inputs=tmp_path / "in.npz", config=FAST)
    assert all(w in str(e.value) for w in words) and "['x']" in str(e.value)


def test_fallback_cpu_is_recorded_and_error_raises(tmp_path):
    wants_cuda = [{"backend": "onnxruntime", "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}]
    lenient = _profile_file(tmp_path, "lenient", backends=wants_cuda, fallback="cpu")
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    r = profile_model(MODEL, lenient, config=FAST)
    assert "CUDAExecutionProvider" in r["device"]["fallback_warning"]
    assert r["providers_requested"] == ["CPUExecutionProvider"] and r["providers"] == ["CPUExecutionProvider"]
    assert "**Fallback:**" in format_markdown(r)
    strict = _profile_file(tmp_path, "strict", backends=wants_cuda, fallback="error")
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        profile_model(MODEL, strict, config=FAST)


def test_accuracy_check_against_cpu():
    from edge.devices import load_profile
    from edge.profiling import _check_against_cpu

    feeds = generate_inputs(MODEL, ["x"])
    from edge.runtime import Runtime

    with Runtime(MODEL) as rt:
        out = rt.run(feeds)
    prof = load_profile("x86-dev")
    same = _check_against_cpu(MODEL, "onnxruntime", ["FakeExecutionProvider"], prof, feeds, out)
    assert same["ok"] is True and same["max_abs_diff"] == {"logits": 0.0}
    off = _check_against_cpu(
        MODEL, "onnxruntime", ["FakeExecutionProvider"], prof, feeds, {"logits": out["logits"] + 1}
    )
    assert off["ok"] is False and off["max_abs_diff"]["logits"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--device", "no-such-board"], ["unknown device profile 'no-such-board'", "x86-dev"]),
        (["--device", "x86-dev", "--runs", "0"], ["--runs must be at least 1"]),
        (
            ["--device", "x86-dev", "--adapters", "missing.safetensors"],
            ["adapter file missing.safetensors does not exist"],
        ),
        (["--device", "qualcomm-qnn"], ["QNNExecutionProvider", "not available here"]),
        (["--device", "x86-dev", "--engine-rounds", "-1"], ["--engine-rounds must be 0 or more, got -1"]),
    ],
)
def test_cli_errors_exit_2(capsys, args, words):
    assert main(["profile", str(MODEL), "-q", *args]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words)


def test_cli_writes_reports(tmp_path, capsys):
    argv = ["profile", str(MODEL), "--device", "x86-dev", "--adapters", str(ADAPTER), "-q", "--runs", "3"]
    argv += ["--warmup", "0", "--switches", "1", "--json", str(tmp_path / "p.json"), "--md", str(tmp_path / "p.md")]
    assert main(argv) == 0
    assert "| golden-a |" in capsys.readouterr().out
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["format"] == "edge.profiling" and data["latency_ms"]["n"] == 3
    assert (tmp_path / "p.md").read_text() == format_markdown(data)
    # by default what Runtime(model, device=...) runs (auto); the golden .tflite beside it is another model (its
    # own name): the report says so, and the .onnx is the only engine, chosen without measuring
    why = "tiny-mlp-v1.tflite is another model than tiny-mlp-v1.onnx (its name differs)"
    only = {"backend": "onnxruntime", "path": str(MODEL), "reason": "onnxruntime: the only engine that can run it here"}
    assert data["backend"] == "onnxruntime"
    assert data["engines"] == {"comparison": None, "skipped": {"tflite": why}, "choice": only}
    assert f"- tflite not compared: {why}" in (tmp_path / "p.md").read_text()
    argv += ["--engine-rounds", "0", "--backend", "onnxruntime"]
    assert main(argv) == 0
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["backend"] == "onnxruntime" and data["engines"] is None  # pinned, and no comparison asked for


PROFILE_NO_TORCH = (
    BLOCK_TORCH
    + """
from edge.cli import main
model, adapter = sys.argv[1:]
assert main(["devices"]) == 0
assert main(["profile", model, "--device", "rpi4", "--adapters", adapter, "-q", "--runs", "2", "--warmup", "0"]) == 0
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
"""
)


def test_profile_and_devices_run_without_torch():
    r = subprocess.run(
        [sys.executable, "-c", PROFILE_NO_TORCH, str(MODEL), str(ADAPTER)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "qualcomm-qnn" in r.stdout and "## tiny-mlp-v1 on device profile `rpi4`" in r.stdout
