"""A sentence-transformers folder's settings files of the wrong shape are a typed FormatError (review N, session 16).

Before: ``modules.json`` holding an object or a list of strings, or a ``config.json``/``sentence_bert_config.json``
holding a list, was a bare AttributeError; JSON nested 100000 deep a bare RecursionError; a ``max_seq_length`` of
``"abc"``, ``-4`` or ``1`` (which edge.text.Tokenizer refuses on the device) was accepted, then failed
(``int("abc")``: a bare ValueError) or was written into the exported model's metadata.
"""

from __future__ import annotations

import json

import pytest

from edge.errors import FormatError
from exporters.hf_settings import sentence_transformers_settings

POOL = json.dumps([{"type": "sentence_transformers.models.Pooling", "path": "p"}])
CASES = {
    "modules-object": ({"modules.json": json.dumps({"a": 1})}, "not a list of objects"),
    "modules-strings": ({"modules.json": json.dumps(["x"])}, "not a list of objects"),
    "modules-deep": ({"modules.json": "[" * 100_000 + "]" * 100_000}, "nests 100000 levels deep"),
    "modules-duplicate": ({"modules.json": '[{"type": "a", "type": "b"}]'}, "duplicate"),
    "pooling-list": ({"modules.json": POOL, "p/config.json": "[1]"}, "not an object of pooling_mode"),
    "st-list": ({"modules.json": "[]", "sentence_bert_config.json": "[1]"}, "not an object with max_seq_length"),
    "st-string": ({"modules.json": "[]", "sentence_bert_config.json": '{"max_seq_length": "abc"}'}, "'abc'"),
    "st-negative": ({"modules.json": "[]", "sentence_bert_config.json": '{"max_seq_length": -4}'}, "is -4"),
    "st-one": (
        {"modules.json": "[]", "sentence_bert_config.json": '{"max_seq_length": 1}'},
        "is 1; allowed: an integer from 2",
    ),
    "st-bool": ({"modules.json": "[]", "sentence_bert_config.json": '{"max_seq_length": true}'}, "is True"),
    "st-float": ({"modules.json": "[]", "sentence_bert_config.json": '{"max_seq_length": 12.5}'}, "is 12.5"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_settings_file_of_the_wrong_shape_is_a_format_error(tmp_path, case):
    files, says = CASES[case]
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(FormatError) as e:
        sentence_transformers_settings(tmp_path)
    assert says in str(e.value), str(e.value)
    assert len(str(e.value)) < 400


def test_the_shapes_sentence_transformers_writes_still_read(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "modules.json").write_text(POOL)
    (tmp_path / "p" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
    assert sentence_transformers_settings(tmp_path) == {"pooling": "cls", "max_seq_length": 256}
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": None}))
    assert sentence_transformers_settings(tmp_path) == {"pooling": "cls", "max_seq_length": None}
