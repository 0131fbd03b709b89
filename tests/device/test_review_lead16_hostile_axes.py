"""Hostile axes in files given to ``tap_model`` (a review of this session's RMS-norm search and axes folding).

The RMS-norm search (``edge.route.tapnorms``) decoded a ReduceMean's axes with ``int()``: a Constant holding NaN or
1e300 raised a bare ValueError / OverflowError, a tensor of element type UNDEFINED a bare TypeError. The axes fold
(``edge.route.tapfold``) decoded its initializers outside its guard (a bare TypeError) and ran a Concat of a million
inputs before its 64-value bound (578 MB for a 3 MB file); ``tapshapes.Layouts`` reshaped an int64 record shorter
than its dims (a bare ValueError). Each is now no norm, no fold or no constant: the search goes on, and a file with
nothing to tap is the usual ``ConfigError``.
"""

from __future__ import annotations

import resource

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.errors import ConfigError
from edge.route.tapfold import fold_axes
from edge.route.taps import tap_model


def _rms(path, axes_node):
    """A block whose only norm candidate is an RMS norm written out, its ReduceMean's axes from ``axes_node``."""
    inits = [
        numpy_helper.from_array(np.ones((4, 4), np.float32), "w"),
        numpy_helper.from_array(np.float32(2), "two"),
        numpy_helper.from_array(np.float32(1e-6), "eps"),
        numpy_helper.from_array(np.ones(4, np.float32), "g"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Pow", ["h", "two"], ["sq"]),
        axes_node,
        helper.make_node("ReduceMean", ["sq", "ax"], ["m"], keepdims=1),
        helper.make_node("Add", ["m", "eps"], ["a"]),
        helper.make_node("Sqrt", ["a"], ["r"]),
        helper.make_node("Reciprocal", ["r"], ["inv"]),
        helper.make_node("Mul", ["h", "inv"], ["n"]),
        helper.make_node("Mul", ["n", "g"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8, 4])
    g = helper.make_graph(nodes, "rms", [x], [y], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize(
    "axes",
    [
        helper.make_node("Constant", [], ["ax"], value_float=float("nan")),
        helper.make_node("Constant", [], ["ax"], value_float=1e300),
        helper.make_node("Constant", [], ["ax"], value_float=1.5),
        helper.make_node("Constant", [], ["ax"], value=TensorProto(name="v", dims=[1], data_type=0)),
        helper.make_node("Constant", [], ["ax"], value=helper.make_tensor("v", TensorProto.STRING, [1], [b"-1"])),
    ],
    ids=["nan", "1e300", "half", "undefined", "string"],
)
def test_axes_that_are_no_integers_make_no_norm_and_a_typed_refusal(tmp_path, axes):
    src = _rms(tmp_path / "m.onnx", axes)
    for taps in ("attn", "auto"):
        with pytest.raises(ConfigError, match=f"tap set '{taps}' finds nothing.* 0 norms of tokens"):
            tap_model(src, tmp_path / "t.onnx", taps)


def test_the_same_chain_with_axes_minus_one_is_counted_as_a_norm(tmp_path):  # the control: the chain is a norm
    axes = helper.make_node("Constant", [], ["ax"], value=numpy_helper.from_array(np.array([-1], np.int64)))
    with pytest.raises(ConfigError, match=r"finds nothing.* 1 norms of tokens"):  # one norm is no block to tap
        tap_model(_rms(tmp_path / "m.onnx", axes), tmp_path / "t.onnx", "attn")


def _unsqueezed(path, axes_init):
    inits = [axes_init, numpy_helper.from_array(np.ones((4, 4), np.float32), "w")]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["t"]),
        helper.make_node("Identity", ["a0"], ["a1"]),
        helper.make_node("Unsqueeze", ["t", "a1"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8, 4])
    g = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(
    "record",
    [
        TensorProto(name="a0", dims=[1], data_type=0, int32_data=[1]),  # element type UNDEFINED
        TensorProto(name="a0", dims=[3], data_type=TensorProto.INT64, int64_data=[1]),  # 1 value for 3
    ],
    ids=["undefined", "short"],
)
def test_an_axes_record_that_does_not_decode_is_left_unfolded_and_the_tap_taken(tmp_path, record):
    src = _unsqueezed(tmp_path / "m.onnx", record)
    tapped = tap_model(src, tmp_path / "t.onnx", ["t"], mask=None, layout={"t": "channels-last"})
    assert tapped.tensors == ("t",) and tapped.width == 4


def test_a_concat_of_a_million_inputs_is_not_run_to_fold_axes():
    inits = [numpy_helper.from_array(np.arange(64, dtype=np.int64), "a")]
    k = 200_000
    nodes = [helper.make_node("Concat", ["a"] * k, ["c"], axis=0), helper.make_node("Unsqueeze", ["x", "c"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    g = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert fold_axes(m) is m  # nothing folded: the Concat would make 12.8 M values
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grew_mb < 50, grew_mb  # it made 100 MB of int64 before it was checked
