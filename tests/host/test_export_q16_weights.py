"""A checkpoint that lacks weights the export uses is refused, not exported with random ones.

``edge export DIR`` of a folder whose weights file missed some tensors (a partial checkpoint, another
architecture's names, a weight stored in another shape) exited 0: transformers filled them with random values
and printed a load report (a shape mismatch was a RuntimeError traceback). Now the export refuses, as a
FormatError naming the first few and how many, exactly the weights the traced forward reads: BERT's pooler,
dropped under mean pooling, may be absent; so may a BatchNorm's ``num_batches_tracked``, unread in eval mode.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.errors import FormatError  # noqa: E402
from exporters.hf import export_hf_encoder  # noqa: E402

QUERY = "encoder.layer.0.attention.self.query"
BERT = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}


def _variant(root, src, name, edit):
    (root / name).mkdir()
    (root / name / "config.json").write_bytes((root / src / "config.json").read_bytes())
    weights = edit(load_file(root / src / "model.safetensors"))
    save_file(weights, root / name / "model.safetensors", metadata={"format": "pt"})
    return root / name


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("q16weights")
    torch.manual_seed(0)
    T.BertModel(T.BertConfig(**BERT, intermediate_size=32, max_position_embeddings=32)).save_pretrained(root / "bert")
    resnet = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    T.ResNetModel(resnet).save_pretrained(root / "resnet")
    keep = lambda sd, drop: {k: v for k, v in sd.items() if not any(d in k for d in drop)}  # noqa: E731
    wrong = lambda sd: {**sd, f"{QUERY}.weight": torch.zeros(8, 16)}  # noqa: E731
    st = _variant(root, "bert", "nopooler", lambda sd: keep(sd, ("pooler",)))  # a sentence-transformers folder
    modules = [{"path": "", "type": "sentence_transformers.models.Transformer"}]
    modules.append({"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    (st / "modules.json").write_text(json.dumps(modules))
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": false}')
    return {
        "bert": root / "bert",
        "holed": _variant(root, "bert", "holed", lambda sd: keep(sd, (QUERY, "pooler"))),
        "nopooler": st,
        "mismatched": _variant(root, "bert", "mismatched", wrong),
        "renamed": _variant(root, "bert", "renamed", lambda sd: {f"body.{k}": v for k, v in sd.items()}),
        "resnet": root / "resnet",
        "no_stats": _variant(root, "resnet", "no_stats", lambda sd: keep(sd, ("embedder.normalization.running_",))),
        "no_count": _variant(root, "resnet", "no_count", lambda sd: keep(sd, ("num_batches_tracked",))),
    }


def test_missing_weights_the_graph_reads_are_refused_and_nothing_is_written(folders, tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(FormatError, match=r"holed: 2 weight\(s\) the exported model uses are missing") as e:
        export_hf_encoder(folders["holed"], out, seq_len=16, progress=False)
    assert f"{QUERY}.bias (missing); {QUERY}.weight (missing)." in str(e.value)
    assert "pooler" not in str(e.value) and not out.exists()


def test_a_weight_stored_in_another_shape_is_refused_not_a_traceback(folders, tmp_path):
    with pytest.raises(FormatError, match=r"1 weight\(s\)") as e:
        export_hf_encoder(folders["mismatched"], tmp_path / "m.onnx", seq_len=16, progress=False)
    assert f"{QUERY}.weight (shape [8, 16] in the checkpoint, [16, 16] wanted)" in str(e.value)


def test_another_architectures_names_name_the_first_five_and_the_count(folders, tmp_path):
    used = len(load_file(folders["bert"] / "model.safetensors")) - 2  # every tensor but the pooler's two
    with pytest.raises(FormatError, match=rf"renamed: {used} weight\(s\) the exported model uses") as e:
        export_hf_encoder(folders["renamed"], tmp_path / "m.onnx", seq_len=16, progress=False)
    assert str(e.value).count(" (missing)") == 5 and "(missing) ..." in str(e.value)


def _stored(path, name):
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    return next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == name)


def test_weights_the_export_drops_may_be_missing(folders, tmp_path, caplog):
    """No pooler weights: mean pooling exports (the checkpoint's values); pooling='pooler' reads them: refused."""
    with caplog.at_level(logging.INFO, logger="exporters.hf_checks"):
        info = export_hf_encoder(folders["nopooler"], tmp_path / "cut.onnx", seq_len=16, progress=False)
    noted = [r.getMessage() for r in caplog.records if r.name == "exporters.hf_checks"]
    assert len(noted) == 1 and "2 weight(s) not in the checkpoint, unused by the export" in noted[0]
    assert info.extra["pooling"] == "mean" and not any("pooler" in n for n in info.tensors)
    want = load_file(folders["bert"] / "model.safetensors")["embeddings.word_embeddings.weight"].numpy()
    np.testing.assert_array_equal(_stored(tmp_path / "cut.onnx", "bert.embeddings.word_embeddings.weight"), want)
    with pytest.raises(FormatError, match=r"2 weight\(s\).*pooler\.dense\.bias \(missing\); pooler\.dense\.weight"):
        export_hf_encoder(folders["nopooler"], tmp_path / "p.onnx", seq_len=16, pooling="pooler", progress=False)


def test_buffers_count_by_whether_the_forward_reads_them(folders, tmp_path):
    """BatchNorm running statistics are read in eval mode (refused); num_batches_tracked is not (exported)."""
    with pytest.raises(FormatError, match=r"2 weight\(s\).*embedder\.normalization\.running_mean \(missing\)"):
        export_hf_encoder(folders["no_stats"], tmp_path / "s.onnx", image_size=32, progress=False)
    info = export_hf_encoder(folders["no_count"], tmp_path / "c.onnx", image_size=32, progress=False)
    assert info.extra["image_size"] == 32
    name = "embedder.embedder.convolution.weight"
    want = load_file(folders["resnet"] / "model.safetensors")[name].numpy()
    np.testing.assert_array_equal(_stored(tmp_path / "c.onnx", f"resnet.{name}"), want)


def test_cli_refuses_in_one_line_with_exit_2(folders, tmp_path, capsys):
    out = tmp_path / "e.onnx"
    code = main(["export", str(folders["holed"]), "--out", str(out), "--seq-len", "16", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert err[-1].startswith("edge: error: ") and "2 weight(s) the exported model uses" in err[-1]
    assert f"{QUERY}.bias (missing)" in err[-1] and "Traceback" not in "\n".join(err)
