"""Encoding with a tokenizer.json that loads but cannot encode is a typed error (review N, session 16).

Before: a WordPiece ``tokenizer.json`` whose vocabulary lacks its ``unk_token`` loaded (``Tokenizer.from_file``'s
checks passed), then ``encode``/``edge.text.embed`` failed with tokenizers' bare ``Exception`` ("WordPiece error:
Missing [UNK] token from the vocabulary"); a non-string text was tokenizers' bare TypeError. A model whose metadata
names its tokenizer ``/`` or ``.`` made ``Tokenizer.for_model`` (``edge.text.embed``) raise pathlib's bare
``ValueError: Invalid name ''``.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("tokenizers", reason="text models need the `tokenizers` package")

from edge.errors import ConfigError, FormatError  # noqa: E402
from edge.text import Tokenizer  # noqa: E402


def _wordpiece(tmp_path, vocab: dict) -> Tokenizer:
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "WordPiece",
            "vocab": vocab,
            "unk_token": "[UNK]",
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
        },
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    return Tokenizer.from_file(tmp_path / "tokenizer.json", seq_len=6)


def test_a_vocabulary_without_its_unknown_token_is_a_format_error_at_encode(tmp_path):
    tok = _wordpiece(tmp_path, {"[PAD]": 0, "hello": 1})
    assert tok.encode("hello")["input_ids"].tolist() == [[1, 0, 0, 0, 0, 0]]  # what it knows still encodes
    with pytest.raises(FormatError, match=r"cannot encode these texts: WordPiece error: Missing \[UNK\]"):
        tok.encode(["hello", "world"])


def test_a_text_that_is_no_string_is_a_config_error(tmp_path):
    tok = _wordpiece(tmp_path, {"[PAD]": 0, "[UNK]": 1, "hello": 2})
    assert tok.encode(["hello", "x"])["input_ids"].tolist() == [[2, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    with pytest.raises(ConfigError, match="texts must be strings, got a int: '7'"):
        tok.encode(["hello", 7])
    with pytest.raises(ConfigError, match="got a bytes"):
        tok.encode([b"hello"])


@pytest.mark.parametrize("name", ["/", ".", "..", "a/.."])
def test_a_tokenizer_name_that_is_no_file_name_is_a_format_error(tmp_path, name):
    _wordpiece(tmp_path, {"[PAD]": 0, "[UNK]": 1})  # tokenizer.json beside the model: still not what it names
    info = SimpleNamespace(name="m", extra={"tokenizer": name, "seq_len": 6}, inputs=("input_ids",))
    runtime = SimpleNamespace(info=info, model_path=str(tmp_path / "m.onnx"))
    with pytest.raises(FormatError, match=r"model 'm' names its tokenizer .*, not a file name"):
        Tokenizer.for_model(runtime)
    info.extra["tokenizer"] = "sub/tokenizer.json"  # a path: its file name, beside the model
    assert Tokenizer.for_model(runtime).encode("x")["input_ids"].tolist() == [[1, 0, 0, 0, 0, 0]]
