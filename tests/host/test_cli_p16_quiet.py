"""``edge export --quiet`` is quiet: stderr carries only warnings the user must see, and errors.

It still showed transformers' ``Loading weights`` progress bar, torch's exporter logging (``torchvision is not
installed. Skipping torchvision::nms``, four lines) and two Python warnings from torch's internals. Now
:func:`exporters.quiet.quiet_host` wraps the export: transformers' own progress switch off, torch's loggers at
errors, library deprecation and exporter-note warnings ignored; transformers' load report (weights missing from
the checkpoint) still shows. A model folder that is a FIFO or a file is named as such.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")  # imported first: torch's import sets its loggers' levels, which quiet_host puts back

from transformers.utils import logging as hf_logging  # noqa: E402

from edge.cli import main  # noqa: E402
from exporters.quiet import QUIET_LOGGERS, quiet_host  # noqa: E402


def _warn(category, module):
    warnings.warn_explicit("note", category, filename=f"{module}.py", lineno=1, module=module)


def test_quiet_host_silences_the_libraries_and_puts_everything_back():
    hf_logging.enable_progress_bar()
    levels = {n: logging.getLogger(n).level for n in QUIET_LOGGERS}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_host():
            assert not hf_logging.is_progress_bar_enabled()
            assert all(logging.getLogger(n).getEffectiveLevel() == logging.ERROR for n in QUIET_LOGGERS)
            _warn(FutureWarning, "copyreg")
            _warn(DeprecationWarning, "transformers.modeling_utils")
            _warn(UserWarning, "torch.onnx._internal.exporter._onnx_program")
            _warn(UserWarning, "exporters.hf")  # the project's own: kept
            _warn(UserWarning, "torchvision_like_but_not_torch")  # not torch's
        assert [str(w.category.__name__) + ":" + w.filename for w in seen] == [
            "UserWarning:exporters.hf.py",
            "UserWarning:torchvision_like_but_not_torch.py",
        ]
    assert hf_logging.is_progress_bar_enabled()
    assert {n: logging.getLogger(n).level for n in QUIET_LOGGERS} == levels


def test_quiet_host_leaves_a_disabled_bar_disabled_and_does_nothing_when_off():
    hf_logging.disable_progress_bar()
    try:
        with quiet_host():
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
    with quiet_host(False):
        assert hf_logging.is_progress_bar_enabled()


def test_export_names_a_model_folder_that_is_a_fifo(tmp_path, capsys):
    os.mkfifo(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "m.onnx")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f"model folder {tmp_path}/model is a FIFO (named pipe), not a folder" in err


@pytest.fixture(scope="module")
def tiny_berts(tmp_path_factory):
    """A tiny random BERT folder, and a copy of it missing one weight."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("p16quiet")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    hf_logging.disable_progress_bar()
    try:
        BertModel(cfg).save_pretrained(root / "tiny")
        BertModel(cfg).save_pretrained(root / "holed")
    finally:
        hf_logging.enable_progress_bar()
    weights = load_file(root / "holed" / "model.safetensors")
    del weights["encoder.layer.1.output.dense.weight"]
    save_file(weights, root / "holed" / "model.safetensors", metadata={"format": "pt"})
    return root


def _export(folder: Path, quiet: bool) -> subprocess.CompletedProcess:
    argv = ["export", str(folder), "--out", str(folder.with_suffix(".onnx")), "--seq-len", "16"]
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", *argv, *(["--quiet"] if quiet else [])],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )


@pytest.mark.slow
def test_export_quiet_writes_nothing_to_stderr(tiny_berts):
    done = _export(tiny_berts / "tiny", quiet=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert '"targets"' in done.stdout


@pytest.mark.slow
def test_export_quiet_still_says_weights_missing_from_the_checkpoint(tiny_berts):
    done = _export(tiny_berts / "holed", quiet=True)  # refused: the graph reads the weight (exporters.hf_checks)
    assert done.returncode == 2, done.stderr
    assert "encoder.layer.1.output.dense.weight" in done.stderr and "MISSING" in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("edge: error: ") and "1 weight(s) the exported model uses are missing" in last
    assert "Loading weights" not in done.stderr and "torchvision" not in done.stderr
