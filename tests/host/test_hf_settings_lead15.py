"""A sentence-transformers folder's settings files are read bounded: a FIFO or a link to /dev/zero in place of
``modules.json`` is refused at once (it blocked forever, or was read until memory ran out), a good one still read."""

from __future__ import annotations

import json
import os

import pytest

from edge.errors import FormatError
from exporters.hf_settings import sentence_transformers_settings


def test_a_good_folder_is_read(tmp_path):
    (tmp_path / "pool").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([{"type": "x.Pooling", "path": "pool"}, {"type": "x.Normalize"}]))
    (tmp_path / "pool" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    assert sentence_transformers_settings(tmp_path) == {"pooling": "mean", "normalize": True, "max_seq_length": 128}


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge"])
def test_a_settings_file_that_is_no_small_regular_file_is_refused(tmp_path, kind):
    (tmp_path / "pool").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([{"type": "x.Pooling", "path": "pool"}]))
    target = tmp_path / "pool" / "config.json"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dev-zero":
        target.symlink_to("/dev/zero")
    else:
        target.write_bytes(b" " * (2 << 20))
    with pytest.raises(FormatError, match="sentence-transformers"):
        sentence_transformers_settings(tmp_path)
