"""A sweep of every file argument for what the hostile corpus (test_hostile_corpus.py) did not reach.

Found by feeding each CLI command and public loader empty, truncated, FIFO, device, folder, newline-named and
lying files:

- ``edge.text.Tokenizer.from_file`` handed the path to ``tokenizers``, which blocked for ever on a FIFO and read
  ``/dev/zero`` until memory ran out; it now reads bounded (64 MiB), and lengths from a model's metadata
  (``seq_len``, ``max_seq_length``: a string, a bool, 10**100) are a ConfigError, not a bare ValueError/OverflowError.
- the sync state files (``state.json``, ``plan.json`` in the cache) were read unbounded (a FIFO blocked ``edge
  sync``) and with ``json.loads`` (a deeply nested file raised a bare RecursionError, duplicated keys and NaN were
  taken); now bounded, regular files only (else a FleetError), JSON this project never writes is set aside as torn.
- ``edge inspect`` described (exit 0) an .onnx whose initializer dims or data type lie and a .tflite whose tensor
  shape asks for terabytes or is negative, all of which a load refuses: ``read_model_info`` now checks the same
  records (nothing is allocated from them).
- an adapter's metadata (and an update state's, with its checksum recomputed) with an unknown key loaded
  silently; it is a FormatError naming the key and the known ones.
- what a registry sends (an OCI manifest, the gzip'd TUF bundle, a delta's header line) and the cached head were
  parsed with ``json.loads``: nested 200k deep they raised a bare RecursionError out of ``edge sync`` (a traceback);
  now bounded JSON, a FleetSecurityError (the cached head: read again).
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from _tiny import make_mlp, random_adapter
from safetensors.numpy import save

from edge.cli import main
from edge.errors import ConfigError, EdgeError, FormatError

GOLDEN_TFLITE = Path(__file__).resolve().parents[1] / "golden" / "tiny-mlp-v1.tflite"


def _no_hang(fn, fifo: Path | None = None, seconds: float = 20.0):
    """Run ``fn``; return what it raised (or None). If it is still running after ``seconds`` (blocked on a FIFO),
    open the FIFO's other end to release it, and fail."""
    out: dict = {}

    def call():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["e"] = e

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail(f"blocked on {fifo}")
    return out.get("e")


def _cli(argv, capsys) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and re.match(r"edge( [a-z-]+)?: error: ", lines[0]) and "Traceback" not in err, err
    return lines[0]


def _special(folder: Path, kind: str, name: str) -> Path:
    p = folder / name
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "folder":
        p.mkdir()
    elif kind.startswith("/dev/"):
        p.symlink_to(kind)
    return p


SPECIALS = ["fifo", "folder", "/dev/zero", "/dev/urandom"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    info = make_mlp(root / "m.onnx")
    random_adapter(info, 7, name="x").save(root / "a.safetensors")
    return {
        "root": root,
        "info": info,
        ".onnx": (root / "m.onnx").read_bytes(),
        ".tflite": GOLDEN_TFLITE.read_bytes(),
        ".safetensors": (root / "a.safetensors").read_bytes(),
    }


# -- every format cut at several points, and special files, through the API and every command taking it ------------
CUTS = [0, 1, 8, 64, 1 / 3, 1 / 2, -16, -1]


def _cut(data: bytes, at) -> bytes:
    return data[: int(len(data) * at)] if isinstance(at, float) else data[:at]


def _api(suffix: str, path: Path):
    if suffix == ".safetensors":
        from edge.format.adapter import load_adapter

        load_adapter(path)
    else:
        from edge.runtime import Runtime

        Runtime(path).close()


def _commands(suffix: str, path: Path, out: Path, model: Path) -> list[list]:
    if suffix == ".safetensors":
        quick = ["--runs", "1", "--warmup", "0", "--switches", "1", "-q"]
        return [
            ["inspect", path],
            ["profile", model, "--device", "x86-dev", "--adapters", path, *quick],
            ["import-onnx", model, "--out", out.with_suffix(".onnx"), "--state-dict", path],
        ]
    return [["inspect", path], [f"import-{suffix[1:]}", path, "--out", out]]


@pytest.mark.parametrize("suffix", [".onnx", ".tflite", ".safetensors"])
@pytest.mark.parametrize("name", ["f", "new\nline"], ids=["plain", "newline"])
def test_every_cut_and_special_file_is_refused_typed_and_writes_nothing(files, tmp_path, suffix, name, capsys):
    model = files["root"] / "m.onnx"
    made = [(f"cut {c}", _cut(files[suffix], c)) for c in CUTS] + [(k, k) for k in SPECIALS]
    for i, (what, spec) in enumerate(made):
        d = tmp_path / f"c{i}"
        d.mkdir()
        path = _special(d, spec, name + suffix) if isinstance(spec, str) else d / (name + suffix)
        if isinstance(spec, bytes):
            path.write_bytes(spec)
        err = _no_hang(lambda path=path: _api(suffix, path), path if spec == "fifo" else None)
        assert isinstance(err, EdgeError), (what, err)
        out = d / ("out" + suffix)
        for argv in _commands(suffix, path, out, model):
            line = _no_hang(lambda argv=argv: _cli(argv, capsys), path if spec == "fifo" else None)
            assert line is None, (what, argv[0], line)  # _cli asserted: exit 2, one line, no traceback
        assert sorted(p.name for p in d.iterdir()) == [path.name], what  # nothing written beside it


# -- a tokenizer.json is read bounded; lengths from a model's metadata are checked -----------------------------------
def _tokenizer_json() -> str:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = tokenizers.Tokenizer(WordLevel({"[PAD]": 0, "[UNK]": 1, "edge": 2, "device": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return tok.to_str()


@pytest.mark.parametrize("kind", SPECIALS + ["not UTF-8", "not JSON", "over the limit"])
def test_tokenizer_file_is_read_bounded(tmp_path, kind, monkeypatch):
    from edge import text

    _tokenizer_json()
    path = tmp_path / "tokenizer.json"
    if kind == "not UTF-8":
        path.write_bytes(b'{"version": "\xff\xfe"}')
    elif kind == "not JSON":
        path.write_text("[" * 100_000)
    elif kind == "over the limit":
        monkeypatch.setattr(text, "MAX_TOKENIZER_BYTES", 1000)
        path.write_text(_tokenizer_json() + " " * 1000)
    else:
        _special(tmp_path, kind, path.name)
    err = _no_hang(lambda: text.Tokenizer.from_file(path), path if kind == "fifo" else None)
    assert isinstance(err, FormatError), err
    assert str(path) in str(err)
    if kind == "over the limit":
        assert "over the limit of 1000 bytes" in str(err)


def test_a_valid_tokenizer_still_encodes(tmp_path):
    from edge.text import Tokenizer

    path = tmp_path / "tokenizer.json"
    path.write_text(_tokenizer_json())
    tok = Tokenizer.from_file(path, seq_len=4, inputs=("input_ids", "attention_mask"))
    got = tok.encode(["edge device", "edge"])
    assert sorted(got) == ["attention_mask", "input_ids"]
    assert got["input_ids"].tolist() == [[2, 3, 0, 0], [2, 0, 0, 0]]
    assert got["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize(
    "kwargs", [{"seq_len": "128"}, {"seq_len": True}, {"seq_len": 1}, {"max_length": 10**100}, {"max_length": 5.5}]
)
def test_tokenizer_lengths_are_typed(tmp_path, kwargs):
    from edge.text import Tokenizer

    path = tmp_path / "tokenizer.json"
    path.write_text(_tokenizer_json())
    with pytest.raises(ConfigError, match="from 2"):
        Tokenizer.from_file(path, **({"seq_len": None} | kwargs))


# -- the sync state files in the cache ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SPECIALS)
def test_sync_state_that_is_not_a_regular_file_is_a_fleet_error(tmp_path, kind):
    from edge.fleet.device_files import read_json
    from edge.fleet.oci import FleetError

    path = _special(tmp_path, kind, "state.json")
    err = _no_hang(lambda: read_json(path), path if kind == "fifo" else None)
    assert isinstance(err, FleetError) and "delete it" in str(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # nothing moved


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"adapters": {}, "adapters": 5}',
        '{"adapters": NaN}',
        '{"a": ' + "9" * 5000 + "}",
    ],
    ids=["nested 100k", "duplicated key", "NaN", "5000 digits"],
)
def test_sync_state_json_no_sync_writes_is_set_aside(tmp_path, text):
    from edge.fleet.device_files import read_json

    path = tmp_path / "state.json"
    path.write_text(text)
    assert read_json(path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json.unreadable"]
    good = {"adapters": {"a": {"version": 3}}}
    path.write_text(json.dumps(good))
    assert read_json(path) == good
    assert read_json(tmp_path / "missing.json") is None


# -- inspect refuses what a load refuses -----------------------------------------------------------------------------
def _lying_onnx(files, tmp_path, how: str) -> Path:
    m = onnx.load_model_from_string(files[".onnx"])
    init = next(i for i in m.graph.initializer if i.name == "fc1.weight")
    if how == "2^40 elements":
        init.dims[:] = [1 << 20, 1 << 20]
    elif how == "one row more":
        init.dims[0] += 1
    elif how == "data type":
        init.data_type = onnx.TensorProto.STRING
    p = tmp_path / "lying.onnx"
    p.write_bytes(m.SerializeToString())
    return p


def _lying_tflite(tmp_path, how: str) -> Path:
    from ai_edge_litert import schema_py_generated as s
    from flatbuffers import Builder

    data = GOLDEN_TFLITE.read_bytes()
    mo = s.ModelT.InitFromObj(s.Model.GetRootAsModel(data, 0))
    tensors = mo.subgraphs[0].tensors
    t = next(t for t in tensors if t.buffer and mo.buffers[t.buffer].data is not None) if how == "huge" else tensors[0]
    t.shape = np.array([1 << 20, 1 << 20] if how == "huge" else [-5, 3], np.int32)
    b = Builder(1024)
    b.Finish(mo.Pack(b), file_identifier=b"TFL3")
    p = tmp_path / "lying.tflite"
    p.write_bytes(bytes(b.Output()))
    return p


@pytest.mark.parametrize("how", ["2^40 elements", "one row more", "data type", "tflite huge", "tflite negative"])
def test_inspect_refuses_a_model_whose_records_lie(files, tmp_path, how, capsys):
    from edge.runtime import Runtime
    from runtimes import read_model_info

    p = _lying_tflite(tmp_path, how.split()[1]) if how.startswith("tflite") else _lying_onnx(files, tmp_path, how)
    for fn in (read_model_info, Runtime):
        with pytest.raises(FormatError):
            fn(p)
    _cli(["inspect", p], capsys)


def test_models_whose_records_are_true_still_inspect(files, capsys):
    for p in (files["root"] / "m.onnx", GOLDEN_TFLITE):
        assert main(["inspect", str(p)]) == 0
        assert json.loads(capsys.readouterr().out)["fingerprint"].startswith("sha256:")


# -- adapters: an unknown metadata key; a state dict declaring 2^40 elements -----------------------------------------
def test_adapter_metadata_with_an_unknown_key_is_refused(files, tmp_path, capsys):
    from edge.format.adapter import inspect_adapter, load_adapter

    info, t = files["info"], "fc2.weight"
    meta = {
        "format": "edge.adapter", "version": 1, "method": "shira", "name": "x", "base_fingerprint": info.fingerprint,
        "dtype": "float32", "targets": {t: [2, 20]}, "info": {}, "telemetry": "https://example.invalid",
    }  # fmt: skip
    arrays = {f"{t}.indices": np.zeros((2, 1), np.int32), f"{t}.values": np.ones(1, np.float32)}
    p = tmp_path / "a.safetensors"
    p.write_bytes(save(arrays, metadata={"edge": json.dumps(meta)}))
    for fn in (load_adapter, inspect_adapter):
        with pytest.raises(FormatError, match=r"unknown key\(s\) \['telemetry'\].*base_fingerprint"):
            fn(p)
    assert "telemetry" in _cli(["inspect", p], capsys)
    meta.pop("telemetry")
    p.write_bytes(save(arrays, metadata={"edge": json.dumps(meta)}))
    assert load_adapter(p).nnz == 1


def test_state_dict_declaring_2_40_elements_allocates_nothing(files, tmp_path, capsys):
    from edge.convert.onnx_import import read_state_dict

    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}}).encode()
    p = tmp_path / "sd.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(FormatError, match="corrupt safetensors"):
        read_state_dict(p)
    out = tmp_path / "o.onnx"
    _cli(["import-onnx", files["root"] / "m.onnx", "--out", out, "--state-dict", p], capsys)
    assert not out.exists()


# -- what a registry sends (untrusted until TUF verifies it) and the head cached from it ------------------------------
def _deflate(raw: bytes, base: bytes) -> bytes:
    import zlib

    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=base)
    return c.compress(raw) + c.flush()


@pytest.mark.parametrize("text", [b"[" * 200_000, b'{"format": 1, "format": 2}'], ids=["nested 200k", "dup key"])
def test_registry_json_nested_deep_or_with_duplicated_keys_is_a_security_error(text):
    import gzip

    from edge.fleet.oci import FleetSecurityError, parse_manifest
    from edge.fleet.tuf_oci import decode_bundle, decode_delta

    calls = {
        "bundle": lambda: decode_bundle(gzip.compress(text)),
        "delta": lambda: decode_delta(_deflate(text + b"\n", b"base"), b"base"),
        "manifest": lambda: parse_manifest(text, "manifest of x"),
    }
    for call in calls.values():
        with pytest.raises(FleetSecurityError, match="nests 200000 levels|duplicated key"):  # was a bare RecursionError
            call()


def test_cached_head_nested_deep_is_read_again_not_a_crash(tmp_path):
    from edge.fleet.tuf_oci import OciMetadataFetcher

    (tmp_path / "head.json").write_text("[" * 200_000)
    assert OciMetadataFetcher(client=None, head_dir=tmp_path)._cached_head() is None


def test_update_state_with_an_unknown_key_and_a_recomputed_checksum_is_refused(tmp_path):
    from edge.format import state as st

    tensors = {"counts": np.ones(3, np.float32)}
    good = st.save_state(tmp_path / "s.safetensors", st.State("ncm", "sha256:" + "0" * 32, tensors, {"k": 1}))
    assert st.load_state(good).meta == {"k": 1}
    head = {"format": st.STATE_FORMAT, "version": 1, "method": "ncm", "base_fingerprint": "sha256:" + "0" * 32}
    head |= {"meta": {"k": 1}, "telemetry": "on"}
    head["checksum"] = st._checksum(head, tensors)  # a checksum is no signature: anyone can recompute it
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(save(tensors, metadata={"edge": json.dumps(head)}))
    with pytest.raises(FormatError, match=r"unknown key\(s\) \['telemetry'\]"):
        st.load_state(bad)
