"""The review of the seventeenth session's work (helper W reproduced, the lead mended).

- ``refuse_quantized_after_import`` (``edge inspect``, ``read_model_info``, ``backend="auto"``) refused an imported
  float model to which a tool had added a Q/DQ pair on an activation only: every weight float, the load accepted it.
- shira-head's bias through a Softmax output: from one sample the linear fit always passed (one row fits any bias),
  so the probabilities were taken as logits, a wrong bias with no error; a confident sample whose probability
  underflowed to 0 refused the whole batch.
- a link loop in an ``edge update --data`` folder was pathlib's bare RuntimeError (a traceback on the CLI).
- an ``Identity`` of an ``Identity`` of a weight was read through by the dynamic quantizer's bypass one step only.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.errors import ConfigError, FormatError
from edge.format.samples import load_samples
from edge.learn.shira_head import _head_bias
from exporters.quantize_graph import bypass_weight_identities
from runtimes.onnx_quant import refuse_quantized_after_import

IMPORTED = SimpleNamespace(name="m", extra={"imported": {}})


def _graph(nodes, inits):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])
    return helper.make_graph(nodes, "g", [x], [y], initializer=inits)


def _consts():
    return [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
    ]


def test_qdq_on_an_activation_only_is_described_and_stored_integers_are_refused():
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    activation = _graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
            helper.make_node("MatMul", ["xd", "w"], ["y"]),
        ],
        [w, *_consts()],
    )
    refuse_quantized_after_import(activation, IMPORTED)  # every weight float: nothing to refuse
    wq = numpy_helper.from_array(np.ones((4, 3), np.int8), "wq")
    weight = _graph(
        [
            helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
            helper.make_node("MatMul", ["x", "wd"], ["y"]),
        ],
        [wq, *_consts()],
    )
    with pytest.raises(FormatError, match=r"DequantizeLinear of stored integers \(wq\).*edge quantize"):
        refuse_quantized_after_import(weight, IMPORTED)
    integer = _graph([helper.make_node("MatMulInteger", ["x", "wq"], ["y"])], [wq])
    with pytest.raises(FormatError, match="has MatMulInteger: it was quantized after export"):
        refuse_quantized_after_import(integer, IMPORTED)
    refuse_quantized_after_import(integer, SimpleNamespace(name="m", extra={}))  # not an imported file: not this check


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("kind", ["softmax", "logsoftmax", "logits"])
def test_the_head_bias_is_exact_from_one_sample_whatever_the_output(kind):
    rng = np.random.default_rng(0)
    b = np.array([2.75, -2.25, 0.75, -1.25])
    scores = rng.standard_normal((1, 4))
    z = scores + b
    out = {"softmax": _softmax(z), "logsoftmax": np.log(_softmax(z)), "logits": z}[kind]
    got = _head_bias(out, scores, "head.weight")
    want = b if kind == "logits" else b - b.mean()
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_a_sample_whose_probability_underflowed_is_left_out_not_a_refusal():
    rng = np.random.default_rng(1)
    b = np.array([1.0, -2.0, 0.5])
    scores = rng.standard_normal((6, 3))
    scores[0] = [400.0, 0.0, 0.0]  # a confident input: its other probabilities are 0 in the model's float32
    out = _softmax(scores + b).astype(np.float32).astype(np.float64)
    assert out[0].min() == 0.0
    np.testing.assert_allclose(_head_bias(out, scores, "head.weight"), b - b.mean(), atol=1e-5)
    with pytest.raises(ConfigError, match="underflowed to 0"):
        _head_bias(out[:1], scores[:1], "head.weight")
    with pytest.raises(ConfigError, match=r"read as logits\) are not that; use ncm, slda or ranpac"):
        _head_bias(np.tanh(scores * 3) * 5, scores, "head.weight")  # neither linear nor a normalised form


def test_a_link_loop_in_a_data_folder_is_a_format_error_naming_it(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 3), np.float32), y=np.array([0, 1]))
    os.symlink(tmp_path / "b.npz", tmp_path / "b.npz")
    with pytest.raises(FormatError, match=r"b\.npz.*remove it or give the file"):
        load_samples(tmp_path)


def test_an_identity_of_an_identity_of_a_weight_is_read_directly():
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    g = _graph(
        [
            helper.make_node("Identity", ["w"], ["w1"]),
            helper.make_node("Identity", ["w1"], ["w2"]),
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("MatMul", ["x", "w2"], ["h2"]),
            helper.make_node("Add", ["h", "h2"], ["y"]),
        ],
        [w],
    )
    assert bypass_weight_identities(g) == ["w"]
    assert [n.op_type for n in g.node] == ["MatMul", "MatMul", "Add"]
    assert [n.input[1] for n in g.node[:2]] == ["w", "w"]
    onnx.checker.check_graph(g)


def test_a_torch_model_over_protobufs_2_gb_is_refused_before_the_export(tmp_path):
    torch = pytest.importorskip("torch")
    from exporters import export_onnx

    class Big(torch.nn.Module):  # 2.16 GB declared, never touched: torch.empty maps pages lazily
        def __init__(self):
            super().__init__()
            self.e = torch.nn.Parameter(torch.empty(540_000_000))

        def forward(self, x):
            return x * self.e[:4]

    with pytest.raises(ConfigError, match="2,160,000,000 bytes of weights, over protobuf's 2 GB limit"):
        export_onnx(
            Big().eval(), (torch.rand(2, 4),), tmp_path / "m.onnx", input_names=["x"], output_names=["y"], name="big"
        )
    assert not (tmp_path / "m.onnx").exists()


def _tiny_bert(**kw):
    T = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = T.BertConfig(
        vocab_size=500, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, **kw
    )
    return T.BertModel(cfg).eval()


def test_hf_export_names_the_cause_not_the_example_size(tmp_path):
    """X's review of V's probe: a tuple output (return_dict=False) was called a backbone, another model's tokenizer
    an input too small, and torch's out-of-memory error a reason to pass a larger seq_len."""
    torch = pytest.importorskip("torch")
    from exporters.hf import export_hf_encoder
    from exporters.minilm import minilm_dir

    with pytest.raises(ConfigError, match="returns a tuple.*set return_dict=True"):
        export_hf_encoder(_tiny_bert(return_dict=False), tmp_path / "a.onnx", seq_len=16, progress=False)
    with pytest.raises(ConfigError, match="beyond the model's vocab_size 500: it is another model's"):
        export_hf_encoder(
            _tiny_bert(), tmp_path / "b.onnx", seq_len=16, tokenizer=minilm_dir() / "tokenizer.json", progress=False
        )
    model = _tiny_bert()

    def oom(module, args):
        raise torch.OutOfMemoryError("out of memory")

    model.register_forward_pre_hook(oom)
    with pytest.raises(torch.OutOfMemoryError):
        export_hf_encoder(model, tmp_path / "c.onnx", seq_len=16, progress=False)
    assert not any(tmp_path.iterdir())


def test_deberta_v3s_norm_of_its_relative_position_table_is_no_tap(tmp_path):
    """DeBERTa-v2/v3 (and SEW-D) layer-norm their stored relative-position table (``norm_rel_ebd``): that norm was
    taken as a token norm, so ``auto`` and ``attn`` taps were refused ("a stored weight, not an activation")."""
    T = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    import onnxruntime as ort

    from edge.route.taps import FEATURES, tap_model
    from exporters.hf import export_hf_encoder

    torch.manual_seed(0)
    cfg = T.DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        relative_attention=True, norm_rel_ebd="layer_norm", position_buckets=8, max_relative_positions=16,
        pos_att_type=["p2c", "c2p"],
    )  # fmt: skip
    export_hf_encoder(T.DebertaV2Model(cfg).eval(), tmp_path / "m.onnx", seq_len=16, pooling="mean", progress=False)
    tapped = tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", "auto")
    stored = {t.name for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert tapped.tap_set == "auto (attn)" and len(tapped.tensors) == 2 and not stored & set(tapped.tensors)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(1, 100, (3, 16)), "attention_mask": np.ones((3, 16), np.int64)}
    feeds["token_type_ids"] = np.zeros((3, 16), np.int64)
    session = ort.InferenceSession(str(tapped.path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    (f,) = session.run([FEATURES], {k: v for k, v in feeds.items() if k in names})
    assert f.shape == (3, tapped.width) and np.abs(f[0] - f[1]).max() > 1e-3  # features of the inputs, not a table
