"""A corpus of damaged and hostile adapter and model files, plus fuzzing of the adapter loader.

Every file is refused with a typed error (an ``EdgeError``) that says what is wrong, and a
runtime that was serving keeps serving exactly as before.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import onnx
import pytest
from _tiny import make_mlp, random_adapter
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from safetensors.numpy import save

from edge.errors import EdgeError, FormatError
from edge.format.adapter import adapter_from_bytes
from edge.format.modelinfo import META_KEY
from edge.runtime import Runtime


def _file(meta: dict | None, arrays: dict[str, np.ndarray], raw_meta: str | None = None) -> bytes:
    md = {"edge": raw_meta if raw_meta is not None else json.dumps(meta)} if (meta or raw_meta) else None
    return save(arrays, metadata=md)


def _with_header(header: dict, payload: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + payload


def adapter_corpus(info) -> dict[str, bytes]:
    good = random_adapter(info, 7, name="good")
    t = "fc2.weight"
    idx, val = good.tensors[t].indices, good.tensors[t].values
    meta = {
        "format": "edge.adapter",
        "version": 1,
        "method": "shira",
        "name": "x",
        "base_fingerprint": info.fingerprint,
        "dtype": "float32",
        "targets": {t: [2, 20]},
        "info": {},
    }
    arrays = {f"{t}.indices": idx, f"{t}.values": val}
    valid = _file(meta, arrays)

    def variant(**changes):
        return _file({**meta, **changes}, arrays)

    def arrays_with(**changes):
        return _file(meta, {**arrays, **changes})

    flipped = bytearray(valid)
    flipped[12] ^= 0xFF
    oob = idx.copy()
    oob[1, 0] = 20
    neg = idx.copy()
    neg[0, 0] = -1
    dup = idx.copy()
    dup[:, 1] = dup[:, 0]
    nan, inf = val.copy(), val.copy()
    nan[0], inf[0] = np.nan, np.inf
    return {
        "empty": b"",
        "seven bytes": valid[:7],
        "truncated payload": valid[: len(valid) - 5],
        "truncated header": valid[:20],
        "bit-flipped header": bytes(flipped),
        "header length beyond file": struct.pack("<Q", 10_000) + valid[8:],
        "oversized header claim": struct.pack("<Q", 1 << 40) + valid[8:],
        "header not json": struct.pack("<Q", 4) + b"\xff\xfe{[",
        "no metadata": _file(None, arrays),
        "metadata not json": _file(None, arrays, raw_meta="{not json"),
        "wrong format name": variant(format="peft.lora"),
        "unknown format version": variant(version=99),
        "wrong dtype declared": variant(dtype="bfloat16"),
        "unknown method": variant(method="telepathy"),
        "no targets": variant(targets={}),
        "implausible shape": variant(targets={t: [1 << 30, 1 << 30]}),
        "wrong base fingerprint": variant(base_fingerprint="sha256:" + "0" * 32),
        "path trick in name": _file(
            {**meta, "targets": {"../../etc/passwd": [2, 20]}},
            {"../../etc/passwd.indices": idx, "../../etc/passwd.values": val},
        ),
        "unknown tensor": _file(
            {**meta, "targets": {"nope.weight": [2, 20]}}, {"nope.weight.indices": idx, "nope.weight.values": val}
        ),
        "wrong shape for model": variant(targets={t: [20, 2]}),
        "values float64": arrays_with(**{f"{t}.values": val.astype(np.float64)}),
        "indices int64": arrays_with(**{f"{t}.indices": idx.astype(np.int64)}),
        "indices 3 rows": arrays_with(**{f"{t}.indices": np.vstack([idx, idx[:1]])}),
        "values too short": arrays_with(**{f"{t}.values": val[:-1]}),
        "index out of range": arrays_with(**{f"{t}.indices": oob}),
        "negative index": arrays_with(**{f"{t}.indices": neg}),
        "duplicated index": arrays_with(**{f"{t}.indices": dup}),
        "nan value": arrays_with(**{f"{t}.values": nan}),
        "inf value": arrays_with(**{f"{t}.values": inf}),
        "extra tensor": arrays_with(**{"evil.bin": np.zeros(4, np.uint8)}),
        "tensor offsets overlap": _with_header(
            {
                "__metadata__": {"edge": json.dumps(meta)},
                f"{t}.indices": {"dtype": "I32", "shape": list(idx.shape), "data_offsets": [0, idx.nbytes]},
                f"{t}.values": {"dtype": "F32", "shape": list(val.shape), "data_offsets": [0, val.nbytes]},
            },
            idx.tobytes(),
        ),
    }


def model_corpus(tmp_path) -> dict[str, bytes]:
    path = tmp_path / "base.onnx"
    make_mlp(path)
    data = path.read_bytes()
    m = onnx.load(str(path))

    def edited(fn) -> bytes:
        c = onnx.ModelProto()
        c.CopyFrom(m)
        fn(c)
        return c.SerializeToString()

    def set_meta(value):
        def fn(c):
            for p in c.metadata_props:
                if p.key == META_KEY:
                    p.value = value

        return fn

    def tamper(c):
        w = numpy_helper.to_array(c.graph.initializer[0]).copy()
        w.flat[3] = 1e6
        c.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, c.graph.initializer[0].name))

    meta = json.loads(next(p.value for p in m.metadata_props if p.key == META_KEY))
    missing = json.loads(json.dumps(meta))
    missing["tensors"]["ghost.weight"] = {"initializer": "ghost.weight", "shape": [2, 2], "transposed": False}
    return {
        "empty model": b"",
        "truncated model": data[: len(data) // 2],
        "random bytes model": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "no edge metadata": edited(lambda c: c.ClearField("metadata_props")),
        "metadata not json": edited(set_meta("{oops")),
        "metadata unknown version": edited(set_meta(json.dumps({**meta, "version": 42}))),
        "metadata missing initializer": edited(set_meta(json.dumps(missing))),
        "weights tampered": edited(tamper),
    }


def test_corpus_is_large_enough(tmp_path):
    info = make_mlp(tmp_path / "m.onnx")
    assert len(adapter_corpus(info)) + len(model_corpus(tmp_path)) >= 20


@pytest.fixture
def serving(tmp_path):
    path = tmp_path / "m.onnx"
    info = make_mlp(path)
    rt = Runtime(path)
    rt.load_adapter(random_adapter(info, 1, name="live"))
    rt.switch("live")
    rt.wait_settled(30)
    yield rt, info
    rt.close()


X = np.linspace(-1, 1, 20, dtype=np.float32).reshape(2, 10)


def test_every_damaged_adapter_is_refused_and_runtime_keeps_serving(serving, tmp_path):
    rt, info = serving
    before = rt.run(X)["logits"]
    for what, blob in adapter_corpus(info).items():
        p = tmp_path / "bad.safetensors"
        p.write_bytes(blob)
        with pytest.raises(EdgeError) as e:
            rt.load_adapter(p)
        assert str(e.value), what
        assert rt.adapters == ["live"] and rt.active == {"live": 1.0}, what
        np.testing.assert_array_equal(rt.run(X)["logits"], before, err_msg=what)


def test_every_damaged_model_is_refused(tmp_path):
    for what, blob in model_corpus(tmp_path).items():
        p = tmp_path / "bad.onnx"
        p.write_bytes(blob)
        with pytest.raises(FormatError):
            Runtime(p)
        assert what


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzzed_adapter_bytes_give_adapter_or_typed_error(data):
    blob = bytearray(_VALID)
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    try:
        a = adapter_from_bytes(bytes(blob))
    except EdgeError:
        return
    assert a.nnz > 0  # whatever survived the mutations is a fully validated adapter


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_give_typed_error(blob):
    with pytest.raises(EdgeError):
        adapter_from_bytes(blob)


def _valid_bytes() -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        info = make_mlp(Path(d) / "m.onnx")
        random_adapter(info, 2, name="fuzz").save(Path(d) / "a.safetensors")
        return (Path(d) / "a.safetensors").read_bytes()


_VALID = _valid_bytes()


@pytest.mark.parametrize("location", ["weights.bin", "../outside.bin"])
def test_model_with_external_data_is_refused_not_resolved_elsewhere(tmp_path, location):
    """A model whose initializers live in external files is refused: a relative location would otherwise be
    resolved against the working directory (or outside the model's folder)."""
    import onnx.external_data_helper

    src = tmp_path / "m.onnx"
    make_mlp(src)
    model = onnx.load(str(src))
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.external_data_helper.convert_model_to_external_data(model, location=location, size_threshold=0)
    (folder / "m.onnx").write_bytes(model.SerializeToString())  # the proto only: the location is what matters
    with pytest.raises(FormatError, match="external data"):
        Runtime(folder / "m.onnx")
