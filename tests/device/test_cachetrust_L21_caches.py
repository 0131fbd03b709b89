"""The engine cache after the K21 review (L21): a trust check that fails (OSError) means not used, warned once per
process (F6); nothing writes a missing cache level with the default mode; the folder used is the one checked, also
through ``link/..`` (F1) and when another user makes a level while the cache makes it."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat

import pytest

import edge.engine_cache as ec
from edge import cache_trust
from edge.errors import WriteError
from edge.format.io import atomic_write_bytes

pytest.importorskip("ai_edge_litert")

from _cachetest import NOBODY, count_measuring, engine_pair  # noqa: E402


@pytest.fixture()
def pair(tmp_path, monkeypatch):
    return engine_pair(tmp_path, monkeypatch)


@pytest.fixture()
def measured(monkeypatch):
    return count_measuring(monkeypatch)


def _warned(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "edge.engines" and r.levelno >= logging.WARNING]


def test_a_failing_trust_check_means_untrusted_warned_once(pair, measured, monkeypatch, caplog):
    def broken(folder, **kw):
        raise OSError(errno.ELOOP, "Too many levels of symbolic links", str(folder))

    monkeypatch.setattr(ec, "trusted_cache", broken)
    with caplog.at_level(logging.WARNING, logger="edge.engines"):
        for run in range(2):
            choice = ec.cached_engine(pair, rounds=1, runs=1)
            assert measured[0] == 1 + run and "not kept" in choice.reason and "read from" not in choice.reason
    (warned,) = _warned(caplog)  # once per process, with the error
    assert f"engine cache {ec.cache_folder()} is not used" in warned and "Too many levels" in warned
    assert not ec.cache_folder().parent.exists()  # neither made nor written


def test_a_write_into_a_missing_cache_level_is_refused_not_made(tmp_path):
    gone = tmp_path / "cache" / "engines" / "m.json"
    with pytest.raises(WriteError, match="No such file"):
        atomic_write_bytes(gone, b"{}", mode=0o644, parents=False)
    assert not (tmp_path / "cache").exists()
    atomic_write_bytes(gone, b"{}")  # the default for every other caller: folders made as before
    assert gone.read_bytes() == b"{}"


def test_the_engine_cache_through_link_dotdot_is_kept_where_it_leads(pair, measured, tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "mine" / "link").symlink_to(tmp_path / "real" / "sub")
    monkeypatch.setenv("EDGE_ENGINE_CACHE", f"{tmp_path}/mine/link/../eng")
    first = ec.cached_engine(pair, rounds=1, runs=1)
    (kept,) = (tmp_path / "real" / "eng").glob("m-*.json")
    assert f"kept in {kept}" in first.reason and not (tmp_path / "mine" / "eng").exists()
    assert stat.S_IMODE(os.stat(kept.parent).st_mode) == 0o700 and json.loads(kept.read_text())["backend"]
    second = ec.cached_engine(pair, rounds=1, runs=1)
    assert f"read from {kept}" in second.reason and measured[0] == 1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="os.chown to another uid needs root")
def test_a_level_another_user_makes_meanwhile_is_refused(pair, measured, tmp_path, monkeypatch, caplog):
    sticky = tmp_path / "sticky"  # like /tmp: the user's dangling link into it, its target not made yet
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "new").symlink_to(sticky / "planned")
    monkeypatch.setenv("EDGE_ENGINE_CACHE", str(tmp_path / "mine" / "new" / "eng"))
    real = cache_trust.make_private

    def racing(folder):  # the other user wins the race: makes the link's target, theirs and open to all
        for level in (sticky / "planned", sticky / "planned" / "eng"):
            level.mkdir()
            os.chown(level, NOBODY, NOBODY)
            os.chmod(level, 0o777)
        return real(folder)

    monkeypatch.setattr(cache_trust, "make_private", racing)
    with caplog.at_level(logging.WARNING, logger="edge.engines"):
        choice = ec.cached_engine(pair, rounds=1, runs=1)
    assert measured[0] == 1 and "not kept" in choice.reason
    assert list((sticky / "planned" / "eng").iterdir()) == []  # nothing written into their folder
    (warned,) = _warned(caplog)
    assert f"(it leads to {sticky / 'planned' / 'eng'})" in warned and f"owned by uid {NOBODY}" in warned
