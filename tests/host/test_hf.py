"""Hugging Face encoders exported as pooled embedders: tiny BERT and ViT, device tokenizer, real MiniLM (slow)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edge.errors import ConfigError  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from edge.text import Tokenizer, embed, mean_pool  # noqa: E402

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "edge", "device", "runs", "fast", "a", "model", "##s"]
SENTENCES = ["The cat sat on the mat.", "A model runs fast", "edge devices", "dog"]


def tiny_tokenizer(path):
    """A BERT-style WordPiece ``tokenizer.json`` built with the ``tokenizers`` library (no download)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", ".", *WORDS])}
    tok = HF(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tok.save(str(path))
    return vocab


def tiny_config(cls, **kw):
    torch.manual_seed(0)
    return cls(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        attn_implementation="eager",
        **kw,
    )


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from exporters.hf import export_hf_encoder

    tmp = tmp_path_factory.mktemp("hf")
    vocab = tiny_tokenizer(tmp / "tokenizer.json")
    model = transformers.BertModel(
        tiny_config(transformers.BertConfig, vocab_size=len(vocab), max_position_embeddings=32)
    )
    path = tmp / "bert.onnx"
    info = export_hf_encoder(
        model.eval(),
        path,
        seq_len=12,
        dynamic_seq=True,
        normalize=True,
        tokenizer=tmp / "tokenizer.json",
        name="tiny",
        progress=False,
    )
    return {"path": path, "info": info, "model": model, "vocab": vocab}


def test_tiny_bert_embeddings_on_device_match_torch(bert):
    from exporters.hf import PooledEncoder

    info = bert["info"]
    assert info.inputs == ("input_ids", "attention_mask", "token_type_ids") and info.outputs == ("embeddings",)
    assert info.extra["tokenizer"] == "bert.tokenizer.json" and info.extra["pooling"] == "mean"
    assert info.extra["seq_len"] is None and info.extra["max_seq_length"] == 12
    assert "bert.encoder.layer.0.attention.self.query.weight" in info.tensors
    assert (bert["path"].parent / "bert.tokenizer.json").is_file()
    with Runtime(bert["path"]) as rt:
        tok = Tokenizer.for_model(rt)
        feeds = tok.encode(SENTENCES)
        v = bert["vocab"]
        assert feeds["input_ids"][0, :9].tolist() == [v[w] for w in "[CLS] the cat sat on the mat . [SEP]".split()]
        assert feeds["input_ids"].shape == (4, 9) and feeds["attention_mask"][3].sum() == 3  # padded to the longest
        got = embed(rt, SENTENCES, batch_size=3)
    enc = PooledEncoder.wrap(bert["model"], pooling="mean", normalize=True).eval()
    with torch.no_grad():
        want = enc(*(torch.from_numpy(feeds[n]) for n in enc.input_names))[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_tokenizer_pads_to_longest_when_seq_is_dynamic(tmp_path):
    tiny_tokenizer(tmp_path / "t.json")
    tok = Tokenizer.from_file(tmp_path / "t.json", seq_len=None, max_length=5)
    ids = tok.encode(SENTENCES)["input_ids"]
    assert ids.shape == (4, 5) and ids[3, 3:].tolist() == [0, 0]
    with pytest.raises(ConfigError, match="seq_len"):
        Tokenizer.from_file(tmp_path / "t.json", seq_len=1)


def test_mean_pool_ignores_padding():
    h = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    np.testing.assert_array_equal(mean_pool(h, np.array([[1, 1, 0]])), h[:, :2].mean(1))


def test_tiny_vit_exports_with_the_same_code_path(tmp_path):
    from exporters.hf import export_hf_encoder

    model = transformers.ViTModel(tiny_config(transformers.ViTConfig, image_size=16, patch_size=8)).eval()
    info = export_hf_encoder(model, tmp_path / "vit.onnx", pooling="mean", progress=False)
    assert info.inputs == ("pixel_values",) and info.extra["modality"] == "vision"
    assert sum(1 for k in info.tensors if k.startswith("vit.")) == len(info.tensors) > 10
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with Runtime(tmp_path / "vit.onnx") as rt:
        got = rt.run({"pixel_values": x})["embeddings"]
    with torch.no_grad():
        want = model(pixel_values=torch.from_numpy(x)).last_hidden_state.mean(1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_bad_pooling_and_non_encoders_are_refused():
    from exporters.hf import PooledEncoder

    with pytest.raises(ConfigError, match="pooling 'max'.*mean, cls, pooler, none"):
        PooledEncoder.wrap(transformers.BertModel(tiny_config(transformers.BertConfig)), pooling="max")
    with pytest.raises(ConfigError, match="neither input_ids nor pixel_values"):
        PooledEncoder.wrap(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(tmp_path):
    """The real all-MiniLM-L6-v2, offline: device tokenizer + ONNX embeddings vs sentence-transformers' own."""
    st = pytest.importorskip("sentence_transformers")
    from exporters.hf import export_hf_encoder
    from exporters.minilm import minilm_dir

    sentences = [
        "A small model adapts to new data on the edge device.",
        "The weather is lovely today.",
        "Sparse adapters overwrite a few weights in place.",
        "How do I switch adapters without rebuilding the session?",
        "Raspberry Pi",
        "Completely unrelated: a recipe for tomato soup with basil and garlic, served warm.",
    ]
    info = export_hf_encoder(minilm_dir(), tmp_path / "minilm.onnx", seq_len=128, progress=False)
    assert info.extra["pooling"] == "mean" and info.extra["normalize"] == "l2"
    want = st.SentenceTransformer(str(minilm_dir()), device="cpu").encode(sentences, convert_to_numpy=True)
    with Runtime(tmp_path / "minilm.onnx") as rt:
        got = embed(rt, sentences)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.9999, cos


@pytest.mark.slow
def test_minilm_on_litert_matches_sentence_transformers(tmp_path):
    """The same check on LiteRT (needs the litert-torch converter, the project's tflite-export extra)."""
    pytest.importorskip("litert_torch")
    st = pytest.importorskip("sentence_transformers")
    from exporters.hf import export_hf_encoder
    from exporters.minilm import minilm_dir

    sentences = ["A small model adapts to new data on the edge device.", "Raspberry Pi", "Tomato soup with basil."]
    export_hf_encoder(minilm_dir(), tmp_path / "minilm.tflite", seq_len=128, file_format="tflite")
    want = st.SentenceTransformer(str(minilm_dir()), device="cpu").encode(sentences, convert_to_numpy=True)
    with Runtime(tmp_path / "minilm.tflite", backend="tflite") as rt:
        got = embed(rt, sentences)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.9999, cos


def _cli_main(monkeypatch, argv) -> int:
    """``edge ARGV`` with the host ``export`` command joined in (as its entry point does once installed)."""
    from importlib.metadata import entry_points

    from edge import cli

    installed = any(ep.name == "export" for ep in entry_points(group=cli.ENTRY_POINT_GROUP))
    if not installed and "exporters.commands.export" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "exporters.commands.export"))
    return cli.main(argv)


def test_edge_export_command_writes_a_validated_model(tmp_path, monkeypatch, capsys):
    import json

    model = transformers.ResNetModel(
        transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic")
    )
    model.save_pretrained(tmp_path / "resnet")  # model.safetensors + config.json, as downloaded models come
    out = tmp_path / "resnet.onnx"
    assert (
        _cli_main(monkeypatch, ["export", str(tmp_path / "resnet"), "--out", str(out), "--image-size", "32", "-q"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["pooling"] == "pooler" and summary["model_type"] == "resnet" and summary["format"] == "onnx"
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with Runtime(out) as rt:
        got = rt.run({"pixel_values": x})["embeddings"]
    with torch.no_grad():
        want = model.eval()(pixel_values=torch.from_numpy(x)).pooler_output.flatten(1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)

    code = _cli_main(
        monkeypatch, ["export", str(tmp_path / "resnet"), "--out", str(tmp_path / "m.tflite"), "--format", "onnx"]
    )
    assert code == 2 and "does not end in .onnx" in capsys.readouterr().err


def test_edge_export_without_torch_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import importlib.util

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert _cli_main(monkeypatch, ["export", str(tmp_path / "m"), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "edge export" in err and "pip install" in err
