"""What the missing-weight refusal of ``edge export`` must not refuse, and a config transformers cannot build.

A checkpoint without a buffer the model's code computes at construction (ESM's rotary ``inv_freq``: transformers
reports it missing, and fills it with the value ``__init__`` computes) exported before the check and was refused
by it ("would be exported random"); a BatchNorm's running statistics, learned in training, are still refused
(``test_export_q16_weights.py``). A ``config.json`` whose ``model_type`` transformers does not know was a bare
ValueError traceback out of ``edge export``: now one line.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.errors import FormatError  # noqa: E402
from exporters.hf import export_hf_encoder  # noqa: E402
from exporters.hf_checks import load_checkpoint  # noqa: E402

ESM = dict(vocab_size=33, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


def esm_without_inv_freq(tmp_path):
    """ESM with rotary embeddings saved whole (``full``) and without its ``inv_freq`` buffer (``part``)."""
    torch.manual_seed(0)
    cfg = T.EsmConfig(**ESM, position_embedding_type="rotary", pad_token_id=1, mask_token_id=32)
    T.EsmModel(cfg).save_pretrained(tmp_path / "full")
    weights = load_file(tmp_path / "full" / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not k.endswith("inv_freq")}
    assert len(kept) == len(weights) - 1  # transformers 5 stores it once, under a pattern name
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "config.json").write_bytes((tmp_path / "full" / "config.json").read_bytes())
    save_file(kept, tmp_path / "part" / "model.safetensors", metadata={"format": "pt"})
    model, report = load_checkpoint(T.AutoModel, tmp_path / "part")
    assert report["unloaded"] == []  # reported missing by transformers, computed by the model: not unloaded
    return tmp_path


def test_a_buffer_the_model_computes_is_not_counted_as_missing(tmp_path):
    esm_without_inv_freq(tmp_path)


@pytest.mark.slow  # two exports, 10-25 s
def test_a_checkpoint_without_a_computed_buffer_exports_the_same_model(tmp_path):
    esm_without_inv_freq(tmp_path)
    info = export_hf_encoder(tmp_path / "part", tmp_path / "m.onnx", pooling="mean", seq_len=8, progress=False)
    assert (tmp_path / "m.onnx").is_file() and info.name
    full = export_hf_encoder(tmp_path / "full", tmp_path / "f.onnx", pooling="mean", seq_len=8, progress=False)
    assert full.fingerprint == info.fingerprint  # the computed buffer is the saved one: the same model


def test_an_unknown_model_type_is_one_line(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "notamodel", "hidden_size": 8}))
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
    with pytest.raises(FormatError, match=r"transformers cannot build a model from its config.json.*notamodel"):
        load_checkpoint(T.AutoModel, tmp_path / "hf")
    code = main(["export", str(tmp_path / "hf"), "--out", str(tmp_path / "m.onnx"), "-q"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("edge: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "notamodel" in lines[0]
