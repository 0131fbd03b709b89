"""The footprint prediction of a model with a dynamic sequence length (runtimes.ort_footprint, runtimes.ort_lengths).

torch.onnx declares a dynamic-length transformer's activations as ``[batch, seq, hidden]`` and its decomposed
attention scores as ``[batch, heads, seq, seq]``. The walk sized only what had no dynamic axis but the batch, so every
``seq``-sized tensor went unsized and what followed the position table was sized from the one row it read: small
BERT/RoBERTa/DistilBERT encoders (and a fused opset-23 BERT) were predicted as 1-token runs, 9-44 % under at 64-128
tokens, 34-85 % under at 512 (measured in fresh processes: test_footprint_D19_measured.py). Now the axes are sized
at the length the model runs at: ``dims`` given, the model's ``max_seq_length``, the graph's own bound
(``Min(512, seq)``), else those tensors are not counted (a lower bound, saying why and what to pass).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper

from edge.errors import ConfigError
from runtimes.ort_footprint import ort_parts
from runtimes.ort_lengths import dim_value, run_axes

H, HEADS = 32, 2


def _attention_model(seq="seq", bound: int | None = None, meta: dict | None = None):
    """x [batch, seq, H] -> q, k (MatMul with constant weights) -> scores = q @ k^T [batch, HEADS, seq, seq] ->
    softmax -> @ v -> y [batch, seq, H]; value infos as torch.onnx writes them (symbolic dims). ``bound``: a position
    slice declared ``[1, Min(bound, seq), H]`` as torch writes it, beside a table of ``bound`` rows."""
    f = TensorProto.FLOAT
    w = [helper.make_tensor(n, f, [H, H], np.zeros(H * H, np.float32)) for n in ("wq", "wk", "wv")]
    shape4 = helper.make_tensor("shape4", TensorProto.INT64, [4], [0, 0, HEADS, H // HEADS])
    nodes = [helper.make_node("MatMul", ["x", n], [n[1]]) for n in ("wq", "wk", "wv")]
    for t in "qkv":
        nodes.append(helper.make_node("Reshape", [t, "shape4"], [f"{t}4"]))
        nodes.append(
            helper.make_node("Transpose", [f"{t}4"], [f"{t}h"], perm=[0, 2, 3, 1] if t == "k" else [0, 2, 1, 3])
        )
    nodes += [
        helper.make_node("MatMul", ["qh", "kh"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "vh"], ["o"]),
        helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ot", "shape3"], ["y"]),
    ]
    shape3 = helper.make_tensor("shape3", TensorProto.INT64, [3], [0, 0, H])
    table = []
    if bound:  # torch's position_ids[:, :seq]: a Slice of a stored [1, bound] table
        table = [
            helper.make_tensor("pos_table", TensorProto.INT64, [1, bound], np.arange(bound)),
            *(helper.make_tensor(k, TensorProto.INT64, [1], [v]) for k, v in (("st", 0), ("en", bound), ("ax", 1))),
        ]
        nodes.insert(0, helper.make_node("Slice", ["pos_table", "st", "en", "ax"], ["pos"]))
    vi = lambda n, dims: helper.make_tensor_value_info(n, f, dims)  # noqa: E731
    hd = H // HEADS
    infos = [vi(t, ["batch", seq, H]) for t in "qkv"] + [vi(f"{t}4", ["batch", seq, HEADS, hd]) for t in "qkv"]
    infos += [
        vi("qh", ["batch", HEADS, seq, hd]),
        vi("kh", ["batch", HEADS, hd, seq]),
        vi("vh", ["batch", HEADS, seq, hd]),
    ]
    infos += [
        vi("s", ["batch", HEADS, seq, seq]),
        vi("p", ["batch", HEADS, seq, seq]),
        vi("o", ["batch", HEADS, seq, hd]),
    ]
    infos += [vi("ot", ["batch", seq, HEADS, hd])]
    if bound is not None:
        infos.append(helper.make_tensor_value_info("pos", TensorProto.INT64, [1, f"Min({bound}, {seq})"]))
    graph = helper.make_graph(
        nodes,
        "attn",
        [vi("x", ["batch", seq, H])],
        [vi("y", ["batch", seq, H])],
        [*w, shape4, shape3, *table],
        value_info=infos,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if meta is not None:
        helper.set_model_props(model, {"edge": json.dumps({"extra": meta})})
    return model


def _expected_peak(L: int, batch: int = 1) -> int:
    """By hand: x (the input) lives throughout, a tensor from its writer to its last reader. Five [L, H] tensors at
    once while q, k, v are reshaped and transposed; at the softmax x, vh, s and p; at the MatMul after it x, vh, p
    and o."""
    act, score = batch * L * H * 4, batch * HEADS * L * L * 4
    return max(5 * act, 2 * act + 2 * score, 3 * act + score)


@pytest.mark.parametrize("L", [64, 128, 512])
def test_a_dynamic_length_is_sized_at_the_length_given(L):
    """The activations at ``dims={"seq": L}``: the scores [1, 2, L, L] twice (before and after the softmax) beside
    [1, L, 32] activations; before, every ``seq`` tensor was unsized: 0 bytes whatever the length."""
    parts = ort_parts(_attention_model(), {}, set(), dims={"seq": L})
    assert parts.activations == _expected_peak(L)
    assert ort_parts(_attention_model(), {}, set(), batch=3, dims={"seq": L}).activations == _expected_peak(L, 3)


def test_the_scores_grow_with_the_square_of_the_length():
    a, b = (ort_parts(_attention_model(), {}, set(), dims={"seq": n}).activations for n in (128, 512))
    assert b / a > 10  # 2 x [2, L, L] dominates: 16x at 4x the length (15.1 with the [L, 32] tensors)


def test_the_length_comes_from_the_models_max_seq_length_when_not_given():
    """``edge export --dynamic-seq --seq-len N`` records ``max_seq_length`` N, where the runtime's tokenizer truncates:
    the prediction takes it; ``dims`` wins over it."""
    meta = _attention_model(meta={"max_seq_length": 96, "seq_len": None})
    assert ort_parts(meta, {}, set()).activations == _expected_peak(96)
    assert ort_parts(meta, {}, set(), dims={"seq": 200}).activations == _expected_peak(200)
    fixed_meta = _attention_model(meta={"seq_len": 40})
    assert ort_parts(fixed_meta, {}, set()).activations == _expected_peak(40)


def test_the_length_comes_from_the_graphs_own_bound_last():
    """torch writes ``Min(512, seq)`` where the positions are sliced from a table of 512 rows: the longest input the
    graph runs. It is the length when neither ``dims`` nor the metadata gives one; the metadata's is preferred."""
    assert ort_parts(_attention_model(bound=80), {}, set()).activations == _expected_peak(80)
    both = _attention_model(bound=512, meta={"max_seq_length": 64})
    assert ort_parts(both, {}, set()).activations == _expected_peak(64)
    assert run_axes(_attention_model(bound=80), {}, None, batch=2) == ({"batch": 2, "seq": 80}, "")


def test_an_unknown_length_gives_a_lower_bound_that_says_why():
    """With no length (no dims, metadata or bound), the tensors along the axis are not counted, as before lengths were
    known: a CNN with dynamic height and width or an imported file with no record of its length still loads and
    predicts; the parts say why the figure is a lower bound and what to pass (a budget logs it)."""
    parts = ort_parts(_attention_model(), {}, set())
    assert parts.unsized and all(k in parts.unsized for k in ("'x'", "'seq'", "lower bound", "max_seq_length", "dims="))
    sized = ort_parts(_attention_model(), {}, set(), dims={"seq": 64})
    assert not sized.unsized
    for strategy in ("bound", "rebuild", "hybrid"):
        assert 0 < parts.mb(strategy) < sized.mb(strategy)
    for bad in ({"seq": 0}, {"seq": 1.5}, {"seq": "128"}):
        with pytest.raises(ConfigError, match=r"not positive integers.*'seq': 256"):
            ort_parts(_attention_model(), {}, set(), dims=bad)


def test_dims_naming_no_axis_are_refused_and_the_batch_is_honoured():
    """A misspelt axis would leave the one meant unsized, unsaid: refused, naming the model's axes."""
    with pytest.raises(ConfigError, match=r"\['sequence'\] name no dynamic axis.*'seq'"):
        ort_parts(_attention_model(), {}, set(), dims={"sequence": 64})
    one = ort_parts(_attention_model(), {}, set(), dims={"seq": 64})
    eight = ort_parts(_attention_model(), {}, set(), dims={"seq": 64, "batch": 8})
    assert eight.activations == 8 * one.activations


def test_only_a_slice_of_a_stored_table_bounds_the_length():
    """``Min(512, seq)`` on the Slice of a stored [1, 512] table bounds the length; a prefix slice of an activation
    (pooling ``h[:, :4]`` writes ``Min(4, seq)``) does not, even when some weight has 4 rows."""
    from runtimes.ort_lengths import _graph_bounds

    f, i64, vi = TensorProto.FLOAT, TensorProto.INT64, helper.make_tensor_value_info
    consts = [helper.make_tensor(k, i64, [1], [v]) for k, v in (("st", 0), ("en", 512), ("four", 4), ("ax", 1))]
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["table", "st", "en", "ax"], ["pos"]),
            helper.make_node("Relu", ["x"], ["h"]),
            helper.make_node("Slice", ["h", "st", "four", "ax"], ["head"]),
        ],
        "g",
        [vi("x", f, ["batch", "seq"])],
        [vi("head", f, ["batch", "Min(4, seq)"])],
        [helper.make_tensor("table", i64, [1, 512], np.arange(512)), helper.make_tensor("w", f, [4, 8], [0.0] * 32)]
        + consts,
        value_info=[vi("pos", i64, [1, "Min(512, seq)"])],
    )
    assert _graph_bounds(graph, {"seq"}, {}) == {"seq": 512}
    graph.node.pop(0)  # no slice of a stored table: no bound
    assert _graph_bounds(graph, {"seq"}, {}) == {}


def test_a_fixed_length_graph_is_unchanged():
    """A graph whose only dynamic axis is the batch needs no length."""
    model = _attention_model(seq=64)
    assert ort_parts(model, {}, set()).activations == _expected_peak(64)
    assert not ort_parts(model, {}, set()).unsized


@pytest.mark.parametrize(
    ("expr", "want"),
    [
        ("seq", 100),
        ("Min(512, seq)", 100),
        ("Min(64, seq)", 64),
        ("Max(seq, 1)", 100),
        ("2*seq + 1", 201),
        ("seq//2", 50),
        ("batch*seq", 300),
        ("s0", None),  # an axis not known
        ("seq - 200", None),  # below 1
        ("seq**99999", None),  # no power
        ("__import__('os').getpid()", None),  # nothing else is run
        ("Min(seq, x=1)", None),
        ("seq.bit_length()", None),
        ("(" * 200 + "seq" + ")" * 200, None),  # longer than torch writes: not parsed
        ("", None),
        ("seq +", None),
        ("seq // 0", None),
    ],
)
def test_a_symbolic_dim_is_evaluated_from_integers_and_min_max_only(expr, want):
    assert dim_value(expr, {"seq": 100, "batch": 3}) == want


def test_a_hostile_files_dims_give_a_finite_prediction_no_budget_admits():
    """Dims of 2**62 each, or an expression of the length that multiplies out past a float: each tensor is counted up
    to 2**62 elements, so the prediction is a finite figure no budget admits, not an OverflowError (a traceback)."""
    f, vi = TensorProto.FLOAT, helper.make_tensor_value_info
    nines = "*".join(["9" * 30] * 3)
    for dims in ([2**62] * 20, ["batch", "seq", nines, "*".join(["seq"] * 28)]):
        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "g", [vi("x", f, ["batch", "seq"])], [vi("y", f, dims)]
        )
        parts = ort_parts(helper.make_model(graph), {}, set(), dims={"seq": 10**9})
        for strategy in ("bound", "rebuild", "hybrid"):
            assert 1e12 < parts.mb(strategy) < float("inf")
