"""What a sweep of transformers' encoder, vision and audio architectures through ``edge export`` found (session 17).

Each case was a library traceback (exit 1 on the command line) before, and is now a typed one-line refusal saying
what was given and what to pass: a model that fails on the example inputs the exporter gives it (a layout model
needing ``bbox``, CLIP's two towers, a ConvNeXt whose stages shrink a small image to nothing), a text model whose
position ids start after the padding index though its ``model_type`` was not on the exporter's list
(Data2Vec-text, I-BERT: ``IndexError: index out of range in self``), Hiera's ``image_size`` pair (``int()`` of a
list). FNet, which takes no attention mask, had its ``token_type_ids`` pooled as the mask: a silent wrong embedding
(all zero for all-zero type ids).
"""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

from edge.errors import ConfigError, ExportValidationError  # noqa: E402

torch.set_num_threads(1)
TEXT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=40)
VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16)


def _export(model, tmp_path, **kwargs):
    from exporters.hf import export_hf_encoder

    return export_hf_encoder(model.eval(), tmp_path / "m.onnx", progress=False, **kwargs)


def test_a_model_needing_other_inputs_is_refused_naming_the_inputs_given(tmp_path):
    torch.manual_seed(0)
    bros = T.BrosModel(T.BrosConfig(**TEXT))  # a layout model: its forward raised "You have to specify bbox"
    with pytest.raises(ConfigError, match=r"BrosModel \(bros\) fails on the text inputs .*input_ids \[2, 8\].*bbox.*"):
        _export(bros, tmp_path, seq_len=8, pooling="mean")
    clip = T.CLIPModel(T.CLIPConfig(text_config=TEXT, vision_config={**VISION, "patch_size": 8}))
    with pytest.raises(ConfigError, match=r"CLIPModel \(clip\) fails on the vision inputs .*specify input_ids.*"):
        _export(clip, tmp_path, image_size=16, pooling="mean")
    assert not list(tmp_path.iterdir())


def test_an_image_too_small_for_the_stages_names_image_size(tmp_path):
    convnext = T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1]))
    with pytest.raises(ConfigError, match=r"pixel_values \[2, 3, 16, 16\].*larger image_size \(--image-size\)"):
        _export(convnext, tmp_path, image_size=16)
    assert not list(tmp_path.iterdir())


def test_a_config_image_size_pair_is_taken_when_square_and_refused_otherwise(tmp_path):
    from exporters.hf_checks import image_side

    hiera = T.HieraModel(T.HieraConfig(image_size=[32, 48], embed_dim=8, num_heads=[1] * 4, depths=[1] * 4))
    with pytest.raises(ConfigError, match=r"config.image_size is \[32, 48\], not a square side.*--image-size N"):
        _export(hiera, tmp_path, pooling="pooler")  # int() of the list was a TypeError traceback
    hiera.config.image_size = [32, 32]
    assert image_side(hiera, None) == 32 and image_side(hiera, 16) == 16
    assert not list(tmp_path.iterdir())


def test_padding_offset_positions_are_found_from_the_model_not_its_type(tmp_path):
    d2v = T.Data2VecTextModel(T.Data2VecTextConfig(**TEXT, max_position_embeddings=20, pad_token_id=1))
    with pytest.raises(ConfigError, match=r"seq_len 19 is longer than data2vec-text's 18 positions.*--seq-len 18"):
        _export(d2v, tmp_path, seq_len=19, pooling="mean")
    ibert = T.IBertModel(T.IBertConfig(**TEXT, max_position_embeddings=20))  # a QuantEmbedding, not nn.Embedding
    with pytest.raises(ConfigError, match=r"seq_len 19 is longer than ibert's 18 positions"):
        _export(ibert, tmp_path, seq_len=19, pooling="mean")
    bert = T.BertModel(T.BertConfig(**TEXT, max_position_embeddings=20, pad_token_id=0))  # absolute: all 20
    with pytest.raises(ConfigError, match=r"seq_len 21 is longer than bert's 20 positions"):
        _export(bert, tmp_path, seq_len=21)
    assert not list(tmp_path.iterdir())


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_command_line_refusal_is_one_line(tmp_path, capsys):
    from edge import cli

    T.BrosModel(T.BrosConfig(**TEXT)).save_pretrained(tmp_path / "bros")
    records, hf_log = _Records(), logging.getLogger("transformers")
    hf_log.addHandler(records)
    try:
        args = ["export", str(tmp_path / "bros"), "--out", str(tmp_path / "m.onnx"), "-q", "--pooling", "mean"]
        code = cli.main(args)
    finally:
        hf_log.removeHandler(records)
    err = capsys.readouterr().err
    # Bros has no AttentionInterface: asking it for SDPA only made transformers warn, a stray line under -q
    assert not [line for line in records.lines if "attention implementation" in line], records.lines
    lines = [line for line in err.splitlines() if line.startswith("edge: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "You have to specify bbox" in lines[0] and "exporters.export_onnx" in lines[0], err
    assert not list(tmp_path.glob("*.onnx"))


def test_a_text_model_without_attention_mask_gets_its_token_type_ids(tmp_path):
    import numpy as np

    from edge.runtime import Runtime

    torch.manual_seed(0)
    fnet = T.FNetModel(T.FNetConfig(**TEXT, type_vocab_size=4, max_position_embeddings=16)).eval()
    info = _export(fnet, tmp_path, seq_len=8, pooling="mean")
    assert info.inputs == ("input_ids", "token_type_ids")
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(3, 40, (2, 8)), "token_type_ids": rng.integers(0, 4, (2, 8))}
    with torch.no_grad():
        hidden = fnet(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
    with Runtime(tmp_path / "m.onnx", strategy="rebuild") as rt:
        got = rt.run(feeds)["embeddings"]
    # the second input was taken as the attention mask: all-zero type ids pooled nothing, an all-zero embedding
    np.testing.assert_allclose(got, hidden.mean(1).numpy(), rtol=0, atol=1e-5)
    assert np.abs(got).min() > 0


class _Registers(torch.nn.Module):
    """DINOv3's shape with no register tokens: an empty [1, 0, d] parameter concatenated to the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.register_tokens = torch.nn.Parameter(torch.zeros(1, 0, 4))
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return (self.proj(torch.cat([self.register_tokens.expand(x.shape[0], -1, -1), x], dim=1)).mean(1),)


def test_an_empty_weight_is_no_target_and_the_file_loads(tmp_path):
    import numpy as np

    from edge.format.modelinfo import fingerprint
    from edge.runtime import Runtime
    from exporters import export_onnx

    # the fingerprint's memoryview cast raised a TypeError; the empty weight then was a target the loader refused
    assert fingerprint({"e": np.zeros((1, 0, 4), np.float32)}) != fingerprint({"e": np.zeros((1, 0, 5), np.float32)})
    model = _Registers().eval()
    info = export_onnx(model, (torch.randn(2, 3, 4),), tmp_path / "m.onnx", input_names=["x"], output_names=["y"],
                       name="registers", progress=False)  # fmt: skip
    assert sorted(info.tensors) == ["proj.weight"]
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    with Runtime(tmp_path / "m.onnx") as rt:
        np.testing.assert_allclose(rt.run({"x": x})["y"], model(torch.from_numpy(x))[0].detach().numpy(), atol=1e-6)


@pytest.mark.slow  # an export and its validation run (about 10 s)
def test_a_fused_attention_kernel_refusal_names_decomposed(tmp_path, capfd):
    torch.manual_seed(0)
    layoutlm = T.LayoutLMModel(T.LayoutLMConfig(**TEXT, max_position_embeddings=16))
    # before: "fixed a dimension ... export with dynamic_batch=False", and onnxruntime's own log line on stderr
    with pytest.raises(ExportValidationError, match=r"Attention node.*pass attention='decomposed'"):
        _export(layoutlm, tmp_path, seq_len=8, pooling="mean")
    assert "[E:onnxruntime" not in capfd.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # the default HGNetV2 config: building it takes seconds
def test_a_backbone_without_last_hidden_state_is_refused_naming_it(tmp_path):
    hgnet = T.HGNetV2Backbone(T.HGNetV2Config())
    with pytest.raises(ConfigError, match=r"BackboneOutput without a last_hidden_state.*exporters.export_onnx"):
        _export(hgnet, tmp_path, image_size=32, pooling="mean")
    assert not list(tmp_path.iterdir())
