"""An int8 model's load decodes each graph initializer once: the scales and zero points the metadata names are read by
:func:`runtimes.onnx_file.quant_constants` and hashed as they are by :func:`runtimes.onnx_file.verify_fingerprint`
(they were decoded a second time for the fingerprint). The check is unchanged: a changed scale is still refused."""

from __future__ import annotations

import _tiny
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edge.errors import FormatError
from edge.runtime import Runtime
from exporters.quantize import quantize_onnx
from runtimes import onnx_file as _file

X = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    d = tmp_path_factory.mktemp("ortload-once")
    _tiny.make_mlp(d / "m.onnx", sizes=(10, 16, 3))
    info = quantize_onnx(d / "m.onnx", d / "q.onnx", calib={"x": X}, reduce_range=True, min_cosine=0.5).info
    return d / "q.onnx", info


def _counting(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = _file.to_array  # edge.format.onnx_proto's, as the load path decodes them

    def to_array(t, *a, **k):
        seen.append(t.name)
        return real(t, *a, **k)

    monkeypatch.setattr(_file, "to_array", to_array)
    return seen


def test_each_kept_initializer_is_decoded_once_at_load(int8, monkeypatch):
    path, info = int8
    scales = {n for t in info.tensors.values() if t.quant is not None for n in (t.quant.scale, t.quant.zero_point)}
    assert scales  # the model has quantization constants, so both steps read some
    seen = _counting(monkeypatch)
    for strategy in ("hybrid", "bound"):
        seen.clear()
        with Runtime(path, backend="onnxruntime", strategy=strategy) as rt:
            assert rt.run({"x": X})
        assert scales <= set(seen)
        assert len(seen) == len(set(seen)), sorted(n for n in set(seen) if seen.count(n) > 1)


def test_a_changed_scale_is_still_refused_by_the_fingerprint(int8, tmp_path):
    path, info = int8
    name = next(t.quant.scale for t in info.tensors.values() if t.quant is not None)
    model = onnx.load(str(path))
    t = next(t for t in model.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(2), name))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(FormatError, match="fingerprint"):
        Runtime(tmp_path / "bad.onnx", backend="onnxruntime", strategy="hybrid")
    with Runtime(tmp_path / "bad.onnx", backend="onnxruntime", strategy="hybrid", verify=False) as rt:
        assert rt.backend.constant(name)[()] == numpy_helper.to_array(t)[()]  # read from the file as it is
