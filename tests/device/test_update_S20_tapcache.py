"""The tap cache of ``edge update --taps`` (:mod:`edge.route.tapcache`) after its review: one test per finding.

The taps here copy the model (``_Tap``): the cache's logic is what is tested, tap_model is P20's tests'."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

from edge.errors import ConfigError
from edge.route import tapcache, tapkey
from edge.route.taplock import EntryLock


class _Tap:
    """A tap that copies the model (and counts); ``then`` runs after it (a model synced mid-tap)."""

    def __init__(self, then=None):
        self.calls, self.then = 0, then

    def __call__(self, src: Path, dst: Path) -> str:
        self.calls += 1
        dst.write_bytes(src.read_bytes() + b"tapped")
        if self.then:
            self.then()
        return "edge.features"


def _model(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x08\x07" + text.encode() * 64)  # no 'location': hashed, never parsed
    return path


def _digest(model: Path, taps: str = "auto") -> str:
    key = tapkey.source_key(model, taps, {})
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _copy(model: Path, root: Path, tap=None, taps: str = "auto") -> tuple[Path, bytes]:
    with contextlib.ExitStack() as stack:
        path, features = tapcache.tapped_copy(model, taps, {}, tap or _Tap(), stack, folder=root)
        assert features == "edge.features"
        return path, path.read_bytes()


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "edge.taps" and r.levelno == logging.WARNING]


def test_1_the_key_covers_every_source_of_the_package_and_the_onnx_versions(tmp_path, monkeypatch):
    import edge

    pkg = tmp_path / "edge"
    shutil.copytree(Path(edge.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    digests = [tapkey.code_digest(pkg)]
    for rel in ("convert/onnx_source.py", "registry.py"):  # not tap code by name, but what the tap reads with
        with open(pkg / rel, "a") as f:
            f.write("\n# changed\n")
        tapkey._DIGESTS.clear()
        digests.append(tapkey.code_digest(pkg))
    assert len(set(digests)) == 3
    dists = tapkey.dist_versions()
    for name in ("onnx", "onnxruntime"):
        assert f"{name}-{importlib.metadata.version(name)}.dist-info" in dists, dists
    # another code digest (an edited package) is another key: the model is tapped again, not reused
    model, tap = _model(tmp_path / "m" / "enc.onnx", "a"), _Tap()
    _copy(model, tmp_path / "taps", tap)
    _copy(model, tmp_path / "taps", tap)
    assert tap.calls == 1
    monkeypatch.setattr(tapkey, "code_digest", lambda root: "edited")
    _copy(model, tmp_path / "taps", tap)
    assert tap.calls == 2


def test_2_a_symlink_at_the_lock_is_never_followed(tmp_path, caplog):
    model, root = _model(tmp_path / "m" / "enc.onnx", "a"), tmp_path / "taps"
    root.mkdir()
    victim, missing = tmp_path / "victim.txt", tmp_path / "outside" / "created.txt"
    victim.write_text("precious\n")
    missing.parent.mkdir()
    lock = root / f"{_digest(model)}.lock"
    for target in (victim, missing):
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        lock.symlink_to(target)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edge.taps"):
            path, data = _copy(model, root)
        assert data == model.read_bytes() + b"tapped" and root not in path.parents
        (warned,) = _warnings(caplog)
        assert "symbolic link" in warned and "temporary folder" in warned, warned
    assert victim.read_text() == "precious\n" and not missing.exists()
    assert _entries(root) == []


def test_3_a_copy_not_kept_leaves_no_entry_and_entries_without_record_are_pruned(tmp_path, caplog):
    model, root = _model(tmp_path / "m" / "enc.onnx", "a"), tmp_path / "taps"
    with caplog.at_level(logging.WARNING, logger="edge.taps"):
        path, data = _copy(model, root, _Tap(then=lambda: _model(model, "b")))  # synced mid-tap
    assert "changed while it was tapped" in _warnings(caplog)[0]
    assert root not in path.parents and data.endswith(b"tapped") and _entries(root) == []
    crashed, busy = "c" * 32, "b" * 32  # entry names: the key's hash (X20: only such names are ever removed)
    for name in (crashed, busy):  # a run killed before its record; one still writing (holds the lock)
        _model(root / name / "enc.onnx", name)
    with EntryLock(root / f"{busy}.lock") as held:
        assert held.try_exclusive()
        _copy(_model(tmp_path / "other" / "x.onnx", "x"), root)
        assert not (root / crashed).exists() and not (root / f"{crashed}.lock").exists()
        assert (root / busy / "enc.onnx").exists()
    assert len(_entries(root)) == 2  # x.onnx's and the busy one, removed by a later write once free
    _copy(_model(tmp_path / "other" / "y.onnx", "y"), root)
    assert not (root / busy).exists() and len(_entries(root)) == 2


def test_4_a_copy_in_use_is_never_pruned(tmp_path):
    model, root = _model(tmp_path / "m" / "enc.onnx", "v1"), tmp_path / "taps"
    _copy(model, root)
    with contextlib.ExitStack() as run_a:  # a run using the kept copy holds its lock shared until it ends
        used, _ = tapcache.tapped_copy(model, "auto", {}, _Tap(), run_a, folder=root)
        assert root in used.parents
        _copy(_model(model, "v2"), root)  # another run: a new version of the model, tapped; prunes v1's entry
        assert used.exists() and used.read_bytes() == b"\x08\x07" + b"v1" * 64 + b"tapped"
        assert len(_entries(root)) == 2
    _copy(_model(model, "v3"), root)  # run A ended: the next write removes both earlier versions
    assert not used.exists() and len(_entries(root)) == 1


def _external_model(folder: Path, data_size: int, length: int | None, dims: list[int]) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    w.ClearField("raw_data")
    del w.dims[:]
    w.dims.extend(dims)
    w.data_location = TensorProto.EXTERNAL
    for k, v in [("location", "big.bin"), ("offset", "16")] + ([("length", str(length))] if length else []):
        e = w.external_data.add()
        e.key, e.value = k, v
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph(nodes, "g", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "ext.onnx")
    with open(folder / "big.bin", "wb") as f:
        f.write(b"\x01" * 4096)
        f.truncate(data_size)  # sparse: no disk used
    return folder / "ext.onnx"


def test_5_external_data_is_hashed_over_its_declared_ranges_only(tmp_path, monkeypatch):
    read = []
    real = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: read.append(len(data := real(fd, n))) or data)
    model = _external_model(tmp_path / "a", 1 << 30, 64, [4, 4])  # 64 bytes from offset 16 of a 1 GB file
    key = tapkey.source_key(model, "auto", {})
    assert sum(read) == model.stat().st_size + 64
    ((location, size, _),) = key["external"]
    assert (location, size) == ("big.bin", 1 << 30)
    with open(model.parent / "big.bin", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\x02")  # outside the range: onnx never reads it
    assert tapkey.source_key(model, "auto", {}) == key
    with open(model.parent / "big.bin", "r+b") as f:
        f.seek(40)
        f.write(b"\x02")  # inside it: another key
    assert tapkey.source_key(model, "auto", {})["external"] != key["external"]
    # what read_onnx would refuse (over protobuf's 2 GB) is refused before any of the data is read
    for where, length, dims in (("b", None, [4, 4]), ("c", 64, [1 << 29, 2])):  # to a 3 GB end; declared 4 GB
        model = _external_model(tmp_path / where, 3 << 30, length, dims)
        read.clear()
        with pytest.raises(ConfigError, match="over protobuf's 2 GB limit.*nothing of its external data was read"):
            tapkey.source_key(model, "auto", {})
        assert sum(read) == model.stat().st_size  # the .onnx file only


def test_6_a_full_cache_disk_taps_once_and_leaves_no_entry(tmp_path, monkeypatch, caplog):
    def full(src, dst):
        with open(dst, "wb") as f:
            f.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(tapcache, "_copy", full)
    monkeypatch.setattr(os, "link", cross_device)
    model, root, tap = _model(tmp_path / "m" / "enc.onnx", "a"), tmp_path / "taps", _Tap()
    with caplog.at_level(logging.WARNING, logger="edge.taps"):
        path, data = _copy(model, root, tap)
    assert tap.calls == 1 and data == model.read_bytes() + b"tapped" and root not in path.parents
    (warned,) = _warnings(caplog)
    assert "No space left on device" in warned and "not kept" in warned, warned
    assert _entries(root) == []


def test_7_a_symlink_repointed_deploy_keeps_one_copy_and_the_cache_is_capped(tmp_path, monkeypatch):
    root, releases = tmp_path / "taps", tmp_path / "releases"
    current = releases / "current.onnx"
    for i in range(4):
        _model(releases / f"enc-v{i}.onnx", f"release {i}")
        with contextlib.suppress(FileNotFoundError):
            current.unlink()
        current.symlink_to(f"enc-v{i}.onnx")
        _copy(current, root)
    (entry,) = _entries(root)
    assert json.loads((entry / tapcache.RECORD).read_text())["given"] == str(current)
    # the cap: oldest last use first; a copy read refreshes its last use
    root = tmp_path / "capped"
    models = [_model(tmp_path / "many" / f"m{i}.onnx", f"model {i}") for i in range(3)]
    _copy(models[0], root)
    _copy(models[1], root)
    one = sum(f.stat().st_size for f in _entries(root)[0].iterdir())
    monkeypatch.setenv("EDGE_TAP_CACHE_MB", str(2.5 * one / 2**20))
    for n, entry in enumerate(_entries(root)):
        os.utime(entry / tapcache.RECORD, (1e9 + n, 1e9 + n))
    _copy(models[0], root)  # read: m0's is now the most recently used
    _copy(models[2], root)  # over the cap: m1's goes
    assert sorted(p.name for e in _entries(root) for p in e.iterdir() if p.suffix == ".onnx") == ["m0.onnx", "m2.onnx"]
    monkeypatch.setenv("EDGE_TAP_CACHE_MB", "0")  # keeps nothing
    shutil.rmtree(root)
    _copy(models[0], root)
    assert _entries(root) == []
    for bad in ("lots", "-1", "nan", "inf"):
        monkeypatch.setenv("EDGE_TAP_CACHE_MB", bad)
        with pytest.raises(ConfigError, match=f"EDGE_TAP_CACHE_MB='{bad}' is not a size in megabytes"):
            tapcache.cache_limit()


def test_8_no_silent_unlocked_cache(tmp_path, monkeypatch, caplog):
    src = Path(tapcache.__file__).read_text() + Path(sys.modules["edge.route.taplock"].__file__).read_text()
    assert "nullcontext" not in src and "filelock" not in src.replace("``filelock``", "")
    monkeypatch.setitem(sys.modules, "fcntl", None)  # a system without file locks: said, and not cached
    model, root = _model(tmp_path / "m" / "enc.onnx", "a"), tmp_path / "taps"
    with caplog.at_level(logging.WARNING, logger="edge.taps"):
        path, _ = _copy(model, root)
    (warned,) = _warnings(caplog)
    assert "no fcntl" in warned and "temporary folder" in warned and root not in path.parents
    assert _entries(root) == []
