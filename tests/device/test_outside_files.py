"""Outside audit of the file parsers: hostile ``.tflite`` models, ComPEFT payloads, ``.npz`` samples.

Each case is a file an outside check handed the product and what it did before: a flatbuffer whose
offsets point many entries at one table (20 s and 8 GB for a 1.5 MB file), an operator that lacks
its required input (LiteRT crashed the process), a quantization scale of 0 (LiteRT aborted), a
slot whose shape asks for exabytes (MemoryError), a zip whose version numpy's zipfile cannot read
(NotImplementedError). Every one must now be a typed :class:`~edge.errors.EdgeError`, through the
API and through the CLI (exit 2, one line), and a small seeded fuzz keeps it so.
"""

from __future__ import annotations

import io
import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from _tiny import random_adapter

from edge.cli import main
from edge.errors import ConfigError, EdgeError, FormatError
from edge.format import compress
from edge.format.samples import load_samples, read_npz
from edge.format.tflite import fingerprint_arrays, read_tflite, tflite_info
from edge.runtime import Runtime

s = pytest.importorskip("ai_edge_litert.schema_py_generated")
from edge.format.tflite import pack_model, set_metadata, unpack_model  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
TINY = (GOLDEN / "tiny-mlp-v1.tflite").read_bytes()  # x[1,10] -> FC(fc1) -> FC(fc2) -> logits[1,2]
BRANCH = (GOLDEN / "branch-mlp-v1.tflite").read_bytes()  # two slots, branch.down.weight and branch.up.weight


def _parse(data: bytes) -> None:
    """Everything the device reads of a .tflite file before LiteRT sees it."""
    fb = read_tflite(data)
    fingerprint_arrays(data, fb)
    tflite_info(data, fb)


def _edit(data: bytes, fn) -> bytes:
    m = unpack_model(data)
    fn(m)
    return pack_model(m)


def _tensor(m, name: str):
    return next(t for t in m.subgraphs[0].tensors if t.name.decode() == name)


# -- hand-written flatbuffers: many vector entries, one table ------------------------------------------------------
def _model(n: int, shape_len: int = 0, share: bool = False) -> bytes:
    """A ``.tflite`` flatbuffer of one subgraph with ``n`` tensors (no names). ``share``: every entry of the tensor
    vector points at one tensor table whose shape has ``shape_len`` dimensions; else ``n`` empty tables."""
    b = bytearray(b"\0\0\0\0TFL3")
    root_vt = len(b)
    b += struct.pack("<7H", 14, 12, 0, 0, 4, 0, 8) + b"\0\0"  # Model: subgraphs at +4, buffers at +8
    sg_vt = len(b)
    b += struct.pack("<3H", 6, 8, 4) + b"\0\0"  # SubGraph: tensors at +4
    empty_vt = len(b)
    b += struct.pack("<2H", 4, 4)  # a table without fields
    shape_vt = len(b)
    b += struct.pack("<3H", 6, 8, 4) + b"\0\0"  # Tensor: shape at +4
    root = len(b)
    b += struct.pack("<iII", root - root_vt, 0, 0)
    subgraphs = len(b)
    b += struct.pack("<II", 1, 0)
    sg = len(b)
    b += struct.pack("<iI", sg - sg_vt, 0)
    buffers = len(b)
    b += struct.pack("<II", 1, 0)
    tensors = len(b)
    b += struct.pack("<I", n) + b"\0" * (4 * n)
    tables = len(b)
    if share:
        b += struct.pack("<iI", tables - shape_vt, 0)
        shape = len(b)
        b += struct.pack("<I", shape_len) + struct.pack(f"<{shape_len}i", *[1] * shape_len)
        struct.pack_into("<I", b, tables + 4, shape - (tables + 4))
        targets = [tables] * n
    else:
        b += b"".join(struct.pack("<i", tables + 4 * i - empty_vt) for i in range(n))
        targets = [tables + 4 * i for i in range(n)]
    struct.pack_into("<I", b, 0, root)
    for at, to in ((root + 4, subgraphs), (root + 8, buffers), (subgraphs + 4, sg), (sg + 4, tensors)):
        struct.pack_into("<I", b, at, to - at)
    struct.pack_into("<I", b, buffers + 4, tables - (buffers + 4))  # buffer 0: an empty table
    for i, to in enumerate(targets):
        struct.pack_into("<I", b, tensors + 4 + 4 * i, to - (tensors + 4 + 4 * i))
    return bytes(b)


def test_offsets_that_share_one_table_cannot_amplify_a_small_file():
    hostile = _model(3000, shape_len=3000, share=True)  # 24 KB asking for 9 M shape entries
    assert len(hostile) < 30_000
    with pytest.raises(FormatError, match="decode more than its own"):
        read_tflite(hostile)
    fine = read_tflite(_model(3000))  # as many tensors, each its own table: linear, accepted
    assert len(fine.tensors) == 3000


def test_metadata_entries_naming_one_big_buffer_are_refused():
    def many(m):
        set_metadata(m, "blob", bytes(200_000))
        for i in range(50):  # each entry would copy the 200 KB buffer: 10 MB from a 200 KB file
            e = s.MetadataT()
            e.name, e.buffer = f"k{i}".encode(), len(m.buffers) - 1
            m.metadata.append(e)

    with pytest.raises(FormatError, match="decode more than its own"):
        read_tflite(_edit(TINY, many))


def _op(m, k):
    return m.subgraphs[0].operators[k]


def _set(obj, **fields):
    for k, v in fields.items():
        setattr(obj, k, v)


def _quant(scale, zero):
    q = s.QuantizationParametersT()
    q.scale, q.zeroPoint = scale, zero
    return q


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: _set(_tensor(m, "fc2.weight"), shape=[-1, -40]), "must not be negative"),
        (lambda m: _set(m.subgraphs[0], inputs=[7]), "inputs and outputs name tensors"),
        (lambda m: _set(_op(m, 0), inputs=[0, 99, 2]), "operator 0 name tensors"),
        (lambda m: _set(_op(m, 0), inputs=[0, -1, 2]), "lacks a required input"),  # TRANSPOSE, RESHAPE: SIGSEGV
        (lambda m: _set(_op(m, 1), inputs=[6, 3, 1]), "computed by none before it"),
        (lambda m: _set(m.subgraphs[0], operators=[]), "computed by no operator"),  # was ValueError at run
        (lambda m: _set(_tensor(m, "fc2.weight"), quantization=_quant([0.0], [0])), "positive normal float"),
        (lambda m: _set(_tensor(m, "fc2.weight"), quantization=_quant([float("nan")], [0])), "positive normal"),
        (lambda m: _set(_tensor(m, "fc2.weight"), quantization=_quant([], [3])), "0 quantization scales and 1"),
        (lambda m: _set(_tensor(m, "fc2.weight"), quantization=_quant([0.1, 0.2, 0.3], [0, 0, 0])), "quantized dim"),
        (lambda m: _set(_tensor(m, "fc2.weight"), type=9, quantization=_quant([0.1], [2**31 - 16])), "zero points"),
        (lambda m: _set(_tensor(m, "fc2.weight"), name=b"\xff\xfe"), "utf-8"),
        (lambda m: _set(_tensor(m, "logits"), name=b"renamed"), "names outputs"),  # was KeyError at load
        (lambda m: m.metadata.append(m.metadata[-1]), "appears twice"),
    ],
    ids=[
        "negative dims", "subgraph input out of range", "op input out of range", "op lacks required input",
        "op reads an uncomputed tensor", "output computed by no op", "scale 0", "scale NaN",
        "zero point without scale", "per-channel scales off axis", "int8 zero point 2**31",
        "name not UTF-8", "output renamed", "duplicate metadata",
    ],
)  # fmt: skip
def test_structurally_broken_tflite_is_a_format_error(edit, match, tmp_path, capsys):
    data = _edit(TINY, edit)
    with pytest.raises(FormatError, match=match):
        _parse(data)
    path = tmp_path / "m.tflite"
    path.write_bytes(data)
    quick = ["--device", "x86-dev", "--runs", "1", "--warmup", "0", "--switches", "1", "-q"]
    assert main(["profile", str(path), *quick]) == 2  # loads the model on LiteRT: every check on the way
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edge: error: ") and "Traceback" not in lines[0]


@pytest.mark.parametrize(
    "raw_edit, match",
    [
        (lambda b, root: struct.pack_into("<i", b, root, root + 100), "no valid vtable"),  # vtable before the file
        (lambda b, root: struct.pack_into("<i", b, root, -(len(b) + 8)), "no valid vtable"),  # after its end
        (lambda b, root: struct.pack_into("<I", b, 0, 0), "no valid vtable"),  # root table is the root offset
    ],
)
def test_vtables_outside_the_file_are_refused(raw_edit, match):
    b = bytearray(TINY)
    raw_edit(b, struct.unpack_from("<I", TINY, 0)[0])
    with pytest.raises(FormatError, match=match):
        read_tflite(bytes(b))


def test_slot_shapes_are_checked_before_the_arena_is_allocated(tmp_path):
    def huge_slot(m):  # the file's slot shape disagrees with its metadata: was ValueError (reshape) or MemoryError
        _tensor(m, "branch.up.weight").shape = [16, 5, 0, 7]

    path = tmp_path / "slot.tflite"
    path.write_bytes(_edit(BRANCH, huge_slot))
    with pytest.raises(FormatError, match="entries its metadata declares"):
        Runtime(path, backend="tflite")

    def declared_huge(m):  # file and metadata agree on a 1 GB slot for a 4 KB model
        _tensor(m, "branch.up.weight").shape = [16, 1 << 24]
        meta = json.loads(read_tflite(BRANCH).metadata["edge"])
        meta["tensors"]["branch.up.weight"]["shape"] = [16, 1 << 24]
        set_metadata(m, "edge", json.dumps(meta).encode())

    path.write_bytes(_edit(BRANCH, declared_huge))
    with pytest.raises(FormatError, match="slots would take"):
        Runtime(path, backend="tflite")


def test_an_activation_shape_asking_for_gigabytes_is_refused_before_litert_allocates(tmp_path):
    from edge.format.tflite_checks import check_tensor_sizes

    hidden = "__main__.Mlp/torch.nn.modules.linear.Linear_fc1;;__main__.Mlp;"  # the [1, 20] activation
    path = tmp_path / "wide.tflite"
    path.write_bytes(_edit(TINY, lambda m: _set(_tensor(m, hidden), shape=[1, 1 << 30])))  # LiteRT took 4 GB
    with pytest.raises(FormatError, match="would take 4294967296 bytes"):
        Runtime(path, backend="tflite")
    wide = read_tflite(_edit(TINY, lambda m: _set(_tensor(m, hidden), shape=[1, 1 << 19])))  # 2 MB
    check_tensor_sizes(wide.tensors)
    with pytest.raises(FormatError, match="device memory budget"):
        check_tensor_sizes(wide.tensors, memory_mb=1)


def test_a_litert_failure_at_run_is_typed(monkeypatch):
    from runtimes import litert_session

    with Runtime(GOLDEN / "tiny-mlp-v1.tflite", backend="tflite", strategy="rebuild") as rt:
        x = np.zeros((1, 10), np.float32)
        before = rt.run(x)

        def fails(*args, **kwargs):
            raise RuntimeError("Node number 3 (TRANSPOSE) failed to invoke.")

        monkeypatch.setattr(litert_session.Session, "run", fails)
        with pytest.raises(FormatError, match="LiteRT could not run 'tiny-mlp'.*TRANSPOSE"):
            rt.run(x)
        monkeypatch.undo()
        assert np.array_equal(rt.run(x)["logits"], before["logits"])


# -- ComPEFT transport ---------------------------------------------------------------------------------------------
def _compeft(edit) -> bytes:
    rng = np.random.default_rng(0)
    t = compress.compeft({"a": rng.standard_normal((8, 16)).astype(np.float32)}, 0.25)
    data = compress.to_bytes(t, {"k": 1})
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["edge"])
    edit(meta)
    header["__metadata__"]["edge"] = json.dumps(meta)
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data[8 + n :]


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(shapes=[[8, 16]]),  # was AttributeError
        lambda m: m.update(meta=[1, 2]),  # was TypeError
        lambda m: m.update(meta="ab"),  # was ValueError
        lambda m: m["shapes"].update(a=[True, 128]),  # was accepted as (1, 128)
        lambda m: m["shapes"].update(a=[8.5, 16]),  # was accepted as (8, 16)
        lambda m: m["shapes"].update(a=[2**57 + 1, 128]),  # wraps to 128 entries in int64: was ValueError later
        lambda m: m.update(alpha="nan"),
        lambda m: m.update(raw="a"),
    ],
    ids=["shapes a list", "meta a list", "meta a string", "shape true", "shape 8.5", "shape wraps", "alpha NaN", "raw"],
)
def test_compeft_payload_with_bad_header_is_a_format_error(edit):
    data = _compeft(edit)
    with pytest.raises(FormatError):
        compress.decompress(compress.from_bytes(data)[0])


# -- labelled samples ------------------------------------------------------------------------------------------------
def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_zip_of_a_version_zipfile_cannot_read_is_a_format_error(tmp_path):
    data = bytearray(_npz(x=np.zeros((4, 8), np.float32), y=np.zeros(4, np.int64)))
    central = data.find(b"PK\x01\x02")
    data[central + 6] = 0xFF  # "version needed to extract" 25.5: zipfile raised NotImplementedError
    path = tmp_path / "v.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="not an .npz"):
        read_npz(path)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from test_update import make_encoder

    path = tmp_path_factory.mktemp("outside") / "encoder.onnx"
    make_encoder(path)
    return path


def test_scalar_samples_exit_2_with_one_line(encoder, tmp_path, capsys):
    path = tmp_path / "scalar.npz"
    path.write_bytes(_npz(x=np.float32(1.0), y=np.int64(1)))  # was TypeError: len() of unsized object
    assert main(["update", "--model", str(encoder), "--data", str(path), "--method", "ncm"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "scalars" in lines[0]
    from edge.format.samples import batch_length

    with pytest.raises(ConfigError, match="scalars"):
        batch_length({"a": np.zeros(3), "b": np.float32(1)})


# -- a seeded mini-fuzz: every outcome is a result or a typed error -------------------------------------------------
def _mutants(data: bytes, seed: int, n: int):
    rng = random.Random(seed)
    for k in range(1, 64, 4):
        yield data[: len(data) * k // 64]
    for _ in range(n):
        b = bytearray(data)
        at = rng.randrange(0, len(b) - 4) & ~3
        kind = rng.randrange(3)
        if kind == 0:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b[at : at + 4] = struct.pack("<I", rng.choice([0, 4, 0x7FFFFFFF, 0xFFFFFFFF, 0x80000000, len(b) - at]))
        else:
            b[at : at + 4] = struct.pack("<I", rng.choice([0, 1, 2]))  # offsets onto themselves
        yield bytes(b)


def _outcome(fn, data) -> str:
    try:
        fn(data)
    except EdgeError as e:
        return type(e).__name__
    return "ok"


def test_fuzzed_tflite_files_give_a_model_or_a_format_error():
    seen = {_outcome(_parse, d) for d in [*_mutants(TINY, 1, 250), *_mutants(BRANCH, 2, 250)]}
    assert seen <= {"ok", "FormatError"} and "FormatError" in seen


def test_fuzzed_compeft_and_npz_give_a_result_or_a_typed_error(tmp_path):
    payload = _compeft(lambda m: None)
    seen = {_outcome(lambda d: compress.decompress(compress.from_bytes(d)[0]), d) for d in _mutants(payload, 3, 200)}
    assert seen <= {"ok", "FormatError"} and "FormatError" in seen
    path = tmp_path / "d.npz"

    def samples(d):
        path.write_bytes(d)
        load_samples(path)

    good = _npz(x=np.zeros((4, 8), np.float32), y=np.zeros(4, np.int64))
    seen = {_outcome(samples, d) for d in _mutants(good, 4, 200)}
    assert seen <= {"ok", "FormatError", "ConfigError"} and "FormatError" in seen


def test_tflite_runtime_keeps_its_state_through_hostile_adapters(tmp_path):
    with Runtime(GOLDEN / "tiny-mlp-v1.tflite", backend="tflite") as rt:
        live = tmp_path / "live.safetensors"
        random_adapter(rt.info, 1, name="live").save(live)
        rt.switch(rt.load_adapter(live))
        weights = {p: rt.weights(p).copy() for p in rt.info.tensors}
        x = np.linspace(-1, 1, 10, dtype=np.float32).reshape(1, 10)
        rt.wait_settled()  # hybrid: XNNPACK's and the built-in kernels' sums differ in the last bit
        out = rt.run(x)
        refused = 0
        for i, blob in enumerate(_mutants(live.read_bytes(), 5, 150)):
            path = tmp_path / f"h{i}.safetensors"
            path.write_bytes(blob)
            try:
                rt.unload_adapter(rt.load_adapter(path, name=f"h{i}"))  # a harmless mutation loads: fine
            except EdgeError:
                refused += 1
            assert rt.adapters == ["live"] and rt.active == {"live": 1.0}
        assert refused > 100
        assert all(np.array_equal(rt.weights(p), w) for p, w in weights.items())
        rt.wait_settled()
        assert np.array_equal(rt.run(x)["logits"], out["logits"])


def test_golden_and_valid_files_still_parse():
    for data in (TINY, BRANCH):
        _parse(data)
    t = compress.compeft({"a": np.ones((2, 3), np.float32), "s": np.ones((), np.float32)}, 0.5)
    back = compress.decompress(compress.from_bytes(compress.to_bytes(t))[0])
    assert back["a"].shape == (2, 3) and back["s"].shape == ()
