"""Integer feeds: token ids come as int64 from a tokenizer and a converted TFLite model takes int32."""

from __future__ import annotations

import numpy as np
import pytest

from edge.errors import ConfigError
from edge.format.feeds import InputSpec, check_feeds

SPECS = {"ids": InputSpec("ids", np.dtype(np.int32), ("batch", 4))}


def test_integer_ids_are_narrowed_when_every_value_fits():
    ids = np.array([[101, 7, 2**31 - 1, -(2**31)]], dtype=np.int64)
    out = check_feeds({"ids": ids}, SPECS)["ids"]
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, ids)


@pytest.mark.parametrize("bad", [2**31, -(2**31) - 1])
def test_integer_ids_outside_the_model_type_are_refused(bad):
    with pytest.raises(ConfigError, match=r"outside the model's int32 range"):
        check_feeds({"ids": np.array([[1, 2, 3, bad]], dtype=np.int64)}, SPECS)


def test_floats_are_never_converted_to_integers():
    with pytest.raises(ConfigError, match="must be int32"):
        check_feeds({"ids": np.zeros((1, 4), np.float32)}, SPECS)
