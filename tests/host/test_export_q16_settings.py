"""A shape setting the model's kind does not take is refused, not ignored.

``audio_length`` (``--audio-length``) for a text or vision model, ``image_size`` (``--image-size``) for a text or
audio model, ``seq_len`` / ``dynamic_seq`` (``--seq-len``, ``--dynamic-seq``) and ``tokenizer`` for a vision or
audio model were dropped without a word: the user got a model of another shape than asked. Now a ConfigError names
the setting, the model's kind and the settings it takes. Defaults the user did not pass are not refused.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

from edge.cli import main  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from exporters.hf import export_hf_encoder  # noqa: E402

TINY = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    conv = {"conv_dim": (8, 8), "conv_stride": (5, 2), "conv_kernel": (10, 3), "num_conv_pos_embeddings": 4}
    return {
        "text": T.BertModel(T.BertConfig(vocab_size=64, max_position_embeddings=32, **TINY)).eval(),
        "vision": T.ViTModel(T.ViTConfig(image_size=16, patch_size=8, **TINY)).eval(),
        "audio": T.Wav2Vec2Model(T.Wav2Vec2Config(**TINY, **conv, num_conv_pos_embedding_groups=2)).eval(),
    }


REFUSED = [
    (
        "text",
        {"image_size": 32},
        r"image_size=32 \(--image-size\) is a setting of vision models; BertModel \(bert\) "
        r"is a text model, which takes seq_len, dynamic_seq, tokenizer: leave image_size out",
    ),
    ("text", {"audio_length": 800}, r"audio_length=800 \(--audio-length\) is a setting of audio models; BertModel"),
    (
        "vision",
        {"seq_len": 16},
        r"seq_len=16 \(--seq-len\) is a setting of text models; ViTModel \(vit\) is a "
        r"vision model, which takes image_size: leave seq_len out",
    ),
    ("vision", {"dynamic_seq": True}, r"dynamic_seq=True \(--dynamic-seq\) is a setting of text models; ViTModel"),
    ("vision", {"audio_length": 800}, r"audio_length=800 .* ViTModel \(vit\) is a vision model"),
    ("vision", {"tokenizer": "t.json"}, r"tokenizer='t.json' is a setting of text models; ViTModel"),
    (
        "audio",
        {"image_size": 32},
        r"image_size=32 .* Wav2Vec2Model \(wav2vec2\) is an audio model, which takes "
        r"audio_length: leave image_size out",
    ),
    ("audio", {"seq_len": 128}, r"seq_len=128 \(--seq-len\) is a setting of text models; Wav2Vec2Model"),
]


@pytest.mark.parametrize(("kind", "setting", "message"), REFUSED)
def test_a_setting_the_kind_does_not_take_is_refused(models, kind, setting, message, tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(ConfigError, match=message):
        export_hf_encoder(models[kind], out, pooling="mean", progress=False, **setting)
    assert not out.exists()


def test_cli_refuses_in_one_line_and_takes_defaults_it_was_not_given(models, tmp_path, capsys):
    models["vision"].save_pretrained(tmp_path / "vit")
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "v.onnx"
    code = main(["export", str(tmp_path / "vit"), "--out", str(out), "--seq-len", "64", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists() and len(err) == 1
    assert err[0].startswith("edge: error: seq_len=64 (--seq-len) is a setting of text models; ViTModel (vit)")
    assert main(["export", str(tmp_path / "vit"), "--out", str(out), "-q"]) == 0  # --seq-len's default: no refusal
    summary = json.loads(capsys.readouterr().out)
    assert summary["modality"] == "vision" and summary["image_size"] == 16 and summary["seq_len"] is None
