"""The tap cache of ``edge update --taps`` (:mod:`edge.route.tapcache`, :mod:`edge.route.tapprune`) after its
second review: one test per finding (X20). The taps copy the model: the cache's logic is what is tested."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _cachetest import CountingTap as _Tap

from edge.errors import ConfigError
from edge.route import tapcache, tapkey, tapprune
from edge.route.taplock import EntryLock

ROOT = Path(__file__).resolve().parents[2]


def _model(path: Path, text: str, times: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x08\x07" + text.encode() * times)  # no 'location': hashed, never parsed
    return path


def _copy(model: Path, root: Path, tap=None) -> Path:
    with contextlib.ExitStack() as stack:
        path, features = tapcache.tapped_copy(model, "auto", {}, tap or _Tap(), stack, folder=root)
        assert features == "edge.features" and path.read_bytes() == model.read_bytes() + b"tapped"
        return path


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and tapprune.is_entry(p.name))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _said(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "edge.taps" and r.levelno == level]


def _foreign(root: Path) -> dict[str, bytes]:
    """A user's files: folders, a file and its '.lock', a non-empty file named like a lock, an entry-named folder
    without a record (someone else's)."""
    for rel, data in [
        ("photos/2024/a.jpg", b"precious"),
        ("minilm/model.onnx", b"\x08\x07weights"),
        ("app", b"data"),
        ("app.lock", b""),
        (f"{'e' * 32}.lock", b"not a lock"),
        (f"{'d' * 32}/notes.txt", b"someone else's"),
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return _tree(root)


def test_1_foreign_files_in_the_cache_folder_are_never_removed_nor_counted(tmp_path, monkeypatch, caplog):
    # a folder that holds other things (EDGE_TAP_CACHE=~/.cache/edge, a models folder): no marker written, warned
    # once, nothing of it removed, its bytes not counted against the cap
    root = tmp_path / "shared"
    root.mkdir()
    _foreign(root)
    (root / "big.bin").write_bytes(b"\0" * 300_000)
    before = _tree(root)
    monkeypatch.setenv("EDGE_TAP_CACHE_MB", "0.1")  # 100 KB: under the foreign bytes, over two entries
    models = [_model(tmp_path / "m" / f"m{i}.onnx", f"model {i}") for i in range(3)]
    with caplog.at_level(logging.INFO, logger="edge.taps"):
        for m in models:
            _copy(m, root)
        _copy(_model(models[0], "model 0, v2"), root)  # m0 changed: its earlier entry goes
    (warned,) = _said(caplog)
    assert str(root) in warned and "left alone" in warned and "folder of its own" in warned, warned
    assert not (root / tapprune.MARKER).exists()
    assert {k: v for k, v in _tree(root).items() if k in before} == before  # every foreign file, unchanged
    assert len(_entries(root)) == 4  # the 'dddd…' folder (no record: not the cache's) and three entries
    assert not [m for m in _said(caplog, logging.INFO) if "removed" in m and "over EDGE_TAP_CACHE_MB" in m]
    # a folder the cache makes gets the marker; foreign names put there later are still left alone, while its own
    # leftovers (an entry folder without a record, an empty lock without its folder) are removed
    root = tmp_path / "own"
    _copy(models[1], root)
    assert (root / tapprune.MARKER).is_file()
    before = _foreign(root)
    (root / f"{'c' * 32}").mkdir()
    (root / f"{'f' * 32}.lock").write_bytes(b"")
    _copy(models[2], root)
    after = _tree(root)
    assert {k: v for k, v in after.items() if k in before and not k.startswith("d" * 32)} == {
        k: v for k, v in before.items() if not k.startswith("d" * 32)
    }
    assert (
        not (root / ("d" * 32)).exists()
        and not (root / ("c" * 32)).exists()
        and not (root / f"{'f' * 32}.lock").exists()
    )
    assert (root / f"{'e' * 32}.lock").read_bytes() == b"not a lock"  # a file with content is no lock of ours
    assert len(_entries(root)) == 2


def _fake_entry(root: Path, name: str, model: str) -> None:
    key = {"format": tapkey.FORMAT, "version": tapkey.TAP_FORMAT, "name": model, "sha256": name, "taps": "auto"}
    record = {"format": tapkey.FORMAT, "version": tapkey.TAP_FORMAT, "key": key, "features": "f"}
    (root / name).mkdir(parents=True)
    (root / name / model).write_bytes(b"x")
    (root / name / tapprune.RECORD).write_text(json.dumps({**record, "source": f"/m/{model}", "given": f"/m/{model}"}))
    (root / f"{name}.lock").write_bytes(b"")


def test_2_more_than_512_entries_are_all_kept_and_only_orphan_locks_go(tmp_path):
    root = tmp_path / "taps"
    names = [f"{i:032x}" for i in range(700)]  # listed in any order: past any window of a partial scan
    for i, name in enumerate(names):
        _fake_entry(root, name, f"m{i}.onnx")
    orphans = [f"{i:032x}" for i in range(900, 905)]
    for name in orphans:
        (root / f"{name}.lock").write_bytes(b"")
    record = {"key": {"name": "new.onnx", "sha256": "n", "taps": "auto"}, "source": "/m/new", "given": "/m/new"}
    tapprune.prune(root, "f" * 32, record, 1 << 30, 0, owned=True)
    assert sorted(p.name for p in _entries(root)) == names
    assert all((root / f"{n}.lock").exists() for n in names) and not any((root / f"{n}.lock").exists() for n in orphans)


def test_3_a_copy_bigger_than_the_cap_is_not_kept_and_evicts_nothing(tmp_path, monkeypatch, caplog):
    root, tap = tmp_path / "taps", _Tap()
    small = [_model(tmp_path / "m" / f"s{i}.onnx", str(i), 10_000) for i in range(3)]
    monkeypatch.setenv("EDGE_TAP_CACHE_MB", "0.05")  # 52 KB: three entries of ~10 KB
    for m in small:
        _copy(m, root)
    kept = {k: v for k, v in _tree(root).items() if not k.endswith(".lock")}
    big = _model(tmp_path / "m" / "big.onnx", "b", 100_000)
    with caplog.at_level(logging.INFO, logger="edge.taps"):
        for _ in range(2):
            assert root not in _copy(big, root, tap).parents
    assert tap.calls == 2 and {k: v for k, v in _tree(root).items() if not k.endswith(".lock")} == kept
    assert len(_entries(root)) == 3  # its lock file stays (an orphan: the next write's prune removes it)
    (warned,) = _said(caplog)  # said once; the next run's is an info line
    assert "big.onnx not kept" in warned and "over EDGE_TAP_CACHE_MB (0.05 MB)" in warned, warned
    assert sum("big.onnx not kept" in m for m in _said(caplog, logging.INFO)) == 1
    assert not [m for m in _said(caplog, logging.INFO) if "removed" in m]


def _disk(monkeypatch, root: Path, free: int):
    """The copy into the cache fails for want of space while another entry is there (a tiny partition)."""
    real = tapcache._copy

    def copy(src, dst):
        if [e for e in _entries(root) if e.name != dst.parent.name]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "link", lambda a, b: (_ for _ in ()).throw(OSError(errno.EXDEV, "cross-device")))
    monkeypatch.setattr(tapcache, "_copy", copy)
    monkeypatch.setattr(tapprune.shutil, "disk_usage", lambda p: type("U", (), {"free": free})())


def test_4_a_small_disk_keeps_the_new_version_and_retries_once_after_making_room(tmp_path, monkeypatch, caplog):
    root, tap = tmp_path / "taps", _Tap()
    model = _model(tmp_path / "m" / "enc.onnx", "v1")
    _copy(model, root, tap)
    (old,) = _entries(root)
    _disk(monkeypatch, root, 0)
    _copy(_model(model, "v2"), root, tap)  # the earlier version goes before the write: room for the new one
    (new,) = _entries(root)
    _copy(model, root, tap)
    assert new != old and tap.calls == 2
    # another model on a full disk: the least recently used entry goes, the write is tried once more
    _disk(monkeypatch, root, tapcache._SLACK)  # the slack is free; the new entry's bytes are not
    other = _model(tmp_path / "m" / "other.onnx", "o", 32)  # smaller than enc's entry: its removal makes room
    with caplog.at_level(logging.INFO, logger="edge.taps"):
        _copy(other, root, tap)
    (made,) = _entries(root)
    assert tap.calls == 3 and (made / "other.onnx").exists() and not _said(caplog)
    assert any("disk holding the cache is full" in m for m in _said(caplog, logging.INFO))
    # no room to be made (nothing else there): not kept, said, nothing removed
    caplog.clear()
    _disk(monkeypatch, root, 0)
    with caplog.at_level(logging.WARNING, logger="edge.taps"):
        _copy(_model(tmp_path / "m" / "third.onnx", "t"), root, tap)
    (warned,) = _said(caplog)
    assert "No space left on device" in warned and "not kept" in warned and _entries(root) == [made]


def test_5_two_installations_sharing_a_cache_keep_their_own_entries(tmp_path, monkeypatch):
    root, tap = tmp_path / "taps", _Tap()
    model = _model(tmp_path / "m" / "enc.onnx", "a")
    real = tapkey.dist_versions
    other = ["onnx-1.23.2.dist-info", "onnxruntime-1.31.0.dist-info"]
    for run in range(6):  # venv A, venv B (another onnxruntime), alternating on the same model path
        monkeypatch.setattr(tapkey, "dist_versions", real if run % 2 == 0 else lambda: other)
        _copy(model, root, tap)
    assert tap.calls == 2 and len(_entries(root)) == 2
    _copy(_model(model, "b"), root, tap)  # venv B: a new version of the model removes B's entry only
    assert tap.calls == 3 and len(_entries(root)) == 2
    monkeypatch.setattr(tapkey, "dist_versions", real)
    _copy(model, root, tap)  # venv A: the same; B's current entry stays
    assert tap.calls == 4 and len(_entries(root)) == 2


def test_6_sizes_past_any_disk_are_a_config_error_on_the_cli_too(tmp_path, monkeypatch):
    for bad in ("1e303", "1e300", "1e308", "9" * 400, "1073741825"):
        monkeypatch.setenv("EDGE_TAP_CACHE_MB", bad)
        with pytest.raises(ConfigError, match=r"is not a size in megabytes; set it to a number from 0 to 1073741824"):
            tapcache.cache_limit()
    for text, limit in (("1073741824", 1 << 50), ("1e-9", 1), ("0", 0), ("-0", 0), ("0.5", 1 << 19)):
        monkeypatch.setenv("EDGE_TAP_CACHE_MB", text)
        assert tapcache.cache_limit() == limit
    model = _model(tmp_path / "m.onnx", "a")
    import numpy as np

    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3), np.float32), y=np.arange(4) % 2)
    env = {**os.environ, "EDGE_TAP_CACHE": str(tmp_path / "taps"), "EDGE_TAP_CACHE_MB": "1e303"}
    argv = ["update", "--model", str(model), "--data", str(tmp_path / "d.npz"), "--taps", "auto"]
    r = subprocess.run([sys.executable, "-m", "edge.cli", *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "EDGE_TAP_CACHE_MB='1e303' is not a size in megabytes" in line


def test_7_a_run_waiting_for_another_runs_tap_says_so_once(tmp_path, monkeypatch, caplog):
    root, model = tmp_path / "taps", _model(tmp_path / "m" / "enc.onnx", "a")
    key = tapkey.source_key(model, "auto", {})
    import hashlib

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    monkeypatch.setattr(tapcache, "LOCK_SECONDS", 0.3)  # the maker never ends here: the waiting run gives up
    with EntryLock(root / f"{digest}.lock") as maker, caplog.at_level(logging.INFO, logger="edge.taps"):
        assert maker.try_exclusive()
        with pytest.raises(ConfigError, match="being made by another process for over 0.3 s"):
            _copy(model, root)
    (said,) = [m for m in _said(caplog) if "waiting" in m]
    assert f"{digest}.lock" in said and "enc.onnx" in said and "at most 0.3 s" in said, said
