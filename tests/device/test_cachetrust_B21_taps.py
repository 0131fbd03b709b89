"""The tap cache of ``edge update --taps`` is used only when no one else can write it (:mod:`edge.cache_trust`, B21).

A tapped copy's record (size, sha256) sits beside the copy: whoever can write the folder can plant a matching pair.
The taps here copy the model (as in the X20 tests): the cache's trust logic is what is tested."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import pytest
from _cachetest import NOBODY, as_root
from _cachetest import CountingTap as _Tap

from edge import cache_trust
from edge.route import tapcache, tapkey, tapprune


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(cache_trust, "_WARNED", set())
    monkeypatch.setattr(cache_trust, "_private_group", lambda gid, me: False)  # a shared group (L21 tests the other)


def _model(tmp_path: Path, weights: bytes = b"weights") -> Path:
    path = tmp_path / "m" / "enc.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x08\x07" + weights * 64)  # no 'location': hashed, never parsed
    return path


def _run(model: Path, root: Path, tap: _Tap) -> tuple[Path, bytes]:
    with contextlib.ExitStack() as stack:
        path, features = tapcache.tapped_copy(model, "auto", {}, tap, stack, folder=root)
        assert features == "edge.features"
        return path, path.read_bytes()


def _plant(root: Path) -> Path:
    """Rewrite the one entry's tapped file with other bytes and its record to match them: a planted pair."""
    (entry,) = [p for p in root.iterdir() if tapprune.is_entry(p.name)]
    evil = b"\x08\x07planted model"
    (entry / "enc.onnx").unlink()  # a new inode (the kept copy may be a hard link)
    (entry / "enc.onnx").write_bytes(evil)
    rec = json.loads((entry / tapprune.RECORD).read_text())
    rec.update(size=len(evil), sha256=hashlib.sha256(evil).hexdigest())
    (entry / tapprune.RECORD).write_text(json.dumps(rec, indent=1))
    return entry


def _tree(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        out[str(p.relative_to(root))] = (st.st_uid, st.st_mode, st.st_mtime_ns, p.read_bytes() if p.is_file() else b"")
    return out


def _said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "edge.taps" and r.levelno >= logging.WARNING]


def test_a_private_cache_is_made_0700_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_TAP_CACHE", str(tmp_path / "a" / "b" / "taps"))
    model, tap = _model(tmp_path), _Tap()
    root = tapcache.cache_folder()
    first = _run(model, root, tap)
    second = _run(model, root, tap)
    assert tap.calls == 1 and first[1] == second[1] == model.read_bytes() + b"tapped"
    assert second[0].parent.parent == root  # read from the cache
    for level in (tmp_path / "a", tmp_path / "a" / "b", root, second[0].parent):
        assert stat.S_IMODE(os.stat(level).st_mode) == 0o700, level


@pytest.mark.parametrize("where", ["cache", "parent"])
def test_a_group_writable_cache_is_not_used_and_a_planted_entry_never_runs(tmp_path, caplog, where):
    root = tmp_path / "shared" / "taps"
    model, tap = _model(tmp_path), _Tap()
    _run(model, root, tap)
    entry = _plant(root)
    _, used = _run(model, root, tap)  # a private folder: the planted pair matches its record, and is used
    assert tap.calls == 1 and used == b"\x08\x07planted model"
    before = _tree(root)
    os.chmod(root if where == "cache" else root.parent, 0o775)
    with caplog.at_level(logging.WARNING, logger="edge.taps"):
        for run in range(2):
            path, data = _run(model, root, tap)
            assert data == model.read_bytes() + b"tapped" and not path.is_relative_to(root)  # tapped fresh
            assert tap.calls == 2 + run
    assert _tree(root) == before and (entry / "enc.onnx").read_bytes() == b"\x08\x07planted model"
    (warned,) = _said(caplog)  # once for the folder, not once per run
    level = root if where == "cache" else root.parent
    assert f"{level} is" in warned and "group-writable (mode 0775)" in warned and "chmod go-w" in warned
    assert "EDGE_TAP_CACHE" in warned and "uncached" in warned
    assert ("sticky" in warned) == (where == "parent")


def test_a_sticky_world_writable_parent_like_tmp_is_fine(tmp_path):
    root = tmp_path / "tmp" / "taps"
    root.parent.mkdir()
    os.chmod(root.parent, 0o1777)
    model, tap = _model(tmp_path), _Tap()
    _run(model, root, tap)
    path, _ = _run(model, root, tap)
    assert tap.calls == 1 and path.is_relative_to(root)
    os.chmod(root, 0o1777)  # the cache folder itself: a sticky bit does not make it private
    assert "world-writable" in cache_trust.folder_problem(root)


@as_root
@pytest.mark.parametrize("owned", ["nobody else (control)", "cache", "parent"])
def test_a_cache_of_another_uid_is_neither_used_nor_pruned(tmp_path, caplog, owned):
    root = tmp_path / "other" / "taps"
    model, tap = _model(tmp_path), _Tap()
    _run(model, root, tap)
    _plant(root)
    stale = root / ("f" * 32)  # an entry without a record: pruned by any write into a cache that is used
    stale.mkdir()
    if owned != "nobody else (control)":
        for p in [root, *root.rglob("*")] if owned == "cache" else [root.parent]:
            os.chown(p, NOBODY, NOBODY, follow_symlinks=False)
    before = _tree(root.parent)
    with caplog.at_level(logging.WARNING, logger="edge.taps"):
        path, data = _run(model, root, tap)  # the planted entry matches this model
        other = _model(tmp_path / "v2", b"other weights")  # a new entry: its write prunes the stale one
        _run(other, root, tap)
    if owned == "nobody else (control)":  # the planted pair runs, the stale entry is pruned
        assert tap.calls == 2 and data == b"\x08\x07planted model" and not stale.exists() and not _said(caplog)
        return
    assert tap.calls == 3 and data == model.read_bytes() + b"tapped" and not path.is_relative_to(root)
    assert _tree(root.parent) == before  # nothing read back, written or removed
    (warned,) = _said(caplog)
    level = root if owned == "cache" else root.parent
    assert f"{level} is owned by uid {NOBODY}" in warned and "chown" not in warned  # never take over theirs (L21)
    assert "set EDGE_TAP_CACHE to a folder of your own" in warned
    assert ("not by you (uid 0)" if owned == "cache" else "not by root (you)") in warned


@as_root
def test_an_entry_of_another_uid_in_a_private_cache_is_tapped_again(tmp_path, caplog):
    root = tmp_path / "taps"
    model, tap = _model(tmp_path), _Tap()
    _run(model, root, tap)
    entry = _plant(root)
    for p in (entry, entry / tapprune.RECORD):
        os.chown(p, NOBODY, NOBODY)
    with caplog.at_level(logging.WARNING, logger="edge.taps"):
        path, data = _run(model, root, tap)
    assert tap.calls == 2 and data == model.read_bytes() + b"tapped"
    (warned,) = _said(caplog)
    assert "not used" in warned and f"owned by uid {NOBODY}" in warned
    assert os.lstat(entry).st_uid == 0 and (entry / "enc.onnx").read_bytes() == data  # rebuilt, ours
    assert _run(model, root, tap)[0].is_relative_to(root) and tap.calls == 2


@pytest.mark.parametrize("damage", ["link", "writable"])
def test_a_linked_or_writable_tapped_file_is_not_used(tmp_path, caplog, damage):
    root = tmp_path / "taps"
    model, tap = _model(tmp_path), _Tap()
    _run(model, root, tap)
    entry = _plant(root)
    if damage == "link":  # a link to a file with the recorded bytes elsewhere: never followed
        outside = tmp_path / "outside.onnx"
        outside.write_bytes((entry / "enc.onnx").read_bytes())
        (entry / "enc.onnx").unlink()
        (entry / "enc.onnx").symlink_to(outside)
    else:
        os.chmod(entry / "enc.onnx", 0o666)
    with caplog.at_level(logging.WARNING, logger="edge.taps"):
        _, data = _run(model, root, tap)
    assert tap.calls == 2 and data == model.read_bytes() + b"tapped"
    assert ("symbolic link" if damage == "link" else "world-writable") in _said(caplog)[0]


def test_a_linked_cache_folder_is_checked_where_it_leads(tmp_path, caplog):
    target = tmp_path / "open"
    target.mkdir()
    os.chmod(target, 0o777)
    (tmp_path / "home").mkdir()
    link = tmp_path / "home" / "taps"
    link.symlink_to(target)
    model, tap = _model(tmp_path), _Tap()
    with caplog.at_level(logging.WARNING, logger="edge.taps"):
        path, _ = _run(model, link, tap)
    assert not path.is_relative_to(target) and list(target.iterdir()) == []
    assert f"{target} is group- and world-writable" in _said(caplog)[0]


def test_the_key_holds_the_protobuf_and_numpy_versions():
    import importlib.metadata

    dists = tapkey.dist_versions()
    for name in ("onnx", "onnxruntime", "protobuf", "numpy"):
        assert f"{name}-{importlib.metadata.version(name)}.dist-info" in dists, dists
