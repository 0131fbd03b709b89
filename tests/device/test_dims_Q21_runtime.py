"""Which dims apply: the caller's are strict, a device profile's apply per model (review O21 S1, S2, S3).

Before: ``Backend.TAKES_DIMS`` was read only by the engine cache, so a backend without it given dims by Runtime
would have ignored them silently (S1). A profile's ``dims`` applied to every model on the device, so a model lacking
one of its names, or any .tflite, could not load there (S2). ``DeviceProfile.backend_options()`` left the profile's
dims out (S3). Now Runtime refuses dims for a backend that takes none (ConfigError naming it); a profile's dims apply
to the names the model's file declares on a backend that takes dims, the rest skipped, logged once (INFO), with
``rt.dims`` saying what applies; under ``backend="auto"`` a .tflite stays a candidate when none of them applies;
``backend_options`` carries the profile's dims for a backend that takes them (with ``model``: the names it declares).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from edge import engine_cache  # noqa: E402
from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.devices import load_profile  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from tests.device.test_dims_D21_runtime import named_mlp  # noqa: E402

DIGITS = Path.home() / ".cache" / "edge" / "digits-07d9c19ac5e7"
X86 = (Path(__file__).resolve().parents[2] / "devices" / "x86-dev.yaml").read_text()


def _profile(tmp: Path, dims: str, name: str = "q21dims") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(X86.replace("name: x86-dev", f"name: {name}") + f"dims: {dims}\n")
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("q21dims")
    onnx.save(named_mlp(), tmp / "m.onnx")
    import_onnx(tmp / "m.onnx", tmp / "dims.onnx")
    (tmp / "m.onnx").unlink()
    return tmp / "dims.onnx"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    if not (DIGITS / "encoder.onnx").is_file() or not (DIGITS / "encoder.tflite").is_file():
        pytest.skip("make demo has not built the digits encoder and its .tflite")
    pytest.importorskip("ai_edge_litert")
    tmp = tmp_path_factory.mktemp("q21digits")
    for name in ("encoder.onnx", "encoder.tflite"):
        shutil.copy(DIGITS / name, tmp / name)
    return tmp


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_ENGINE_CACHE", str(tmp_path / "engines"))


def test_runtime_refuses_dims_for_a_backend_that_takes_none_naming_it(model, monkeypatch):
    from runtimes.onnxruntime import OrtBackend

    monkeypatch.setattr(OrtBackend, "TAKES_DIMS", False)  # a backend that would not honour them
    with pytest.raises(ConfigError) as e:
        Runtime(model, backend="onnxruntime", dims={"batch": 2})
    assert "dims {'batch': 2} given, but backend 'onnxruntime' takes none" in str(e.value) and "drop dims" in str(
        e.value
    )


def test_a_profile_applies_the_names_a_model_declares_and_logs_the_rest_once(model, tmp_path, caplog):
    path = _profile(tmp_path, "{batch: 2, sequence: 128, channels: 3}")
    with caplog.at_level("INFO", logger="edge.dims"):
        for _ in range(2):
            with Runtime(model, device=path, backend="onnxruntime") as rt:
                assert rt.dims == {"batch": 2}
                assert rt.backend.input_specs["x"].shape == (2, "seq", 8)
                out = rt.run({"x": np.ones((2, 4, 8), np.float32), "z": np.ones((1, 6), np.float32)})
                assert out["out"].shape == (2, 3)
                with pytest.raises(ConfigError, match="batch"):  # what applies is enforced
                    rt.run({"x": np.ones((1, 4, 8), np.float32), "z": np.ones((1, 6), np.float32)})
    said = [r.getMessage() for r in caplog.records if r.name == "edge.dims"]
    assert said == ["the device profile's dims ['channels', 'sequence'] do not apply to dims.onnx: it declares no "
                    "such named dimension"]  # fmt: skip
    with pytest.raises(ConfigError, match="dims \\['sequence'\\] are not dimensions model"):  # explicit: strict
        Runtime(model, device=path, backend="onnxruntime", dims={"sequence": 128})
    with Runtime(model, device=path, backend="onnxruntime", dims={"batch": 3, "seq": 4}) as rt:
        assert rt.dims == {"batch": 3, "seq": 4}  # explicit wins per name


def test_a_tflite_loads_on_a_device_whose_profile_has_dims(digits, tmp_path):
    path = _profile(tmp_path, "{batch: 2}")
    with Runtime(digits / "encoder.tflite", device=path, backend="tflite") as rt:
        assert rt.dims == {} and rt.backend.name == "tflite"
        assert rt.run({"pixels": np.zeros((1, 1, 8, 8), np.float32)})["logits"].shape == (1, 10)
    with pytest.raises(ConfigError, match="backend 'tflite' takes none"):  # given explicitly: refused
        Runtime(digits / "encoder.tflite", device=path, backend="tflite", dims={"batch": 2})


def test_auto_keeps_the_tflite_when_no_profile_dim_applies_and_skips_it_when_one_does(digits, tmp_path, monkeypatch):
    seen = []

    def measured(fits, feeds, **kw):
        seen.append(([(e.backend, e.dims) for e in fits], {k: v.shape for k, v in feeds.items()}))
        return {"engines": {}}

    def decide(fits, figures, skipped, margin):
        from edge.engine_choice import EngineChoice

        return EngineChoice(fits[0].backend, fits[0].path, "first", figures, skipped)

    monkeypatch.setattr(engine_cache, "compare_engines", measured)
    monkeypatch.setattr(engine_cache, "decide", decide)
    unrelated = load_profile(_profile(tmp_path, "{sequence: 128}", "q21seq"))
    choice = engine_cache.cached_engine(digits / "encoder.tflite", device=unrelated, folder=tmp_path / "a")
    assert seen == [([("onnxruntime", ()), ("tflite", ())], {"pixels": (1, 1, 8, 8)})] and "tflite" not in (
        choice.skipped
    )
    seen.clear()
    batch = load_profile(_profile(tmp_path, "{batch: 2, sequence: 128}", "q21batch"))
    choice = engine_cache.cached_engine(digits / "encoder.tflite", device=batch, folder=tmp_path / "b")
    assert choice.backend == "onnxruntime" and seen == []  # the one engine left: nothing measured
    why = choice.skipped["tflite"]
    assert "dims {'batch': 2} (the device profile's) apply to encoder.onnx" in why and "takes none" in why


def test_backend_options_carry_the_profiles_dims_for_a_backend_that_takes_them(model, tmp_path):
    profile = load_profile(_profile(tmp_path, "{batch: 2, sequence: 128}"))
    assert dict(profile.backend_options("onnxruntime", quiet=True).dims) == {"batch": 2, "sequence": 128}
    assert dict(profile.backend_options("onnxruntime", quiet=True, model=model).dims) == {"batch": 2}
    assert profile.backend_options("tflite", quiet=True).dims is None
    plain = load_profile(_profile(tmp_path, "{}", "q21plain"))
    assert plain.backend_options("onnxruntime", quiet=True).dims is None
