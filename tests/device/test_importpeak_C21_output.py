"""``edge import-onnx`` reads a model in pieces, holds its large weights once out of the protobuf message and writes
them streamed (``edge.convert.onnx_weights``, ``edge.convert.onnx_write``): the file written must be byte for byte
what the whole-message way gives (``make_adapter_ready`` on ``onnx.load`` then ``SerializeToString``), for inline
and external weights, Constants, sparse initializers, unknown fields, and a broken file must still be refused.

Measured (C21, VmHWM above a process that imported the same modules): MiniLM-L6 (86 MB) 271.5 -> 97.2 MB (3.15x ->
1.13x), a random BERT-base (415 MB) 1,256 -> 419 MB (3.03x -> 1.01x), with external data 1,260 -> 419 MB; outputs
byte-identical (sha256) before and after on those, the digits demo encoder and six sparse files.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.convert.onnx_import import import_onnx, make_adapter_ready  # noqa: E402
from edge.convert.onnx_source import PROTOBUF_LIMIT, tied_copies  # noqa: E402
from edge.convert.onnx_weights import read_model, weight_arrays  # noqa: E402
from edge.errors import FormatError  # noqa: E402

RNG = np.random.default_rng(21)
vi = helper.make_tensor_value_info


def _model(*, sparse: bool = False, constant: bool = False, tied: bool = False) -> onnx.ModelProto:
    """x [n, 64] -> MatMul 64x256 -> Relu -> MatMul 256x128 (+ bias) -> y; the two weights are large (held), the bias
    small (kept in the message). Options: a sparse initializer (512 KB dense), a Constant of 512 KB feeding an Add,
    and an output layer tied (transposed) to the first weight."""
    w1 = RNG.standard_normal((64, 256)).astype(np.float32)
    w2 = RNG.standard_normal((256, 128)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    inits.append(numpy_helper.from_array(RNG.standard_normal(128).astype(np.float32), "b"))
    outs = [vi("y", TensorProto.FLOAT, ["n", 128])]
    sparse_inits = []
    if sparse:
        idx = np.arange(0, 128 * 1024, 3, dtype=np.int64)
        vals = RNG.standard_normal(idx.size).astype(np.float32)
        dense = helper.make_sparse_tensor(
            numpy_helper.from_array(vals, "s"), numpy_helper.from_array(idx, ""), [1024, 128]
        )
        sparse_inits.append(dense)
        nodes.append(helper.make_node("MatMul", ["r2", "s"], ["ys"]))
        nodes.insert(0, helper.make_node("Concat", ["x"] * 16, ["r2"], axis=1))
        outs.append(vi("ys", TensorProto.FLOAT, ["n", 128]))
    if constant:
        c = numpy_helper.from_array(RNG.standard_normal((1024, 128)).astype(np.float32), "cv")
        nodes.append(helper.make_node("Constant", [], ["c"], value=c))
        outs.append(vi("c", TensorProto.FLOAT, [1024, 128]))
    if tied:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w1.T), "w_out"))
        nodes.append(helper.make_node("MatMul", ["h", "w_out"], ["back"]))
        outs.append(vi("back", TensorProto.FLOAT, ["n", 64]))
    graph = helper.make_graph(
        nodes, "g", [vi("x", TensorProto.FLOAT, ["n", 64])], outs, inits, sparse_initializer=sparse_inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="c21")
    model.ir_version = 8
    return model


def _folded() -> onnx.ModelProto:
    """A Conv reading an HWIO filter (3x3x64x64, 147 KB: held) through a Transpose: stored folded, checked by running
    both graphs in onnxruntime (the whole model restored into the message for it)."""
    hwio = RNG.standard_normal((3, 3, 64, 64)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[3, 2, 0, 1]),
        helper.make_node("Conv", ["x", "kt"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, [1, 64, 8, 8])],
        [vi("y", TensorProto.FLOAT, [1, 64, 8, 8])],
        [numpy_helper.from_array(hwio, "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _whole_way(src, name: str) -> tuple[bytes, str]:
    """The file and fingerprint as the import made them before C21: the whole message, serialized at once."""
    proto = onnx.load(str(src))
    report = make_adapter_ready(proto, name=name)
    return proto.SerializeToString(), report.info.fingerprint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("c21")
    out = {}
    for key, kw in {
        "plain": {},
        "sparse": {"sparse": True},
        "constant": {"constant": True},
        "tied": {"tied": True},
    }.items():
        onnx.save(_model(**kw), str(d / f"{key}.onnx"))
        out[key] = d / f"{key}.onnx"
    old = _model()
    old.opset_import[0].version, old.ir_version = 6, 3  # onnxruntime is asked, whole, whether it loads it
    del old.graph.node[-1], old.graph.initializer[-1]  # Add(6) has no kernel in onnxruntime; MatMul(1), Relu(6) do
    old.graph.node[-1].output[0] = "y"
    old.graph.input.extend(vi(t.name, t.data_type, list(t.dims)) for t in old.graph.initializer)
    onnx.save(old, str(d / "old.onnx"))
    out["old"] = d / "old.onnx"
    onnx.save(_folded(), str(d / "folded.onnx"))
    out["folded"] = d / "folded.onnx"
    (d / "ext").mkdir()
    onnx.save(_model(), str(d / "ext" / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    out["external"] = d / "ext" / "m.onnx"
    return out


@pytest.mark.parametrize("key", ["plain", "sparse", "constant", "tied", "external", "folded", "old"])
def test_the_file_written_is_byte_identical_to_the_whole_message_way(files, tmp_path, key):
    src = files[key]
    report = import_onnx(src, tmp_path / "o.onnx", name="m")
    data = (tmp_path / "o.onnx").read_bytes()
    want, fp = _whole_way(src, "m")
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(want).hexdigest()
    assert report.info.fingerprint == fp
    if key == "tied":
        assert report.info.extra["imported"]["tied"] == {"w_out": "w1"}
    assert report.folded == (("k",) if key == "folded" else ())


def test_large_weights_are_held_out_of_the_message_as_views(files):
    outside: dict = {}
    proto, size = read_model(files["plain"], 1 << 30, outside, PROTOBUF_LIMIT)
    assert size == files["plain"].stat().st_size
    assert sorted(outside) == ["w1", "w2"]  # 64 KB and 128 KB; the 512-byte bias stays in the message
    assert proto.ByteSize() < 2_000  # the message holds no weight of them
    inits = {t.name: t for t in proto.graph.initializer}
    assert not inits["w1"].HasField("raw_data") and inits["b"].HasField("raw_data")
    arrays = weight_arrays(inits, outside)
    assert not arrays["w1"].flags.owndata and arrays["w1"].shape == (64, 256) and arrays["w1"].dtype == np.float32
    want = numpy_helper.to_array(onnx.load(str(files["plain"])).graph.initializer[0])
    assert np.array_equal(arrays["w1"], want)


def test_an_unknown_graph_field_is_read_whole_and_kept(files, tmp_path):
    """A field number ONNX does not define, on the graph: the file is parsed whole, as before, and the field kept."""
    data = files["plain"].read_bytes()
    proto = onnx.load_model_from_string(data)
    graph = proto.graph.SerializeToString() + bytes([0xF8, 0x06, 0x2A])  # field 111, varint 42
    rest = onnx.ModelProto()
    rest.CopyFrom(proto)
    rest.ClearField("graph")
    src = tmp_path / "u.onnx"
    src.write_bytes(rest.SerializeToString() + b"\x3a" + _varint(len(graph)) + graph)
    import_onnx(src, tmp_path / "o.onnx", name="m")
    want, _ = _whole_way(src, "m")
    assert (tmp_path / "o.onnx").read_bytes() == want
    assert bytes([0xF8, 0x06, 0x2A]) in want


def test_tied_copies_finds_the_same_pairs_without_hashing_whole_copies():
    a = RNG.standard_normal((40, 30)).astype(np.float32)
    b = a.copy()
    b[5, 7] += 1  # same first row and column as a: same key, other values
    arrays = {"a": a, "b": b, "c": np.ascontiguousarray(b.T), "d": a.copy(), "e": np.zeros((0, 3), np.float32)}
    assert tied_copies(sorted(arrays), arrays) == {"c": "b", "d": "a"}


@pytest.mark.parametrize("cut", [7, 5_000, 60_000])
def test_a_truncated_file_is_refused_in_one_line(files, tmp_path, cut):
    data = files["plain"].read_bytes()
    src = tmp_path / "t.onnx"
    src.write_bytes(data[: len(data) - cut])
    with pytest.raises(FormatError, match="is not a readable ONNX file") as e:
        import_onnx(src, tmp_path / "o.onnx")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o.onnx").exists()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def test_a_model_over_the_limit_is_refused_before_a_byte_is_written(files):
    import io

    from edge.convert.onnx_write import message_size, write_model
    from edge.errors import ConfigError

    outside: dict = {}
    proto, _ = read_model(files["plain"], 1 << 30, outside, PROTOBUF_LIMIT)
    n = message_size(proto, outside)
    assert n == files["plain"].stat().st_size  # onnx.save wrote SerializeToString's bytes: the same length
    f = io.BytesIO()
    with pytest.raises(ConfigError, match=f"would be {n:,} bytes, over protobuf's limit of {n - 1:,}"):
        write_model(f, proto, outside, n - 1)
    assert f.getvalue() == b""
    write_model(f, proto, outside, n)
    assert f.getvalue() == files["plain"].read_bytes()
