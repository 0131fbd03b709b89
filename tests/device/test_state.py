"""Crash-safe, checksummed update state files (edge.format.state): round trips, damage, and SIGKILL mid-write."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge.errors import FormatError
from edge.format.state import State, load_state, save_state

ROOT = Path(__file__).resolve().parents[2]

TENSORS = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "f64": np.linspace(0, 1, 5),
    "i64": np.array([3, -1], np.int64),
    "i32": np.zeros((2, 0), np.int32),
    "scalar": np.array(2.5),
}


def _state(step: int = 0) -> State:
    return State("slda", "sha256:abc", TENSORS, {"step": step, "config": {"shrinkage": 0.05}})


def test_round_trip(tmp_path):
    p = save_state(tmp_path / "s.safetensors", _state(7))
    st = load_state(p)
    assert (st.method, st.base_fingerprint) == ("slda", "sha256:abc")
    assert st.meta == {"step": 7, "config": {"shrinkage": 0.05}}
    assert set(st.tensors) == set(TENSORS)
    for k, v in TENSORS.items():
        assert st.tensors[k].dtype == v.dtype and st.tensors[k].shape == v.shape
        np.testing.assert_array_equal(st.tensors[k], v)
    assert [f.name for f in tmp_path.iterdir()] == ["s.safetensors"]  # no temp file left behind


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def _edit_meta(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["edge"])
    meta["method"] = "ncm"  # same checksum, different content
    header["__metadata__"]["edge"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _retag(field: str, value):
    def edit(data: bytes) -> bytes:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header["__metadata__"]["edge"])
        meta[field] = value
        header["__metadata__"]["edge"] = json.dumps(meta)
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data[8 + n :]

    return edit


DAMAGE = [
    ("payload bit flip", _flip_last_byte, "checksum mismatch"),
    ("truncated", lambda d: d[: len(d) // 2], "truncated"),
    ("empty", lambda d: b"", "too short"),
    ("metadata edited", _edit_meta, "checksum mismatch"),
    ("other format", _retag("format", "edge.adapter"), "expected 'edge.learn.update-state'"),
    ("future version", _retag("version", 99), "version 99 is not supported"),
    ("not safetensors", lambda d: b"\x10" + b"\0" * 7 + b"not json at all!", "safetensors header: not valid JSON"),
]


@pytest.mark.parametrize("damage,expected", [(f, e) for _, f, e in DAMAGE], ids=[n for n, _, _ in DAMAGE])
def test_damaged_files_raise_format_error(tmp_path, damage, expected):
    p = save_state(tmp_path / "s.safetensors", _state())
    p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(FormatError, match=expected):
        load_state(p)


def test_missing_file_and_bad_dtype(tmp_path):
    with pytest.raises(FormatError, match="cannot read"):
        load_state(tmp_path / "nope.safetensors")
    with pytest.raises(FormatError, match="unsupported dtypes"):
        save_state(tmp_path / "s.safetensors", State("m", "f", {"x": np.zeros(2, np.float16)}))
    with pytest.raises(FormatError, match="JSON"):
        save_state(tmp_path / "s.safetensors", State("m", "f", {}, {"bad": object()}))


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    path = tmp_path / "s.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".s.safetensors.{int(dead.stdout)}.abc.tmp"
    live = tmp_path / f".s.safetensors.{os.getpid()}.def.tmp"  # a writer that is still running
    other = tmp_path / ".other.safetensors.1.x.tmp"
    for f in (stale, live, other):
        f.write_bytes(b"partial")
    save_state(path, _state())
    assert not stale.exists() and live.exists() and other.exists()
    with pytest.raises(FormatError):  # a temp file is never a valid state
        load_state(live)


WRITER = """
import os, sys, time, numpy as np
from edge.format.state import State, load_state, save_state
path = sys.argv[1]
hang = int(sys.argv[2]) if len(sys.argv) > 2 else -1
try:
    step = load_state(path).meta["step"] + 1
except Exception:
    step = 0
_fsync = os.fsync
def fsync(fd):  # with a step to hang at: stop inside that save, temp file written, not yet renamed
    if step == hang:
        print("writing", flush=True)
        time.sleep(60)
    _fsync(fd)
os.fsync = fsync
print("ready", flush=True)
while True:
    n = 200_000 + 50_000 * (step % 20)  # 0.8-4.6 MB per state, changing size
    save_state(path, State("test", "sha256:x", {"v": np.full(n, step, np.float32)}, {"step": step, "n": n}))
    print("saved", flush=True)
    step += 1
"""


def test_sigkill_mid_write_leaves_a_loadable_state(tmp_path):
    """Kill a writer that keeps saving at random moments: the path always holds a complete old or new state."""
    path = tmp_path / "state.safetensors"
    rng = np.random.default_rng(0)
    last = -1
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert proc.stdout.readline().strip() == "ready"
        assert proc.stdout.readline().strip() == "saved"  # kill somewhere in the following saves
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        st = load_state(path)  # checksum verified
        step, n = st.meta["step"], st.meta["n"]
        assert st.tensors["v"].shape == (n,) and np.all(st.tensors["v"] == step)
        assert step > last  # the writer resumed from the previous state and made progress
        last = step
        states = [f.name for f in tmp_path.iterdir() if not f.name.endswith(".tmp")]
        assert states == ["state.safetensors"]
    assert last >= 5


def test_kill_inside_save_keeps_previous_state(tmp_path):
    """Deterministic: the writer stops inside its 4th save (temp written, not renamed) and is killed there."""
    path = tmp_path / "state.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "3"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    lines = [proc.stdout.readline().strip() for _ in range(5)]
    assert lines == ["ready", "saved", "saved", "saved", "writing"]  # steps 0-2 saved, stopped inside step 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    temps = [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]
    assert len(temps) == 1  # the interrupted save's partial file
    st = load_state(path)
    assert st.meta["step"] == 2 and np.all(st.tensors["v"] == 2)
    save_state(path, State("test", "sha256:x", {"v": np.zeros(1, np.float32)}, {"step": 3, "n": 1}))
    assert not temps[0].exists()  # its writer is gone: the next save removes it
