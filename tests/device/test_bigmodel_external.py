"""Models whose external data would pass protobuf's 2 GB limit on one file: refused before any of it is read.

``edge import-onnx`` stores external data inline (one self-contained file, what the device runtime reads). A model
over the limit used to be read whole (4.3 GB resident for a 2.1 GB weight) and then fail to serialise with a
traceback; now its declared sizes are summed first. The data file here is far shorter than declared: a read of it
would fail with another error, so the test also proves nothing was read.
"""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from edge.cli import main
from edge.convert.onnx_import import import_onnx
from edge.convert.onnx_source import PROTOBUF_LIMIT
from edge.errors import ConfigError


def _external(t: TensorProto, location: str) -> TensorProto:
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", location
    return t


def _model(folder, rows: int, cols: int) -> str:
    """x @ w, with w [rows, cols] float32 declared in external data; the data file holds only 16 bytes."""
    w = _external(TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[rows, cols]), "m.onnx.data")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
        [w],
    )
    path = folder / "m.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    (folder / "m.onnx.data").write_bytes(b"\0" * 16)
    return str(path)


def test_a_model_over_the_protobuf_limit_is_refused_before_its_data_is_read(tmp_path):
    src = _model(tmp_path, 32768, 16448)  # 2,155,872,256 bytes declared
    with pytest.raises(ConfigError, match="2 GB limit") as e:
        import_onnx(src, tmp_path / "out.onnx")
    assert f"{PROTOBUF_LIMIT:,}" in str(e.value) and "2,155,872,256" in str(e.value)
    assert not (tmp_path / "out.onnx").exists()


def test_the_cli_says_so_in_one_line_and_exits_2(tmp_path, capsys):
    src = _model(tmp_path, 1 << 20, 1 << 20)  # 4 TiB declared: the size is summed in Python ints
    assert main(["import-onnx", src, "--out", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2 GB limit" in err and "not supported" in err


def test_a_model_under_the_limit_still_reads_its_external_data(tmp_path):
    src = _model(tmp_path, 2, 2)  # 16 bytes declared, 16 stored
    report = import_onnx(src, tmp_path / "out.onnx")
    assert list(report.info.tensors) == ["w"]
    stored = onnx.load_model(tmp_path / "out.onnx", load_external_data=False).graph.initializer[0]
    assert stored.data_location == TensorProto.DEFAULT and len(stored.raw_data) == 16
