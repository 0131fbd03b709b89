"""The hostile corpus: files and inputs written to break each entry point, and what each must give.

Every case states its entry point, the typed error it must raise (an ``EdgeError`` subclass)
and words of the message. Three tests drive the table: the Python API raises exactly that
error; the CLI (``edge.cli.main`` in process) exits 2 with one line on stderr and no traceback;
and a serving runtime that refuses an adapter (or its signature) serves exactly its previous
state afterwards. Classes covered: bounded reads (FIFOs, devices, folders, sparse giant files),
JSON and YAML limits (depth, duplicate keys, NaN/Infinity, billion laughs), strict types
(``version: true``, ``bits: 1.9``), amplification before validation (low-bit codes, ``B @ A``,
zip bombs), signatures (small-order keys, forgeries), update data and state files, PEFT folders.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from _tiny import make_mlp, random_adapter
from safetensors.numpy import save
from test_update import blobs, make_encoder

from edge.cli import main
from edge.errors import AdapterMismatchError, ConfigError, EdgeError, FormatError, SignatureError
from edge.format.adapter import load_adapter
from edge.format.signing import SignaturePolicy, generate_key, key_id, sign_file, signature_path
from edge.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
T = "fc2.weight"  # the tiny MLP's [2, 20] weight
IDENTITY_KEY = "01" + "00" * 31


@dataclass(frozen=True)
class Case:
    name: str
    entry: str  # adapter | adapter-file | model | sig | profile | devices | data | state | peft
    expect: type[EdgeError]
    match: str  # words of the message
    make: Callable  # (world, folder) -> the path handed to the entry point


@dataclass
class World:
    root: Path
    model: Path
    info: object
    meta: dict
    arrays: dict
    encoder: Path
    pub: Path
    pem: Path
    good_npz: Path
    good_state: Path
    signed_device: Path


# -- builders -------------------------------------------------------------------------------------------------------
def _adapter_bytes(w: World, meta: dict | None = None, arrays: dict | None = None, raw: str | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(meta if meta is not None else w.meta)
    return save(arrays if arrays is not None else w.arrays, metadata={"edge": text})


def _raw_header(header: str, payload: bytes = b"") -> bytes:
    h = header.encode()
    return struct.pack("<Q", len(h)) + h + payload


def _write(folder: Path, name: str, data: bytes) -> Path:
    p = folder / name
    p.write_bytes(data)
    return p


def adapter(fn) -> Callable:
    """A case whose adapter file is ``fn(world) -> bytes``."""
    return lambda w, d: _write(d, "bad.safetensors", fn(w))


def meta_edit(**changes) -> Callable:
    return adapter(lambda w: _adapter_bytes(w, {**w.meta, **changes}))


def meta_text(fn) -> Callable:
    """The edge metadata given as raw JSON text ``fn(world)``."""
    return adapter(lambda w: _adapter_bytes(w, raw=fn(w)))


def fifo(name: str) -> Callable:
    def make(w, d):
        p = d / name
        os.mkfifo(p)
        return p

    return make


def link(name: str, to: str) -> Callable:
    def make(w, d):
        p = d / name
        p.symlink_to(to)
        return p

    return make


def folder(name: str) -> Callable:
    def make(w, d):
        p = d / name
        p.mkdir()
        return p

    return make


def sparse_giant(name: str, size: int = 3 << 30) -> Callable:
    def make(w, d):
        p = d / name
        with open(p, "wb") as f:
            f.truncate(size)  # a hole: no disk used, but stat says 3 GiB
        return p

    return make


def _deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


def _dense_meta(w: World, bits, scheme="gq", shape=(2, 20)) -> tuple[dict, dict]:
    meta = {
        **w.meta,
        "method": "adapter",
        "targets": {T: list(shape)},
        "encodings": {T: {"scheme": scheme, "bits": bits}},
    }
    count = int(np.prod(shape))
    arrays = {f"{T}.codes": np.zeros(-(-count // 8), np.uint8), f"{T}.stats": np.array([0.0, 1.0], np.float32)}
    return meta, arrays


def model_meta(fn) -> Callable:
    """The world's model with its ``edge`` metadata replaced by ``fn(parsed metadata) -> text``."""

    def make(w, d):
        import onnx

        from edge.format.modelinfo import META_KEY

        m = onnx.load(str(w.model))
        prop = next(p for p in m.metadata_props if p.key == META_KEY)
        prop.value = fn(json.loads(prop.value))
        p = d / "m.onnx"
        onnx.save(m, str(p))
        return p

    return make


def _meta_shape(meta: dict, token: str) -> str:
    meta["tensors"]["fc1.weight"]["shape"] = ["SHAPE", 10]
    return json.dumps(meta).replace('"SHAPE"', token)


# signatures: the adapter is the valid one, its .sig is hostile
def sig(fn) -> Callable:
    def make(w, d):
        p = _write(d, "a.safetensors", _adapter_bytes(w))
        spec = fn(w)
        s = signature_path(p)
        if callable(spec):
            spec(s)
        else:
            s.write_bytes(spec if isinstance(spec, bytes) else json.dumps(spec).encode())
        return p

    return make


def _sig_fields(w: World, **changes) -> dict:
    return {
        "format": "edge.signature",
        "version": 1,
        "alg": "ed25519",
        "key": key_id(bytes.fromhex(w.pub.read_text().strip())),
        "signature": base64.b64encode(bytes(64)).decode(),
        **changes,
    }


# profiles
def profile(fn, name: str = "hostile") -> Callable:
    """A profile file from ``fn(world, data) -> data | bytes`` applied to x86-dev's parsed YAML."""

    def make(w, d):
        data = yaml.safe_load((ROOT / "devices" / "x86-dev.yaml").read_text())
        data["name"] = name
        out = fn(w, data)
        p = d / f"{name}.yaml"
        p.write_bytes(out if isinstance(out, bytes) else yaml.safe_dump(out).encode())
        return p

    return make


def profile_with(**changes) -> Callable:
    def fn(w, data):
        for k, v in changes.items():
            if "." in k:
                outer, inner = k.split(".")
                data[outer][inner] = v
            else:
                data[k] = v
        return data

    return profile(fn)


def key_file(content: bytes) -> Callable:
    def fn(w, data):
        (w.root / "keys").mkdir(exist_ok=True)
        kp = w.root / "keys" / f"k{abs(hash(content))}.pub"
        kp.write_bytes(content)
        data["trusted_keys"] = [str(kp)]
        return data

    return profile(fn)


_BILLION_LAUGHS = "\n".join(
    ["name: hostile", "a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{c}: &{c} [{', '.join(['*' + p] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi")]
).encode()


# update data
def npz(**arrays) -> Callable:
    def make(w, d):
        p = d / "d.npz"
        np.savez(p, **arrays)
        return p

    return make


def _npy_header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def zip_members(members: dict[str, bytes]) -> Callable:
    def make(w, d):
        p = d / "d.npz"
        with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for name, data in members.items():
                z.writestr(name, data)
        return p

    return make


def _dup_members(w, d):
    p = d / "d.npz"
    x, y = blobs(1, seed=0)
    with zipfile.ZipFile(p, "w") as z, pytest.warns(UserWarning):
        for name, arr in (("x.npy", x), ("y.npy", y), ("y.npy", y)):
            buf = io.BytesIO()
            np.save(buf, arr)
            z.writestr(name, buf.getvalue())
    return p


def _escaping_folder(w, d):
    sub = d / "data"
    sub.mkdir()
    x, y = blobs(1, seed=0)
    np.savez(d / "outside.npz", x=x, y=y)
    (sub / "evil.npz").symlink_to(d / "outside.npz")
    return sub


# update state
def state(edit) -> Callable:
    """A copy of a valid state with ``edit(header dict, tensors dict, raw bytes) -> bytes``."""

    def make(w, d):
        from edge.format.state import State, load_state, save_state

        st = load_state(w.good_state)
        out = edit(st, save_state, State, d)
        return out if isinstance(out, Path) else _write(d, "s.safetensors", out)

    return make


def _nan_state(st, save_state, State, d):
    tensors = {k: (np.full_like(v, np.nan) if v.dtype.kind == "f" else v) for k, v in st.tensors.items()}
    return save_state(d / "s.safetensors", State(st.method, st.base_fingerprint, tensors, st.meta))


def _state_header(text: str) -> Callable:
    def edit(st, save_state, State, d):
        return save({"counts": np.zeros(1, np.float32)}, metadata={"edge": text})

    return edit


# PEFT folders
def peft(config: dict | bytes | None = None, tensors: dict | bytes | None = None, fix=None) -> Callable:
    def make(w, d):
        p = d / "peft"
        p.mkdir()
        cfg = config if config is not None else {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
        (p / "adapter_config.json").write_bytes(cfg if isinstance(cfg, bytes) else json.dumps(cfg).encode())
        rng = np.random.default_rng(0)
        ts = (
            tensors
            if tensors is not None
            else {
                "base_model.model.fc1.lora_A.weight": rng.standard_normal((2, 10)).astype(np.float32),
                "base_model.model.fc1.lora_B.weight": rng.standard_normal((20, 2)).astype(np.float32),
            }
        )
        (p / "adapter_model.safetensors").write_bytes(ts if isinstance(ts, bytes) else save(ts))
        if fix is not None:
            fix(w, p)
        return p

    return make


def _bf16_negative_offsets() -> bytes:
    header = {
        "base_model.model.fc1.lora_A.weight": {"dtype": "BF16", "shape": [2, 10], "data_offsets": [-40, 0]},
        "base_model.model.fc1.lora_B.weight": {"dtype": "BF16", "shape": [20, 2], "data_offsets": [0, 80]},
    }
    return _raw_header(json.dumps(header), bytes(80))


def _replace(name: str, how) -> Callable:
    def fix(w, p):
        (p / name).unlink()
        how(w, p / name)

    return fix


# -- the table ------------------------------------------------------------------------------------------------------
F, A, C, S = FormatError, AdapterMismatchError, ConfigError, SignatureError
CASES = [
    # adapter files: reads
    Case("adapter FIFO", "adapter", F, "not a regular file", fifo("a.safetensors")),
    Case("adapter /dev/zero", "adapter", F, "not a regular file", link("a.safetensors", "/dev/zero")),
    Case("adapter is a folder", "adapter", F, "folder", folder("a.safetensors")),
    Case("adapter 3 GiB sparse file", "adapter", F, "over the limit", sparse_giant("a.safetensors")),
    Case("adapter 20 MiB for a 3 KiB model", "adapter", F, "over the limit", sparse_giant("a.safetensors", 20 << 20)),
    Case("adapter missing", "adapter", F, "No such file", lambda w, d: d / "missing.safetensors"),
    # adapter files: JSON
    Case("header nested 100k deep", "adapter", F, "nests", adapter(lambda w: _raw_header(_deep(), b""))),
    Case("metadata nested 100k deep", "adapter", F, "nests", meta_text(lambda w: _deep())),
    Case("metadata NaN", "adapter", F, "constant NaN", meta_text(lambda w: json.dumps(w.meta)[:-1] + ', "x": NaN}')),
    Case(
        "Infinity in a shape",
        "adapter",
        F,
        "Infinity",
        meta_text(lambda w: json.dumps({**w.meta, "targets": {T: [2, "INF"]}}).replace('"INF"', "Infinity")),
    ),
    Case(
        "1e999 in a shape",
        "adapter",
        F,
        "overflows",
        meta_text(lambda w: json.dumps({**w.meta, "targets": {T: [2, "BIG"]}}).replace('"BIG"', "1e999")),
    ),
    Case(
        "duplicated metadata key",
        "adapter",
        F,
        "duplicated key",
        meta_text(lambda w: json.dumps(w.meta)[:-1] + ', "method": "shira"}'),
    ),
    Case(
        "duplicated header key",
        "adapter",
        F,
        "duplicated key",
        adapter(lambda w: _raw_header('{"__metadata__": {"edge": "{}"}, "__metadata__": {}}')),
    ),
    Case("header not UTF-8", "adapter", F, "UTF-8", adapter(lambda w: _raw_header("{}").replace(b"{}", b"\xff\xfe"))),
    Case(
        "edge metadata an object",
        "adapter",
        F,
        "not a string",
        adapter(lambda w: _raw_header('{"__metadata__": {"edge": {}}}')),
    ),
    Case("metadata a list", "adapter", F, "format is 'list'", meta_text(lambda w: "[1, 2]")),
    # adapter files: strict types
    Case("version true", "adapter", F, "version True", meta_edit(version=True)),
    Case("version 1.0", "adapter", F, "version 1.0", meta_edit(version=1.0)),
    Case("version '1'", "adapter", F, "version '1'", meta_edit(version="1")),
    Case("name a list", "adapter", F, "'name' must be a string", meta_edit(name=["a"])),
    Case("fingerprint a number", "adapter", F, "base_fingerprint", meta_edit(base_fingerprint=7)),
    Case("method a list", "adapter", F, "method", meta_edit(method=["shira"])),
    Case("shape with true", "adapter", F, "positive integers", meta_edit(targets={T: [True, 20]})),
    Case("shape with 2.0", "adapter", F, "positive integers", meta_edit(targets={T: [2.0, 20]})),
    Case("shape with 0", "adapter", F, "positive integers", meta_edit(targets={T: [0, 20]})),
    Case("shape with -2", "adapter", F, "positive integers", meta_edit(targets={T: [-2, 20]})),
    Case("shape of 9 dims", "adapter", F, "positive integers", meta_edit(targets={T: [1] * 9})),
    Case("targets a list", "adapter", F, "non-empty object", meta_edit(targets=[T])),
    Case("encodings on sparse", "adapter", F, "only dense", meta_edit(encodings={T: {"scheme": "gq", "bits": 1}})),
    Case(
        "bits 1.9",
        "adapter-file",
        F,
        "bits an integer",
        adapter(lambda w: _adapter_bytes(w, *_dense_meta(w, 1.9))),
    ),
    Case(
        "bits true", "adapter-file", F, "bits an integer", adapter(lambda w: _adapter_bytes(w, *_dense_meta(w, True)))
    ),
    Case("bits 3", "adapter-file", F, "stores", adapter(lambda w: _adapter_bytes(w, *_dense_meta(w, 3)))),
    Case(
        "scheme unknown",
        "adapter-file",
        F,
        "unknown quantization",
        adapter(lambda w: _adapter_bytes(w, *_dense_meta(w, 1, "zip"))),
    ),
    Case(
        "encoding of undeclared target",
        "adapter-file",
        F,
        "not declared",
        adapter(
            lambda w: _adapter_bytes(
                w,
                {
                    **_dense_meta(w, 1)[0],
                    "encodings": {"ghost": {"scheme": "gq", "bits": 1}, T: {"scheme": "gq", "bits": 1}},
                },
                _dense_meta(w, 1)[1],
            )
        ),
    ),
    # adapter files: amplification (declared shape checked against the model before decoding)
    Case(
        "1-bit codes for a 2^27-entry tensor",
        "adapter",
        A,
        "expects",
        adapter(lambda w: _adapter_bytes(w, *_dense_meta(w, 1, shape=(1 << 13, 1 << 14)))),
    ),
    Case(
        "dense adapter on base weights",
        "adapter",
        A,
        "must target",
        adapter(lambda w: _adapter_bytes(w, *_dense_meta(w, 1))),
    ),
    Case(
        "values float16",
        "adapter",
        F,
        "float32",
        adapter(
            lambda w: _adapter_bytes(w, arrays={**w.arrays, f"{T}.values": w.arrays[f"{T}.values"].astype(np.float16)})
        ),
    ),
    Case(
        "indices uint32",
        "adapter",
        F,
        "int32",
        adapter(
            lambda w: _adapter_bytes(w, arrays={**w.arrays, f"{T}.indices": w.arrays[f"{T}.indices"].astype(np.uint32)})
        ),
    ),
    Case(
        "values as BF16",
        "adapter",
        F,
        "corrupt safetensors|float32",
        adapter(
            lambda w: _raw_header(
                json.dumps(
                    {
                        "__metadata__": {"edge": json.dumps(w.meta)},
                        f"{T}.indices": {
                            "dtype": "I32",
                            "shape": list(w.arrays[f"{T}.indices"].shape),
                            "data_offsets": [0, w.arrays[f"{T}.indices"].nbytes],
                        },
                        f"{T}.values": {
                            "dtype": "BF16",
                            "shape": list(w.arrays[f"{T}.values"].shape),
                            "data_offsets": [
                                w.arrays[f"{T}.indices"].nbytes,
                                w.arrays[f"{T}.indices"].nbytes + 2 * w.arrays[f"{T}.values"].size,
                            ],
                        },
                    }
                ),
                w.arrays[f"{T}.indices"].tobytes() + bytes(2 * w.arrays[f"{T}.values"].size),
            )
        ),
    ),
    # model files (trusted, but typed errors)
    Case("model FIFO", "model", F, "not a regular file", fifo("m.onnx")),
    Case("model /dev/zero", "model", F, "not a regular file", link("m.onnx", "/dev/zero")),
    Case("model is a folder", "model", F, "folder", folder("m.onnx")),
    Case("model metadata nested deep", "model", F, "nests", model_meta(lambda m: _deep())),
    Case("model metadata Infinity shape", "model", F, "Infinity", model_meta(lambda m: _meta_shape(m, "Infinity"))),
    Case("model metadata 2.5 in a shape", "model", F, "positive integers", model_meta(lambda m: _meta_shape(m, "2.5"))),
    Case(
        "model metadata version true",
        "model",
        F,
        "version True",
        model_meta(lambda m: json.dumps({**m, "version": True})),
    ),
    Case(
        "model metadata duplicated key",
        "model",
        F,
        "duplicated",
        model_meta(lambda m: json.dumps(m)[:-1] + ', "name": "other"}'),
    ),
    Case("tflite random bytes", "model", F, "tflite|ONNX", lambda w, d: _write(d, "m.tflite", os.urandom(512))),
    # signatures (the runtime trusts one key)
    Case("sig FIFO", "sig", S, "not a regular file", sig(lambda w: lambda s: os.mkfifo(s))),
    Case("sig /dev/zero", "sig", S, "not a regular file", sig(lambda w: lambda s: s.symlink_to("/dev/zero"))),
    Case("sig folder", "sig", S, "folder", sig(lambda w: lambda s: s.mkdir())),
    Case("sig nested deep", "sig", S, "nests", sig(lambda w: ("[" * 1000 + "]" * 1000).encode())),
    Case("sig NaN", "sig", S, "NaN", sig(lambda w: json.dumps(_sig_fields(w))[:-1].encode() + b', "x": NaN}')),
    Case("sig version true", "sig", S, "malformed", sig(lambda w: _sig_fields(w, version=True))),
    Case(
        "sig duplicated key",
        "sig",
        S,
        "duplicated",
        sig(lambda w: json.dumps(_sig_fields(w))[:-1].encode() + b', "alg": "none"}'),
    ),
    Case("sig binary", "sig", S, "UTF-8", sig(lambda w: b"\xff\xfe\x00\x01" * 8)),
    Case("sig not base64", "sig", S, "malformed", sig(lambda w: _sig_fields(w, signature="!!!"))),
    Case(
        "sig 63 bytes",
        "sig",
        S,
        "64 bytes",
        sig(lambda w: _sig_fields(w, signature=base64.b64encode(bytes(63)).decode())),
    ),
    Case("sig key a list", "sig", S, "malformed", sig(lambda w: _sig_fields(w, key=["x"]))),
    Case("sig all zero", "sig", S, "does not match", sig(lambda w: _sig_fields(w))),
    Case(
        "sig forged R=identity s=0",
        "sig",
        S,
        "does not match",
        sig(lambda w: _sig_fields(w, signature=base64.b64encode(bytes.fromhex(IDENTITY_KEY) + bytes(32)).decode())),
    ),
    Case("sig over 4 KiB", "sig", S, "over the limit", sig(lambda w: b" " * 5000)),
    # keys (in a profile's trusted_keys)
    Case("trusted key of small order", "profile", C, "small order", profile_with(trusted_keys=[IDENTITY_KEY])),
    Case("trusted key non-canonical", "profile", C, "canonical", profile_with(trusted_keys=["ed" + "ff" * 30 + "7f"])),
    Case("trusted key file binary", "profile", C, "not hex text", key_file(b"\xff\xfe\x00\x01" * 16)),
    Case("trusted key file huge", "profile", C, "over the limit", key_file(b"ab" * 5000)),
    Case("trusted key not hex", "profile", C, "64 hex digits", profile_with(trusted_keys=["zz" * 32])),
    # profiles (owner controlled; still typed errors and no hang)
    Case("profile billion laughs", "profile", F, "aliases|expands", profile(lambda w, data: _BILLION_LAUGHS)),
    Case(
        "profile duplicated fallback",
        "profile",
        F,
        "appears twice",
        profile(lambda w, data: yaml.safe_dump(data).encode() + b"fallback: cpu\n"),
    ),
    Case("profile .inf budget", "profile", C, "positive number", profile_with(**{"budgets.memory_mb": float("inf")})),
    Case(
        "profile .nan budget", "profile", C, "positive number", profile_with(**{"budgets.latency_p95_ms": float("nan")})
    ),
    Case("profile threads true", "profile", C, "threads", profile_with(threads=True)),
    Case(
        "profile nested deep", "profile", F, "deeper", profile(lambda w, data: ("x: " + "[" * 200 + "]" * 200).encode())
    ),
    Case("profile not UTF-8", "profile", F, "not valid YAML", profile(lambda w, data: b"name: \xff\xfe\n")),
    Case(
        "profile python tag",
        "profile",
        F,
        "not valid YAML",
        profile(lambda w, data: b"name: !!python/object:os.system [ls]\n"),
    ),
    Case("profile a list", "profile", C, "mapping", profile(lambda w, data: b"- 1\n- 2\n")),
    Case("profile 2 MiB", "profile", F, "over the limit", profile(lambda w, data: b"#" * (2 << 20))),
    Case("profile unknown key", "profile", C, "unknown key", profile_with(telemetry="on")),
    Case(
        "devices folder with billion laughs", "devices", F, "aliases|expands", profile(lambda w, data: _BILLION_LAUGHS)
    ),
    # update data (hostile)
    Case(
        "npy renamed npz",
        "data",
        F,
        "single .npy",
        lambda w, d: (np.save(d / "d.npy", np.zeros(3)), (d / "d.npy").rename(d / "d.npz"), d / "d.npz")[-1],
    ),
    Case(
        "npz of objects",
        "data",
        F,
        "Python objects",
        npz(x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64)),
    ),
    Case(
        "npz bomb (4 GiB declared)",
        "data",
        F,
        "over the limit",
        zip_members({"x.npy": _npy_header((1 << 30,)) + bytes(64), "y.npy": _npy_header((1,), "<i8") + bytes(8)}),
    ),
    Case(
        "npz member not .npy",
        "data",
        F,
        "not an .npy",
        zip_members({"x.npy": _npy_header((1,)) + bytes(4), "evil.sh": b"rm -rf /"}),
    ),
    Case("npz 2000 members", "data", F, "members", zip_members({f"m{i}.npy": b"" for i in range(2000)})),
    Case(
        "npz damaged header",
        "data",
        F,
        "no readable .npy header",
        zip_members({"x.npy": b"\x93NUMPY\x01\x00\xff\xff{garbage", "y.npy": b""}),
    ),
    Case("npz truncated", "data", F, "not an .npz", lambda w, d: _write(d, "d.npz", w.good_npz.read_bytes()[:-30])),
    Case("npz duplicated member", "data", F, "appears twice", _dup_members),
    Case("npz FIFO", "data", F, "not a regular file", fifo("d.npz")),
    Case("data folder link out", "data", F, "outside the folder", _escaping_folder),
    Case("labels 1.5", "data", C, "integer class", npz(x=blobs(1, 0)[0], y=np.full(10, 1.5))),
    Case("labels negative", "data", C, "class indices", npz(x=blobs(1, 0)[0], y=np.full(10, -1))),
    Case("labels 10^9", "data", C, "class indices", npz(x=blobs(1, 0)[0], y=np.full(10, 10**9))),
    Case("labels 2-D", "data", C, "1-D", npz(x=blobs(1, 0)[0], y=np.zeros((10, 2), np.int64))),
    Case("x float64", "data", C, "must be float32", npz(x=blobs(1, 0)[0].astype(np.float64), y=np.zeros(10, np.int64))),
    Case("x wrong width", "data", C, "shape", npz(x=np.zeros((10, 9), np.float32), y=np.zeros(10, np.int64))),
    Case("x NaN", "data", C, "NaN", npz(x=np.full((10, 8), np.nan, np.float32), y=np.zeros(10, np.int64))),
    # update state
    Case(
        "state NaN",
        "state",
        F,
        "NaN or Inf",
        state(lambda st, save_state, State, d: _nan_state(st, save_state, State, d)),
    ),
    Case("state FIFO", "state", F, "not a regular file", fifo("s.safetensors")),
    Case("state /dev/zero", "state", F, "not a regular file", link("s.safetensors", "/dev/zero")),
    Case("state nested deep", "state", F, "nests", state(_state_header(_deep()))),
    Case(
        "state version true",
        "state",
        F,
        "version True",
        state(_state_header(json.dumps({"format": "edge.learn.update-state", "version": True}))),
    ),
    Case(
        "state duplicated key",
        "state",
        F,
        "duplicated",
        state(_state_header('{"format": "x", "format": "edge.learn.update-state"}')),
    ),
    Case(
        "state Infinity",
        "state",
        F,
        "Infinity",
        state(_state_header('{"format": "edge.learn.update-state", "version": 1, "x": Infinity}')),
    ),
    Case("state 3 GiB sparse", "state", F, "over the limit", sparse_giant("s.safetensors")),
    # PEFT folders
    Case("peft config nested deep", "peft", F, "nests", peft(config=_deep().encode())),
    Case("peft config NaN alpha", "peft", F, "NaN", peft(config=b'{"peft_type": "LORA", "lora_alpha": NaN}')),
    Case("peft alpha a string", "peft", C, "finite number", peft(config={"peft_type": "LORA", "lora_alpha": "8"})),
    Case("peft config a list", "peft", F, "JSON object", peft(config=b"[]")),
    Case("peft type a number", "peft", C, "not supported", peft(config={"peft_type": 7})),
    Case(
        "peft pattern with a backreference",
        "peft",
        C,
        "RE2",
        peft(config={"peft_type": "LORA", "lora_alpha": 4, "alpha_pattern": {r"(a)\1": 2}}),
    ),
    Case(
        "peft pattern not an object",
        "peft",
        C,
        "alpha_pattern",
        peft(config={"peft_type": "LORA", "alpha_pattern": ["x"]}),
    ),
    Case("peft BF16 negative offsets", "peft", F, "corrupt safetensors", peft(tensors=_bf16_negative_offsets())),
    Case("peft weights random bytes", "peft", F, "corrupt safetensors", peft(tensors=os.urandom(256))),
    Case(
        "peft B@A of 10^10 entries",
        "peft",
        A,
        "trained on a different base",
        peft(
            tensors={
                "base_model.model.fc1.lora_A.weight": np.zeros((1, 100_000), np.float32),
                "base_model.model.fc1.lora_B.weight": np.zeros((100_000, 1), np.float32),
            }
        ),
    ),
    Case(
        "peft integer LoRA weights",
        "peft",
        F,
        "must be floats",
        peft(
            tensors={
                "base_model.model.fc1.lora_A.weight": np.zeros((2, 10), np.int32),
                "base_model.model.fc1.lora_B.weight": np.zeros((20, 2), np.int32),
            }
        ),
    ),
    Case(
        "peft weights FIFO",
        "peft",
        F,
        "has no adapter_model",
        peft(fix=_replace("adapter_model.safetensors", lambda w, p: os.mkfifo(p))),
    ),
    Case(
        "peft config links out",
        "peft",
        F,
        "leads outside",
        peft(fix=_replace("adapter_config.json", lambda w, p: p.symlink_to(w.root / "outside.json"))),
    ),
    Case(
        "peft weights link to /dev/zero",
        "peft",
        F,
        "a link to /dev/zero",
        peft(fix=_replace("adapter_model.safetensors", lambda w, p: p.symlink_to("/dev/zero"))),
    ),
]


# -- the world the cases run against ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("corpus")
    model = root / "m.onnx"
    info = make_mlp(model)
    good = random_adapter(info, 7, name="x")
    meta = {
        "format": "edge.adapter",
        "version": 1,
        "method": "shira",
        "name": "x",
        "base_fingerprint": info.fingerprint,
        "dtype": "float32",
        "targets": {T: [2, 20]},
        "info": {},
    }
    arrays = {f"{T}.indices": good.tensors[T].indices, f"{T}.values": good.tensors[T].values}
    encoder = root / "encoder.onnx"
    make_encoder(encoder)
    pub = generate_key(root / "k.pem")
    x, y = blobs(2, seed=3)
    np.savez(root / "good.npz", x=x, y=y)
    from edge.learn.update import Updater

    with Runtime(encoder) as rt:
        up = Updater(rt, "ncm")
        up.partial_fit(x, y)
        up.save(root / "good.state.safetensors")
    (root / "outside.json").write_text('{"peft_type": "LORA"}')
    data = yaml.safe_load((ROOT / "devices" / "x86-dev.yaml").read_text())
    data.update(name="signed", trusted_keys=[pub.read_text().strip()])
    (root / "signed.yaml").write_text(yaml.safe_dump(data))
    return World(
        root, model, info, meta, arrays, encoder, pub, root / "k.pem", root / "good.npz",
        root / "good.state.safetensors", root / "signed.yaml",
    )  # fmt: skip


def _api(w: World, case: Case, path: Path) -> None:
    """Hand ``path`` to the entry point ``case.entry`` through the Python API."""
    if case.entry == "adapter":
        with Runtime(w.model) as rt:
            rt.load_adapter(path)
    elif case.entry == "adapter-file":
        from edge.format.adapter import inspect_adapter

        load_adapter(path)
        inspect_adapter(path)
    elif case.entry == "model":
        Runtime(path)
    elif case.entry == "sig":
        load_adapter(path, policy=SignaturePolicy.resolve([w.pub]))
    elif case.entry == "profile":
        from edge.devices import load_profile

        load_profile(path)
    elif case.entry == "devices":
        from edge.devices import list_profiles

        list_profiles([path.parent])
    elif case.entry == "data":
        from edge.format.samples import load_samples
        from edge.learn.update import update

        with Runtime(w.encoder) as rt:
            for _, x, y in load_samples(path, rt.info.inputs):
                update(rt, x, y, method="ncm")
    elif case.entry == "state":
        from edge.learn.update import Updater

        with Runtime(w.encoder) as rt:
            Updater.load(path, rt)
    elif case.entry == "peft":
        from edge.convert.peft import import_peft

        import_peft(path, w.model, lora_as="merged")
    else:
        raise AssertionError(f"unknown entry {case.entry}")


def _argv(w: World, case: Case, path: Path, out: Path) -> list[str]:
    quick = ["--runs", "1", "--warmup", "0", "--switches", "1", "-q"]
    return {
        "adapter": ["profile", str(w.model), "--device", "x86-dev", "--adapters", str(path), *quick],
        "adapter-file": ["inspect", str(path)],
        "model": ["inspect", str(path)],
        "sig": ["profile", str(w.model), "--device", str(w.signed_device), "--adapters", str(path), *quick],
        "profile": ["profile", str(w.model), "--device", str(path), *quick],
        "devices": ["devices", "--devices-dir", str(path.parent)],
        "data": ["update", "--model", str(w.encoder), "--data", str(path), "--method", "ncm"],
        "state": [
            "update",
            "--model",
            str(w.encoder),
            "--data",
            str(w.good_npz),
            "--state",
            str(path),
            "--method",
            "ncm",
        ],
        "peft": ["import-peft", str(path), "--base", str(w.model), "--out", str(out), "--lora-as", "merged"],
    }[case.entry]


def test_corpus_is_large_and_covers_every_entry_point():
    assert len(CASES) >= 100
    assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"
    assert {c.entry for c in CASES} == {
        "adapter",
        "adapter-file",
        "model",
        "sig",
        "profile",
        "devices",
        "data",
        "state",
        "peft",
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_api_refuses_with_the_stated_error(world, tmp_path, case):
    path = case.make(world, tmp_path)
    with pytest.raises(case.expect, match=case.match):
        _api(world, case, path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cli_exits_2_with_one_line_and_no_traceback(world, tmp_path, case, capsys):
    path = case.make(world, tmp_path)
    code = main(_argv(world, case, path, tmp_path / "out.safetensors"))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and re.match(r"edge( [a-z-]+)?: error: ", lines[0]), err  # "edge X:": refused at parsing
    assert "Traceback" not in err


ADAPTER_CASES = [c for c in CASES if c.entry in ("adapter", "sig")]


@pytest.mark.parametrize("signed", [False, True], ids=["open", "signed"])
def test_runtime_serves_its_previous_state_after_every_refusal(world, tmp_path, signed):
    keys = [world.pub] if signed else None
    live = tmp_path / "live.safetensors"
    random_adapter(world.info, 1, name="live").save(live)
    sign_file(live, world.pem)
    x = np.linspace(-1, 1, 30, dtype=np.float32).reshape(3, 10)
    with Runtime(world.model, trusted_keys=keys) as rt:
        rt.load_adapter(live)
        rt.switch("live")
        weights = {p: rt.weights(p) for p in world.info.tensors}
        out = rt.run(x)
        for i, case in enumerate(ADAPTER_CASES):
            d = tmp_path / f"c{i}"
            d.mkdir()
            path = case.make(world, d)
            if case.entry == "sig" and not signed:
                continue  # without a policy the .sig is never read; covered by the signed pass
            with pytest.raises(EdgeError):
                rt.load_adapter(path)
            assert rt.adapters == ["live"] and rt.active == {"live": 1.0}, case.name
            assert all(np.array_equal(rt.weights(p), weights[p]) for p in weights), case.name
            now = rt.run(x)
            assert all(np.array_equal(now[k], out[k]) for k in out), case.name
