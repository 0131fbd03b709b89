"""One-line errors a newcomer meets following the README name what they gave, as given.

``edge inspect /dev/zero`` said "zero: inspect reads a model ..." and ``edge inspect .`` said ": inspect reads ...";
``edge import-onnx M.onnx --out O.onnx --hf ./missing-folder`` said the state dict must be a .safetensors file
(the pickle refusal) instead of that the folder does not exist; a backend named for another engine's file
failed in that backend's parser.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _tiny import make_mlp

from edge import ConfigError, Runtime
from edge.cli import main

GOLDEN_TFLITE = Path(__file__).resolve().parents[1] / "golden" / "tiny-mlp-v1.tflite"


@pytest.mark.parametrize("given", ["/dev/zero", ".", "samples.npz"])
def test_inspect_names_the_path_as_given(given, capsys):
    assert main(["inspect", given]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"edge: error: {given}: inspect reads a model") and "\n" not in err


@pytest.mark.parametrize("flag", ["--hf", "--state-dict"])
def test_import_onnx_names_a_missing_weights_folder(tmp_path, flag, capsys):
    make_mlp(tmp_path / "m.onnx")
    missing = tmp_path / "my-bert"
    assert main(["import-onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "o.onnx"), flag, str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and "No such file or directory" in err and "pickle" not in err, err
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("twin", [False, True], ids=["alone", "twin-beside"])
def test_a_backend_named_for_another_engines_file_says_which_file_to_pass(tmp_path, twin):
    """``Runtime("m.onnx", backend="tflite")`` (``edge profile m.onnx --backend tflite``) failed in LiteRT's reader:
    "not a .tflite file (identifier b'\\n\\n\\x1b\\n', expected b'TFL3')", naming neither the file nor the fix."""
    make_mlp(tmp_path / "m.onnx")
    if twin:
        shutil.copy(GOLDEN_TFLITE, tmp_path / "m.tflite")
    with pytest.raises(ConfigError, match=r"m\.onnx is a \.onnx file, which backend 'onnxruntime' runs, not 'tflite'"):
        Runtime(tmp_path / "m.onnx", backend="tflite")
    if twin:
        with pytest.raises(ConfigError, match=r"pass m\.onnx \(beside it\)"):
            Runtime(tmp_path / "m.tflite", backend="onnxruntime")


def test_edge_profile_with_the_other_engines_backend_exits_2(tmp_path, capsys):
    make_mlp(tmp_path / "m.onnx")
    assert main(["profile", str(tmp_path / "m.onnx"), "--device", "x86-dev", "--backend", "tflite", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edge: error: m.onnx is a .onnx file") and "\n" not in err, err


def test_a_backend_that_also_reads_the_suffix_is_not_refused(monkeypatch):
    """An added backend (one line in ``runtimes.TABLE``) may read ``.onnx`` files too: naming it is no mistake."""
    import runtimes
    from edge.engine_cache import explicit_engine

    monkeypatch.setitem(runtimes.TABLE, "ort-too", ("runtimes.onnxruntime", (".onnx",)))
    assert explicit_engine("ort-too", "m.onnx").backend == "ort-too"
    with pytest.raises(ConfigError, match="which backend 'onnxruntime' runs, not 'tflite'"):
        explicit_engine("tflite", "m.onnx")
