"""``edge quantize`` refuses what the graph alone decides before it reads the weights.

On BERT-base (436 MB, token-id inputs) a run without ``--calib`` read the whole file, parsed it twice and checked
every weight (56 s, 1.76 GB) before refusing its integer inputs. The graph, without its weights, is read first
(``exporters.commands.quantize_model.read_graph``); the same refusals run again on the bytes the quantizer gets.
"""

from __future__ import annotations

import numpy as np
import pytest
from _tiny import make_mlp, write_model
from onnx import TensorProto, helper

from edge import cli
from edge.format.modelinfo import TensorInfo


def edge(monkeypatch, *argv) -> int:
    """``edge ARGV`` with the host ``quantize`` command joined in (as its entry point does)."""
    from importlib.metadata import entry_points

    installed = {ep.name for ep in entry_points(group=cli.ENTRY_POINT_GROUP)}
    if "quantize" not in installed and "exporters.commands.quantize" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "exporters.commands.quantize"))
    return cli.main([str(a) for a in argv])


def one_line(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("edge: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


@pytest.fixture
def ids_model(tmp_path):
    """ids (int64 token ids) -> Gather(embedding) -> mean -> MatMul: a text model in miniature."""
    rng = np.random.default_rng(0)
    table, w = rng.standard_normal((50, 8)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
    path = tmp_path / "ids.onnx"
    write_model(
        path,
        "ids",
        [
            helper.make_node("Gather", ["emb.weight", "ids"], ["e"]),
            helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["m", "fc.weight"], ["y"]),
        ],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        {"emb.weight": table, "fc.weight": w},
        {
            "emb.weight": TensorInfo("emb.weight", (50, 8)),
            "fc.weight": TensorInfo("fc.weight", (4, 8), transposed=True),
        },
    )
    return path


@pytest.fixture
def no_whole_read(monkeypatch):
    """Fail the test if anything reads a whole model file (``edge.format.io.read_bounded``)."""
    import edge.format.io as io

    reads = []
    real = io.read_bounded

    def read_bounded(path, *a, **k):
        reads.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(io, "read_bounded", read_bounded)
    return reads


def test_integer_inputs_are_refused_before_the_weights_are_read(
    ids_model, tmp_path, monkeypatch, capsys, no_whole_read
):
    code = edge(monkeypatch, "quantize", ids_model, "--out", tmp_path / "q.onnx")
    one_line(capsys, code, "integer inputs ['ids']", "--calib")
    assert no_whole_read == []
    assert not (tmp_path / "q.onnx").exists()


def test_a_quantized_model_is_refused_before_its_weights_are_read(tmp_path, monkeypatch, capsys, no_whole_read):
    make_mlp(tmp_path / "m.onnx")
    assert edge(monkeypatch, "quantize", tmp_path / "m.onnx", "--out", tmp_path / "q.onnx") == 0
    capsys.readouterr()
    no_whole_read.clear()
    code = edge(monkeypatch, "quantize", tmp_path / "q.onnx", "--out", tmp_path / "qq.onnx")
    one_line(capsys, code, "quantized already", "pass the float model")
    assert no_whole_read == []


def test_the_bytes_read_are_checked_again(ids_model, tmp_path, monkeypatch, capsys):
    """The file may change between the graph's read and the whole read: the refusals run on the bytes read too."""
    import exporters.commands.quantize_model as qm

    mlp_info = make_mlp(tmp_path / "m.onnx")
    floats = qm.read_graph(tmp_path / "m.onnx")  # what a benign file said when the graph alone was read
    assert floats[0].name == mlp_info.name
    monkeypatch.setattr(qm, "read_graph", lambda src: floats)
    code = edge(monkeypatch, "quantize", ids_model, "--out", tmp_path / "q.onnx")
    one_line(capsys, code, "integer inputs ['ids']", "--calib")


def test_the_whole_model_is_parsed_once(ids_model, monkeypatch):
    """The full read parses the model's bytes once (a second parse took BERT-base 2 s; check_model sets the peak)."""
    import onnx

    from exporters.commands.quantize_model import read_model

    data = ids_model.read_bytes()
    parses = []
    real = onnx.load_model_from_string

    def load_model_from_string(b, *a, **k):
        parses.append(len(b))
        return real(b, *a, **k)

    monkeypatch.setattr(onnx, "load_model_from_string", load_model_from_string)
    info, specs = read_model(data, "onnx", ids_model)
    assert parses.count(len(data)) == 1
    assert list(specs) == ["ids"] and specs["ids"].dtype == np.int64 and info.name == "ids"
