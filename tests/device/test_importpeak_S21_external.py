"""``load_external`` reads a large external tensor with onnx's ``_read_external_data_bytes``, which onnx 1.16 (the
oldest pyproject allows) does not have: every model with external data would have been refused there as "cannot read
its external data". Without it, onnx's public ``load_external_data_for_tensor`` is used: the same bytes held."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
import onnx.external_data_helper as edh  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

import edge.convert.onnx_weights as ow  # noqa: E402
from edge.convert.onnx_source import read_onnx  # noqa: E402


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    d = tmp_path_factory.mktemp("s21ext")
    w = numpy_helper.from_array(np.arange(128 * 256, dtype=np.float32).reshape(-1, 256), "W")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", 1, [1, 128])],
        [helper.make_tensor_value_info("y", 1, [1, 256])],
        [w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    want = m.SerializeToString()
    onnx.save(m, str(d / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)  # (edits m)
    return d / "m.onnx", want


class _Before(types.ModuleType):
    """onnx.external_data_helper as an onnx without ``_read_external_data_bytes`` shows it to an importer (onnx's
    own functions still reach it: 1.23's public loader calls it)."""

    def __getattr__(self, name):
        if name == "_read_external_data_bytes":
            raise AttributeError(name)
        return getattr(edh, name)


@pytest.mark.parametrize("private", [True, False])
def test_external_weights_are_held_with_or_without_onnx_private_reader(external, monkeypatch, private):
    src, want = external
    if not private:
        monkeypatch.setitem(sys.modules, "onnx.external_data_helper", _Before("onnx.external_data_helper"))
        with pytest.raises(ImportError):
            from onnx.external_data_helper import _read_external_data_bytes  # noqa: F401
    public, calls = ow._read_public, []
    monkeypatch.setattr(ow, "_read_public", lambda t, base: calls.append(t.name) or public(t, base))
    outside: dict = {}
    proto = read_onnx(src, outside=outside)
    assert sorted(outside) == ["W"] and bytes(outside["W"]) == np.arange(128 * 256, dtype=np.float32).tobytes()
    t = proto.graph.initializer[0]
    assert not t.HasField("raw_data") and not t.external_data and t.data_location == onnx.TensorProto.DEFAULT
    assert calls == ([] if private else ["W"])
    t.raw_data = bytes(outside["W"])
    assert proto.SerializeToString() == read_onnx(src).SerializeToString()  # as the whole-message path reads it
    assert (
        numpy_helper.to_array(t).tobytes()
        == numpy_helper.to_array(onnx.load_from_string(want).graph.initializer[0]).tobytes()
    )
