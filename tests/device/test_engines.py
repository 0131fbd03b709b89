"""Engine choice: a model's files per backend found, compared by measurement, chosen with a reason.

The same tiny MLP is written as ``m.onnx`` (:mod:`_tiny`) and ``m.tflite`` (:mod:`_tiny_tflite`),
same weights, names and metadata, so the two engines must agree and either may win.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import _tiny
import numpy as np
import pytest
import yaml

from edge.devices import load_profile
from edge.engines import (
    EngineFile,
    choose_engine,
    compare_engines,
    decide,
    engine_report,
    find_engines,
    format_engines,
)
from edge.errors import BackendUnavailableError, ConfigError
from edge.profiling import ProfileConfig, format_markdown, profile_model

pytest.importorskip("ai_edge_litert")
import _tiny_tflite  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
X = {"x": np.random.default_rng(0).standard_normal((1, 10)).astype(np.float32)}


@pytest.fixture()
def pair(tmp_path) -> Path:
    _tiny.make_mlp(tmp_path / "m.onnx", seed=3)
    _tiny_tflite.make_mlp(tmp_path / "m.tflite", seed=3)
    return tmp_path / "m.onnx"


def _profile(tmp_path: Path, name: str, backends: list[str]) -> Path:
    data = yaml.safe_load((ROOT / "devices" / "x86-dev.yaml").read_text())
    data["backends"] = [b for b in data["backends"] if b["backend"] in backends]
    data["backends"].sort(key=lambda b: backends.index(b["backend"]))
    data["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_model_files_are_the_same_stem_with_each_backends_suffix(pair):
    from runtimes import model_files

    both = {"onnxruntime": pair, "tflite": pair.with_suffix(".tflite")}
    assert model_files(pair) == both and model_files(pair.with_suffix(".tflite")) == both
    pair.with_suffix(".tflite").unlink()
    assert model_files(pair) == {"onnxruntime": pair} and model_files(pair.with_name("none.onnx")) == {}


def test_finds_the_model_beside_itself_in_the_profiles_order(pair, tmp_path):
    found, skipped = find_engines(pair, load_profile("x86-dev"))
    assert found == [EngineFile("onnxruntime", pair), EngineFile("tflite", pair.with_suffix(".tflite"))]
    assert skipped == {}
    tfl_first = load_profile(_profile(tmp_path, "tfl-first", ["tflite", "onnxruntime"]))
    assert [e.backend for e in find_engines(pair, tfl_first)[0]] == ["tflite", "onnxruntime"]
    # without a profile: the file's own backend first, then the others installed
    assert [e.backend for e in find_engines(pair.with_suffix(".tflite"))[0]] == ["tflite", "onnxruntime"]


def test_what_is_left_out_is_named_with_the_reason(pair, tmp_path):
    only_ort = load_profile(_profile(tmp_path, "ort-only", ["onnxruntime"]))
    found, skipped = find_engines(pair, only_ort)
    assert [e.backend for e in found] == ["onnxruntime"]
    assert skipped == {"tflite": "device profile 'ort-only' does not list it"}

    pair.with_suffix(".tflite").unlink()
    _tiny_tflite.make_mlp(pair.with_suffix(".tflite"), seed=3, name="another-model")
    found, skipped = find_engines(pair, load_profile("x86-dev"))
    assert [e.backend for e in found] == ["onnxruntime"]
    assert skipped["tflite"] == "m.tflite is another model than m.onnx (its name differs)"

    pair.with_suffix(".tflite").unlink()
    found, skipped = find_engines(pair, load_profile("x86-dev"))
    assert skipped == {"tflite": "no m.tflite beside m.onnx"}
    with pytest.raises(ConfigError, match="does not exist"):
        find_engines(pair.with_name("missing.onnx"))


def test_compare_measures_both_paired_and_checks_they_agree(pair):
    found, _ = find_engines(pair, load_profile("x86-dev"))
    fig = compare_engines(found, X, profile=load_profile("x86-dev"), rounds=3, runs=4, warmup=1)
    assert fig["reference"] == "onnxruntime" and fig["rounds"] == 3 and fig["runs_per_round"] == 4
    assert (fig["atol"], fig["rtol"]) == (1e-5, 1e-4)  # x86-dev's tolerances
    ort, tfl = fig["engines"]["onnxruntime"], fig["engines"]["tflite"]
    assert ort["ratio"] == 1.0 and tfl["ratio"] > 0
    for f in (ort, tfl):
        assert 0 < f["p50_ms"] <= f["p99_ms"] and f["agrees"] and f["max_abs_diff"] < 1e-5
    assert ort["providers"] == ["CPUExecutionProvider"] and "XNNPACK" in tfl["providers"]
    with pytest.raises(ConfigError, match="rounds and runs must be at least 1"):
        compare_engines(found, X, rounds=0)


def _figures(ratios: dict, agrees: dict | None = None) -> dict:
    agrees = agrees or {}
    return {
        "reference": next(iter(ratios)),
        "rounds": 3,
        "runs_per_round": 4,
        "load_avg": {"before": [0.5, 0.5, 0.5], "after": None},
        "atol": 1e-5,
        "rtol": 1e-4,
        "engines": {
            b: {"path": f"m.{b}", "p50_ms": 10 * r, "ratio": r, "agrees": agrees.get(b, True), "max_abs_diff": 0.1}
            for b, r in ratios.items()
        },
    }


FOUND = [EngineFile("onnxruntime", Path("m.onnx")), EngineFile("tflite", Path("m.tflite"))]


@pytest.mark.parametrize(
    ("ratios", "agrees", "chosen", "why"),
    [
        ({"onnxruntime": 1.0, "tflite": 0.8}, {}, "tflite", "tflite: the fastest; onnxruntime p50 10 ms (1.250x)"),
        (
            {"onnxruntime": 1.0, "tflite": 0.98},
            {},
            "onnxruntime",
            "within 3% of the fastest (tflite) and listed before",
        ),
        ({"onnxruntime": 1.0, "tflite": 1.2}, {}, "onnxruntime", "onnxruntime: the fastest"),
        ({"onnxruntime": 1.0, "tflite": 0.5}, {"tflite": False}, "onnxruntime", "onnxruntime: the fastest"),
    ],
)
def test_decide_takes_the_fastest_or_the_earlier_within_the_margin(ratios, agrees, chosen, why):
    choice = decide(FOUND, _figures(ratios, agrees), {"other": "not installed"})
    assert choice.backend == chosen and choice.path == Path(f"m.{chosen}".replace("onnxruntime", "onnx"))
    assert why in choice.reason and "paired over 3 rounds of 4 runs, load average 0.50" in choice.reason
    assert choice.skipped["other"] == "not installed"
    if agrees:
        assert choice.skipped["tflite"].startswith("its outputs differ from onnxruntime's by up to 0.1")


def test_decide_refuses_when_no_engine_agrees():
    with pytest.raises(BackendUnavailableError, match="no engine agrees"):
        decide(FOUND[1:], _figures({"onnxruntime": 1.0, "tflite": 0.5}, {"tflite": False}))


def test_choose_engine_measures_only_when_there_is_a_choice(pair, tmp_path):
    choice = choose_engine(pair, device="x86-dev", feeds=X, rounds=2, runs=3)
    assert choice.backend in ("onnxruntime", "tflite") and choice.comparison is not None
    assert set(choice.comparison["engines"]) == {"onnxruntime", "tflite"}
    assert choice.reason.startswith(f"{choice.backend}: ")
    only = choose_engine(pair, device=_profile(tmp_path, "ort-only", ["onnxruntime"]))
    assert (only.backend, only.path, only.comparison) == ("onnxruntime", pair, None)
    assert only.reason == "onnxruntime: the only engine that can run it here"
    pair.unlink()
    with pytest.raises(
        BackendUnavailableError,
        match=r"no engine here can run m.tflite: onnxruntime: no m.onnx .*tflite: device profile 'ort-only2' does not",
    ):
        choose_engine(pair.with_suffix(".tflite"), device=_profile(tmp_path, "ort-only2", ["onnxruntime"]))


def test_feeds_are_cast_only_when_no_value_changes(tmp_path):
    from edge.engines import _cast_feeds
    from edge.format.feeds import InputSpec

    engine = EngineFile("tflite", tmp_path / "m.tflite")
    specs = {"ids": InputSpec("ids", np.dtype(np.int32), (1, 3))}
    out = _cast_feeds({"ids": np.array([[1, 2, 3]], np.int64)}, specs, engine)
    assert out["ids"].dtype == np.int32
    with pytest.raises(ConfigError, match="input 'ids' is int64, m.tflite on tflite takes int32"):
        _cast_feeds({"ids": np.array([[1, 2, 1 << 40]], np.int64)}, specs, engine)
    with pytest.raises(ConfigError, match="is float32"):
        _cast_feeds({"ids": np.zeros((1, 3), np.float32)}, specs, engine)


def test_profile_compares_the_engines_it_finds_and_auto_runs_the_chosen(pair, tmp_path):
    fast = ProfileConfig(runs=5, warmup=1, switches=1, progress=False, engine_rounds=2, engine_runs=3)
    result = profile_model(pair, "x86-dev", inputs=X, config=fast)
    assert result["backend"] == "onnxruntime"
    rep = result["engines"]
    assert set(rep["comparison"]["engines"]) == {"onnxruntime", "tflite"} and rep["skipped"] == {}
    assert rep["choice"]["backend"] in ("onnxruntime", "tflite")
    md = format_markdown(result)
    assert "| tflite | m.tflite | XNNPACK" in md and '`backend="auto"` here: ' in md

    auto = profile_model(pair, "x86-dev", inputs=X, backend="auto", config=fast)
    assert auto["backend"] == auto["engines"]["choice"]["backend"]
    assert auto["model"]["path"] == auto["engines"]["choice"]["path"]

    off = profile_model(pair, "x86-dev", inputs=X, config=replace(fast, engine_rounds=0))
    assert off["engines"] is None
    ort_only = profile_model(pair, _profile(tmp_path, "ort-only", ["onnxruntime"]), inputs=X, config=fast)
    assert ort_only["engines"] == {
        "comparison": None,
        "skipped": {"tflite": "device profile 'ort-only' does not list it"},
        "choice": None,
    }
    assert format_engines(ort_only["engines"]) == ["- tflite not compared: device profile 'ort-only' does not list it"]


def test_engine_report_is_none_when_nothing_else_could_run(tmp_path):
    _tiny.make_mlp(tmp_path / "solo.onnx")
    assert engine_report(tmp_path / "solo.onnx", load_profile("x86-dev"), X, rounds=0) is None
    rep = engine_report(tmp_path / "solo.onnx", load_profile("x86-dev"), X, rounds=1, runs=1)
    assert rep == {"comparison": None, "skipped": {"tflite": "no solo.tflite beside solo.onnx"}, "choice": None}
