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


def test_the_checker_remembers_only_what_cannot_change_the_verdict():
    from edge.format.feeds import FeedChecker

    spec = {"x": InputSpec("x", np.dtype(np.float32), ("batch", 3)), "ids": SPECS["ids"]}
    check = FeedChecker(spec, frozenset({"w"}))
    good = {"x": np.zeros((2, 3), np.float32), "ids": np.zeros((2, 4), np.int32)}
    for _ in range(2):  # the second call is a memo hit: same verdict, same arrays, a new dict
        out = check(good)
        assert out == good and out is not good and all(out[k] is good[k] for k in good)
    assert len(check._seen) == 1
    bad = [
        ({"x": np.zeros((2, 3), np.float64), "ids": good["ids"]}, "must be float32"),
        ({"x": np.zeros((2, 4), np.float32), "ids": good["ids"]}, "shape"),
        ({"x": np.zeros((3, 3), np.float32), "ids": good["ids"]}, "dimension 'batch'"),
        ({"x": good["x"], "ids": good["ids"], "w": np.zeros(1, np.float32)}, "only load_adapter/switch"),
        ({"x": good["x"]}, "missing model input"),
        ({"x": np.zeros((2, 3), np.float32).astype(">f4"), "ids": good["ids"]}, "byte order"),
    ]
    for feeds, words in bad:
        with pytest.raises(ConfigError, match=words):
            check(feeds)
    wide = {"x": good["x"], "ids": np.zeros((2, 4), np.int64)}  # converted: checked every time, never remembered
    assert check(wide)["ids"].dtype == np.int32
    with pytest.raises(ConfigError, match="outside the model's int32 range"):
        check({"x": good["x"], "ids": np.full((2, 4), 2**40, np.int64)})
    strided = {"x": np.zeros((2, 6), np.float32)[:, ::2], "ids": good["ids"]}  # copied: not remembered
    assert check(strided)["x"].flags.c_contiguous
    assert len(check._seen) == 1


def test_a_float_input_to_a_full_integer_model_is_told_to_quantize_not_cast():
    from edge.format.feeds import dtype_hint

    hint = dtype_hint(np.dtype(np.float32), np.dtype(np.int8))
    assert "quantized inputs" in hint and "zero_point" in hint and "astype(np.int8)" in hint
    assert dtype_hint(np.dtype(np.float64), np.dtype(np.float32)) == "convert it with x.astype(...)"
