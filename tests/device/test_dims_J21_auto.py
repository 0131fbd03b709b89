"""``dims`` with ``backend="auto"``: the engine choice is made at the sizes the runtime runs with.

Before: ``cached_engine`` measured without the dims (free sessions, batch-1 feeds, footprints at the default
lengths), kept that choice under a key without them, and could choose a .tflite, which then refused the dims at load.
Now the merged dims are in the choice's key, every candidate is predicted, built and fed with them, and a backend
that takes no dims (LiteRT) is skipped saying why. ``edge inspect`` shows each input's shape and its named dimensions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from edge import engine_cache  # noqa: E402
from edge.engines import EngineFile, _open  # noqa: E402
from edge.errors import BackendUnavailableError  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

DIGITS = Path.home() / ".cache" / "edge" / "digits-07d9c19ac5e7"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    if not (DIGITS / "encoder.onnx").is_file() or not (DIGITS / "encoder.tflite").is_file():
        pytest.skip("make demo has not built the digits encoder and its .tflite")
    tmp = tmp_path_factory.mktemp("digits")
    for name in ("encoder.onnx", "encoder.tflite"):
        shutil.copy(DIGITS / name, tmp / name)
    return tmp


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_ENGINE_CACHE", str(tmp_path / "engines"))


def _x(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 1, 8, 8)).astype(np.float32)


def test_auto_with_dims_skips_the_tflite_saying_why_and_runs_the_onnx_at_the_size(digits):
    pytest.importorskip("ai_edge_litert")
    for asked in ("encoder.onnx", "encoder.tflite"):  # a .tflite asked for: its .onnx twin beside it runs
        with Runtime(digits / asked, backend="auto", dims={"batch": 3}) as rt:
            choice = rt.engine_choice
            assert (choice.backend, choice.path.name) == ("onnxruntime", "encoder.onnx")
            why = choice.skipped["tflite"]
            assert "dims {'batch': 3} given: encoder.tflite on tflite takes none" in why and "drop dims" in why
            assert rt.backend.input_specs["pixels"].shape == (3, 1, 8, 8)
            assert rt.run({"pixels": _x(3)})["logits"].shape == (3, 10)


def test_auto_with_dims_and_only_a_tflite_is_refused_naming_the_dims(tmp_path):
    if not (DIGITS / "encoder.tflite").is_file():
        pytest.skip("make demo has not built the digits .tflite")
    pytest.importorskip("ai_edge_litert")
    shutil.copy(DIGITS / "encoder.tflite", tmp_path / "encoder.tflite")
    with pytest.raises(BackendUnavailableError) as e:
        Runtime(tmp_path / "encoder.tflite", backend="auto", dims={"batch": 2})
    assert "no engine here can run encoder.tflite" in str(e.value) and "takes none" in str(e.value)


def test_the_choice_is_measured_with_the_dims_and_kept_under_them(digits, monkeypatch, tmp_path):
    """Two candidates (LiteRT made to take dims here, so that two are measured): each reaches the measuring with the
    dims, the generated feeds have their sizes, and the kept choice's key has them: the same dims read it back,
    other dims or none measure again."""
    from runtimes.litert import LiteRTBackend

    pytest.importorskip("ai_edge_litert")
    monkeypatch.setattr(LiteRTBackend, "TAKES_DIMS", True)
    seen = []

    def measured(fits, feeds, **kw):
        seen.append(([(e.backend, e.dims) for e in fits], {k: v.shape for k, v in feeds.items()}))
        return {"engines": {}}

    def decide(fits, figures, skipped, margin):
        from edge.engine_choice import EngineChoice

        return EngineChoice(fits[0].backend, fits[0].path, "first", figures, skipped)

    monkeypatch.setattr(engine_cache, "compare_engines", measured)
    monkeypatch.setattr(engine_cache, "decide", decide)
    folder = tmp_path / "kept"
    for dims in ({"batch": 4}, {"batch": 4}, {"batch": 2}, None):
        engine_cache.cached_engine(digits / "encoder.onnx", dims=dims, folder=folder)
    assert seen == [
        ([("onnxruntime", (("batch", 4),)), ("tflite", (("batch", 4),))], {"pixels": (4, 1, 8, 8)}),
        ([("onnxruntime", (("batch", 2),)), ("tflite", (("batch", 2),))], {"pixels": (2, 1, 8, 8)}),
        ([("onnxruntime", ()), ("tflite", ())], {"pixels": (1, 1, 8, 8)}),
    ]  # the second {"batch": 4} was read from the cache
    keys = sorted(str(json.loads(p.read_text())["key"].get("dims")) for p in folder.glob("*.json"))
    assert keys == ["None", "{'batch': 2}", "{'batch': 4}"]


def test_each_measured_session_is_built_with_the_dims(digits):
    backend, specs = _open(EngineFile("onnxruntime", digits / "encoder.onnx", dims=(("batch", 5),)), None, 1)
    try:
        assert specs["pixels"].shape == (5, 1, 8, 8)
        out = backend.run({"pixels": _x(5)})
        assert out["logits"].shape == (5, 10)
        sessions = [s for s in (backend._static, backend._bound) if s is not None]
        assert sessions and all(s.get_inputs()[0].shape == [5, 1, 8, 8] for s in sessions)
    finally:
        backend.close()


def test_the_budget_predicts_each_engine_at_the_dims(digits, monkeypatch):
    from edge.devices import load_profile
    from edge.engine_budget import fit_budget
    from runtimes.onnxruntime import OrtBackend

    calls = []
    real = OrtBackend.footprint_mb.__func__

    def spy(cls, model, strategy, providers=(), dims=None):
        calls.append((strategy, dims))
        return real(cls, model, strategy, providers, dims)

    monkeypatch.setattr(OrtBackend, "footprint_mb", classmethod(spy))
    profile = load_profile("x86-dev")
    found = [EngineFile("onnxruntime", digits / "encoder.onnx", dims=(("batch", 64),))]
    kept = fit_budget(found, {}, profile)
    assert [e.dims for e in kept] == [(("batch", 64),)] and calls and all(d == {"batch": 64} for _, d in calls)


def test_inspect_shows_each_input_shape_and_the_named_dims(digits, capsys):
    from edge.cli import main

    assert main(["inspect", str(digits / "encoder.onnx")]) == 0
    cap = capsys.readouterr()
    shown = json.loads(cap.out)
    assert shown["input_shapes"] == {"pixels": {"shape": ["batch", 1, 8, 8], "dtype": "float32"}}
    assert shown["dims"] == {"batch": ["pixels"]} and shown["inputs"] == ["pixels"]
    assert cap.err == ""  # stdout is the one JSON document; a successful inspect says nothing else


def test_inspect_shows_a_free_axis_without_a_name_as_null(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from edge.cli import main
    from edge.convert.onnx_import import import_onnx

    w = np.ones((4, 2), np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    import_onnx(tmp_path / "m.onnx", tmp_path / "m.edge.onnx")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "m.edge.onnx")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["input_shapes"]["x"] == {"shape": ["batch", None, 4], "dtype": "float32"}
    assert shown["dims"] == {"batch": ["x"]}


def test_inspect_of_a_tflite_lists_no_dims_to_fix(digits, capsys):
    pytest.importorskip("ai_edge_litert")
    from edge.cli import main

    assert main(["inspect", str(digits / "encoder.tflite")]) == 0
    cap = capsys.readouterr()
    shown = json.loads(cap.out)
    assert shown["dims"] == {} and shown["input_shapes"]["pixels"]["shape"][1:] == [1, 8, 8]
    assert "named input dimensions" not in cap.err
