"""``tap_model``'s arguments of the wrong type: a ``ConfigError`` naming what was given and the signature, never a
bare ``TypeError``/``AttributeError`` (the taps and ``dst`` swapped raised ``'PosixPath' object is not iterable``).
A source that is no regular file (a FIFO) is refused by name instead of blocking the read."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.errors import ConfigError, FormatError
from edge.route.taps import Head, tap_model

SIGNATURE = "tap_model(src, dst, taps='auto', *, head=None, mask='auto', layout=None)"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """x [B, 4] -> MatMul -> h [B, 4] -> Relu -> y."""
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[w],
    )
    path = tmp_path_factory.mktemp("args") / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_right_order_taps(model, tmp_path):
    assert tap_model(model, tmp_path / "t.onnx", ["h"]).width == 4


@pytest.mark.parametrize(
    "call, says",
    [
        (lambda m, d: tap_model(m, "auto", d), "taps must be a tap set name .* got PosixPath .*src and dst come first"),
        (lambda m, d: tap_model("auto", m, d), "src 'auto' is a tap set name, not a model file: .*wrong order"),
        (lambda m, d: tap_model(None, d), "src must be the ONNX model to tap .* got NoneType None"),
        (lambda m, d: tap_model(m, None), "dst must be the path to write the tapped model to .* got NoneType"),
        (lambda m, d: tap_model(m, d, 3), "taps must be a tap set name .* got int 3"),
        (lambda m, d: tap_model(m, d, b"auto"), "taps must be .* got bytes b'auto'"),
        (lambda m, d: tap_model(m, d, {"h": 1}), "taps must be .* got dict"),
        (lambda m, d: tap_model(m, d, ["h", 2]), "taps must be tensor names \\(str\\), got int 2 among them"),
        (lambda m, d: tap_model(m, d, ["h"], head="hdc"), "head must be an edge.route.taps.Head or None, got str"),
        (lambda m, d: tap_model(m, d, ["h"], mask=1), "mask must be 'auto', an input's name or None, got int 1"),
        (lambda m, d: tap_model(m, d, ["h"], layout=["h"]), "layout must be a mapping .* got list \\['h'\\]"),
        (lambda m, d: tap_model(m, d.parent, ["h"]), "dst '.*' is a directory; give the path of the file"),
    ],
)
def test_wrong_arguments_are_config_errors(model, tmp_path, call, says):
    with pytest.raises(ConfigError, match=says) as e:
        call(model, tmp_path / "t.onnx")
    assert SIGNATURE in str(e.value) or "directory" in str(e.value)
    assert not (tmp_path / "t.onnx").exists()


def test_a_fifo_is_refused_not_read(tmp_path):
    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="FIFO"):
        tap_model(fifo, tmp_path / "t.onnx", ["h"])


def test_head_of_the_right_type_passes(model, tmp_path):
    with pytest.raises(FormatError, match="no 'edge' metadata"):  # past the argument checks: the file is not edge's
        tap_model(model, tmp_path / "t.onnx", ["h"], head=Head(domains=2))
