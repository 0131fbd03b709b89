"""The cache-trust check (:mod:`edge.cache_trust`) after the K21 review (L21): the folder checked is the folder used
(F1), the fix named never takes over another user's folder (F2), user-private groups pass and every bad level is
named at once (F3), a device, file or shared sticky folder gets no chmod advice (F4), root's entries in the user's
cache are used (F5). The tap cache's taps copy the model (as in the B21 tests)."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from _cachetest import NOBODY, as_root
from _cachetest import CountingTap as _Tap

from edge import cache_trust
from edge.route import tapcache, taplock, tapprune


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(cache_trust, "_WARNED", set())


def _model(tmp_path: Path) -> Path:
    path = tmp_path / "m" / "enc.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x08\x07" + b"weights" * 64)
    return path


def _run(model: Path, root, tap: _Tap) -> Path:
    with contextlib.ExitStack() as stack:
        path, features = tapcache.tapped_copy(model, "auto", {}, tap, stack, folder=root)
        assert features == "edge.features" and path.read_bytes() == model.read_bytes() + b"tapped"
        return path


def _check(folder, caplog) -> tuple[Path | None, list[str]]:
    log = logging.getLogger("edge.l21")
    with caplog.at_level(logging.WARNING, logger="edge.l21"):
        got = cache_trust.trusted_cache(folder, what="tap cache", env="EDGE_TAP_CACHE", log=log)
    return got, [r.getMessage() for r in caplog.records if r.name == "edge.l21"]


def _fix(warned: str) -> str:
    """The fix a warning names (the test's folders hold words such as chmod in their names)."""
    return warned.split("; fix: ", 1)[1]


def _theirs(path: Path, mode: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, mode)
    return path


def test_dotdot_after_a_link_is_resolved_and_only_the_resolved_folder_is_used(tmp_path, caplog):
    (tmp_path / "mine").mkdir()
    (tmp_path / "other" / "sub").mkdir(parents=True)
    (tmp_path / "mine" / "link").symlink_to(tmp_path / "other" / "sub")
    given = f"{tmp_path}/mine/link/../cache"  # the kernel goes to other/cache; abspath() says mine/cache
    got, warned = _check(given, caplog)
    assert got == tmp_path / "other" / "cache" and warned == []
    assert stat.S_IMODE(os.stat(got).st_mode) == 0o700 and not (tmp_path / "mine" / "cache").exists()
    model, tap = _model(tmp_path), _Tap()
    _run(model, given, tap)
    assert _run(model, given, tap).is_relative_to(got) and tap.calls == 1  # kept there, read back from there


@as_root
def test_dotdot_into_another_users_open_folder_is_refused(tmp_path, caplog):
    (tmp_path / "mine").mkdir()
    evil = _theirs(tmp_path / "evil", 0o777)
    _theirs(evil / "sub", 0o755)
    _theirs(evil / "cache", 0o777)
    (tmp_path / "mine" / "link").symlink_to(evil / "sub")
    given = f"{tmp_path}/mine/link/../cache"
    got, (warned,) = _check(given, caplog)
    assert got is None and f"{given} (it leads to {evil / 'cache'}) is not used" in warned
    assert f"{evil / 'cache'} and the folders above it up to {evil} are owned by uid {NOBODY}" in warned
    model, tap = _model(tmp_path), _Tap()
    assert not _run(model, given, tap).is_relative_to(evil) and tap.calls == 1
    assert list((evil / "cache").iterdir()) == [] and sorted(os.listdir(tmp_path / "mine")) == ["link"]


@as_root
def test_another_uids_cache_or_home_gets_no_chown_advice(tmp_path, caplog):
    home = _theirs(tmp_path / "alice", 0o750)  # root with alice's HOME (sudo -E): no cache made yet
    got, (warned,) = _check(home / ".cache" / "edge" / "taps", caplog)
    assert got is None and not (home / ".cache").exists()
    assert f"its parent {home} is owned by uid {NOBODY}" in warned and "not by root (you)" in warned
    assert "chown" not in _fix(warned) and "neither" not in warned
    assert _fix(warned) == "set EDGE_TAP_CACHE to a folder of your own (created 0700 when missing)"
    taps = home / ".cache" / "edge" / "taps"  # her own cache
    for level in (taps.parent.parent, taps.parent, taps):
        _theirs(level, 0o700)
    cache_trust._WARNED.clear()
    caplog.clear()
    got, (warned,) = _check(taps, caplog)
    assert got is None and "chown" not in _fix(warned) and f"{taps} and the folders above it up to {home}" in warned


def test_chmod_is_named_only_for_a_mode_problem_on_a_folder_of_ones_own(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(cache_trust, "_private_group", lambda gid, me: False)
    mine = tmp_path / "own" / "taps"
    mine.mkdir(parents=True)
    os.chmod(mine, 0o777)
    os.chmod(mine.parent, 0o775)
    got, (warned,) = _check(mine, caplog)  # both levels named in one warning, one chmod for both
    assert got is None and f"fix: chmod go-w {mine} {mine.parent}, or set EDGE_TAP_CACHE" in warned
    assert f"{mine} is group- and world-writable (mode 0777)" in warned
    assert f"its parent {mine.parent} is group-writable (mode 0775) without the sticky bit" in warned
    monkeypatch.setattr(cache_trust, "_WARNED", set())
    monkeypatch.setattr(cache_trust, "_me", lambda: os.geteuid() + 4242)  # another user: not their folders
    caplog.clear()
    got, (warned,) = _check(mine, caplog)
    assert got is None and _fix(warned) == "set EDGE_TAP_CACHE to a folder of your own (created 0700 when missing)"


def test_the_private_group_rule(monkeypatch):
    import grp
    import pwd

    users = {1000: pwd.struct_passwd(("alice", "x", 1000, 1000, "", "/home/alice", "/bin/sh"))}
    groups = {1000: ["alice", []], 1001: ["staff", []], 1002: ["alice2", []]}
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: users[uid])
    monkeypatch.setattr(grp, "getgrgid", lambda gid: grp.struct_group((groups[gid][0], "x", gid, groups[gid][1])))
    monkeypatch.setattr(pwd, "getpwall", lambda: list(users.values()))  # this machine's accounts play no part
    monkeypatch.setattr(cache_trust, "_local_accounts", lambda *a: True)  # nor its nsswitch.conf
    assert cache_trust._private_group(1000, 1000)  # alice's own group, no other members
    groups[1000][1] = ["alice"]
    assert cache_trust._private_group(1000, 1000)  # listing herself changes nothing
    groups[1000][1] = ["alice", "bob"]
    assert not cache_trust._private_group(1000, 1000)  # bob can write it too
    assert not cache_trust._private_group(1001, 1000)  # not her primary group
    assert not cache_trust._private_group(1000, 4242)  # no such user
    users[1000] = pwd.struct_passwd(("alice", "x", 1000, 1002, "", "/home/alice", "/bin/sh"))
    assert not cache_trust._private_group(1002, 1000)  # her primary group, but named otherwise: maybe shared


def test_group_writable_levels_of_ones_private_group_pass_and_cost_nothing_otherwise(tmp_path, caplog, monkeypatch):
    calls = []
    real = cache_trust._private_group
    monkeypatch.setattr(cache_trust, "_private_group", lambda gid, me: calls.append(gid) or real(gid, me))
    root = tmp_path / "home" / ".cache" / "edge" / "taps"
    assert _check(root, caplog)[0] == root and calls == []  # 0700 levels: the group database is never read
    old = os.umask(0o002)  # user-private groups (Ubuntu, Fedora): pip and others make ~/.cache 0775
    try:
        for level in (root.parent.parent, root.parent):
            os.chmod(level, 0o775)
        monkeypatch.setattr(cache_trust, "_private_group", lambda gid, me: calls.append(gid) or gid == os.getegid())
        assert _check(root, caplog)[0] == root and calls == [os.getegid()] * 4  # 2 levels, checked before and after
        made = tmp_path / "u002" / "a" / "b"
        assert cache_trust.make_private(made) and cache_trust.make_levels(tmp_path / "demo" / "x", 0o755)
        for level, mode in ((made.parent, 0o700), (made, 0o700), (tmp_path / "demo", 0o755)):
            assert stat.S_IMODE(os.stat(level).st_mode) == mode, level
        assert stat.S_IMODE(os.stat(tmp_path / "demo" / "x").st_mode) == 0o755
    finally:
        os.umask(old)
    monkeypatch.setattr(cache_trust, "_private_group", lambda gid, me: False)  # a group others are in
    got, (warned,) = _check(root, caplog)
    levels = f"{root.parent} {root.parent.parent}"
    assert got is None and _fix(warned).startswith(f"chmod go-w {levels}, or set EDGE_TAP_CACHE")  # both at once


def test_a_device_a_file_or_a_shared_sticky_folder_gets_no_chmod_advice(tmp_path, caplog):
    plain = tmp_path / "f"
    plain.write_text("x")
    os.chmod(plain, 0o666)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        cases = {
            os.devnull: f"{os.devnull} is not a folder (a character device)",
            f"/proc/self/fd/{fd}": f"(it leads to {os.devnull}) is not used: {os.devnull} is not a folder",
            str(plain): f"{plain} is not a folder (a file)",
            str(plain / "sub"): f"its parent {plain} is not a folder (a file)",
        }
        for given, said in cases.items():
            got, warned = _check(given, caplog)
            assert got is None and said in warned[-1] and "chmod" not in _fix(warned[-1]), warned
            assert "could plant" not in warned[-1]
    finally:
        os.close(fd)
    got, warned = _check(shared, caplog)
    assert got is None and f"{shared} is a shared folder, " in warned[-1]
    assert "world-writable (mode 1777) with the sticky bit" in warned[-1]
    assert f"private subfolder such as {shared}/edge-" in _fix(warned[-1]) and "chmod go-w" not in warned[-1]
    assert list(shared.iterdir()) == [] and plain.read_text() == "x"


@as_root
def test_a_root_entry_in_the_users_cache_is_used(tmp_path, monkeypatch):
    root = tmp_path / "taps"
    model, tap = _model(tmp_path), _Tap()
    _run(model, root, tap)  # as root: the entry is root's, as an old `sudo -E edge update --taps` leaves it
    for p in [root, *(p for p in root.iterdir() if not tapprune.is_entry(p.name))]:
        os.chown(p, NOBODY, NOBODY)  # the user's own cache folder, marker and lock
    monkeypatch.setattr(cache_trust, "_me", lambda: NOBODY)  # the user's run
    assert _run(model, root, tap).is_relative_to(root) and tap.calls == 1  # a hit, as before B21


@as_root
def test_an_entry_that_cannot_be_replaced_names_the_fix(tmp_path, monkeypatch, caplog):
    root = tmp_path / "taps"
    model, tap = _model(tmp_path), _Tap()
    _run(model, root, tap)
    (entry,) = [p for p in root.iterdir() if tapprune.is_entry(p.name)]
    os.chown(entry, 4242, 4242)  # a third user's: not used, and (as the user) not removable
    monkeypatch.setattr(tapcache, "clear", lambda e: None)  # the EPERM a user gets, as root cannot
    with caplog.at_level(logging.WARNING, logger="edge.taps"):
        assert not _run(model, root, tap).is_relative_to(root) and tap.calls == 2
    said = [r.getMessage() for r in caplog.records if r.name == "edge.taps"]
    assert any("owned by uid 4242" in m for m in said) and any(f"sudo rm -r {entry}" in m for m in said), said


@as_root
@pytest.mark.skipif(not os.path.exists("/usr/bin/setpriv"), reason="needs setpriv to run as another uid")
def test_roots_lock_file_is_locked_read_only_by_the_user(tmp_path):
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="edge-l21-", dir="/tmp"))
    try:
        os.chmod(folder, 0o755)
        lock = folder / f"{'a' * 32}.lock"
        lock.touch(0o644)  # root's, from an old sudo run
        code = (
            "import sys; from pathlib import Path; from edge.route.taplock import EntryLock\n"
            f"k = EntryLock(Path({str(lock)!r})); print(k.try_shared(), k.try_exclusive())"
        )
        env = {"PYTHONPATH": str(Path(taplock.__file__).parents[2]), "PATH": "/usr/bin:/bin"}
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", code]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd="/")
        if "Permission denied" in out.stderr and "python" in out.stderr.lower() and not out.stdout:
            pytest.skip(f"uid {NOBODY} cannot run this python: {out.stderr[-200:]}")
        assert out.stdout.split() == ["True", "True"], out.stderr[-800:]
    finally:
        import shutil

        shutil.rmtree(folder)
