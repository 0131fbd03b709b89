"""The engine cache (``backend="auto"``) is read and written only when no one else can write it (B21): a kept choice
steers which file runs, so one planted in a folder others can write must not be followed."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

import edge.engine_cache as ec
from edge import cache_trust

pytest.importorskip("ai_edge_litert")

from _cachetest import NOBODY, count_measuring, engine_pair  # noqa: E402


@pytest.fixture()
def pair(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_trust, "_private_group", lambda gid, me: False)  # a shared group (L21 tests the other)
    return engine_pair(tmp_path, monkeypatch)


@pytest.fixture()
def measured(monkeypatch):
    return count_measuring(monkeypatch)


def _choose(pair):
    return ec.cached_engine(pair, rounds=1, runs=1)


def _plant(pair) -> tuple:
    """Rewrite the kept choice to name the other file: what steers which file runs."""
    (path,) = ec.cache_folder().glob("m-*.json")
    rec = json.loads(path.read_text())
    other = "tflite" if rec["backend"] == "onnxruntime" else "onnxruntime"
    rec.update(backend=other, path=str(pair.with_suffix(".tflite" if other == "tflite" else ".onnx").resolve()))
    path.write_text(json.dumps(rec, indent=1))
    return path, other


def test_a_private_engine_cache_is_made_0700_and_read_back(pair, measured):
    first = _choose(pair)
    assert "kept in" in first.reason and measured[0] == 1
    second = _choose(pair)
    assert "read from" in second.reason and second.backend == first.backend and measured[0] == 1
    for level in (ec.cache_folder().parent, ec.cache_folder()):
        assert stat.S_IMODE(os.stat(level).st_mode) == 0o700


def test_a_group_writable_engine_cache_is_not_used_and_a_planted_choice_never_steers(pair, measured, caplog):
    _choose(pair)
    path, other = _plant(pair)
    assert _choose(pair).backend == other  # a private folder: the planted choice is followed (it is the user's)
    before = path.read_bytes(), path.stat().st_mtime_ns
    os.chmod(ec.cache_folder(), 0o770)
    with caplog.at_level(logging.WARNING, logger="edge.engines"):
        for run in range(2):
            choice = _choose(pair)
            assert measured[0] == 2 + run and "read from" not in choice.reason and "not kept" in choice.reason
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before  # neither read back nor rewritten
    warned = [r.getMessage() for r in caplog.records if r.name == "edge.engines" and r.levelno >= logging.WARNING]
    assert len(warned) == 1, warned  # once for the folder, not once per load
    assert f"engine cache {ec.cache_folder()} is not used" in warned[0] and "group-writable (mode 0770)" in warned[0]
    assert "chmod go-w" in warned[0] and "EDGE_ENGINE_CACHE" in warned[0]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="os.chown to another uid needs root")
@pytest.mark.parametrize("owned", ["folder", "file"])
def test_an_engine_cache_or_choice_of_another_uid_is_not_followed(pair, measured, caplog, owned):
    _choose(pair)
    path, other = _plant(pair)
    os.chown(ec.cache_folder() if owned == "folder" else path, NOBODY, NOBODY)
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="edge.engines"):
        choice = _choose(pair)
    assert measured[0] == 2 and "read from" not in choice.reason
    warned = [r.getMessage() for r in caplog.records if r.name == "edge.engines" and r.levelno >= logging.WARNING]
    assert len(warned) == 1 and f"owned by uid {NOBODY}" in warned[0], warned
    if owned == "folder":  # nothing written in it
        assert path.read_bytes() == before and os.stat(path).st_uid == 0
    else:  # a private folder: the file is measured again and replaced by one of ours
        assert os.lstat(path).st_uid == 0 and json.loads(path.read_text())["backend"] == choice.backend
        assert "read from" in _choose(pair).reason and measured[0] == 2
