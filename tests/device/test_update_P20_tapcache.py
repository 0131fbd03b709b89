"""``edge update --taps`` keeps its tapped copy (:mod:`edge.route.tapcache`): a second run with the same model bytes
and tap arguments taps nothing, a changed model is tapped again (its older copy removed), a damaged entry is
tapped again with a warning naming why, and what is learned is what a fresh tap gives."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge.cli import main
from edge.format.state import load_state
from edge.route import tapcache
from edge.route.taps import tap_model as _tap_model  # the real one: _Spy replaces the module's attribute

DEMO = Path.home() / ".cache" / "edge" / "digits-07d9c19ac5e7" / "encoder.onnx"
pytestmark = pytest.mark.skipif(not DEMO.is_file(), reason="needs the demo model (make demo)")


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("p20")
    shutil.copyfile(DEMO, folder / "enc.onnx")
    rng = np.random.default_rng(20)
    x = rng.standard_normal((24, 1, 8, 8)).astype(np.float32)
    np.savez(folder / "d.npz", x=x, y=np.arange(24) % 4)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_TAP_CACHE", str(tmp_path / "taps"))
    return tmp_path / "taps"


class _Spy:
    """Counts the taps made (edge.route.taps.tap_model), passing each through."""

    def __init__(self, monkeypatch):
        import edge.route.taps as taps

        self.calls, real = 0, taps.tap_model

        def spy(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(taps, "tap_model", spy)


def _update(model: Path, data: Path, out: Path, *extra: str) -> dict:
    argv = ["update", "--model", str(model), "--data", str(data), "--taps", "auto", "--method", "slda"]
    assert main([*argv, "--state", str(out.with_suffix(".state")), "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir())


def _fresh(model: Path, dst: Path) -> bytes:
    return _tap_model(model, dst, "auto").path.read_bytes()


def _tensors(state: Path) -> dict:
    return load_state(state).tensors


def test_a_second_run_reuses_the_tapped_copy_and_learns_what_a_fresh_tap_gives(kit, cache, tmp_path, monkeypatch):
    spy = _Spy(monkeypatch)
    first = _update(kit / "enc.onnx", kit / "d.npz", tmp_path / "a.json")
    assert spy.calls == 1
    (entry,) = _entries(cache)
    tapped = entry / "enc.onnx"
    before = tapped.stat()
    record = json.loads((entry / tapcache.RECORD).read_text())
    assert record["features"] == "edge.features" and record["size"] == before.st_size
    assert record["source"] == str((kit / "enc.onnx").resolve())
    assert tapped.read_bytes() == _fresh(kit / "enc.onnx", tmp_path / "fresh.onnx")  # the bytes a fresh tap writes

    second = _update(kit / "enc.onnx", kit / "d.npz", tmp_path / "b.json")
    assert spy.calls == 1  # not tapped again
    after = tapped.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert _entries(cache) == [entry]
    for k in ("classes", "samples_seen", "domains"):
        assert first[k] == second[k], k
    a, b = _tensors(tmp_path / "a.state"), _tensors(tmp_path / "b.state")
    assert sorted(a) == sorted(b) and a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_a_changed_model_is_tapped_again_and_its_older_copy_removed(kit, cache, tmp_path, monkeypatch):
    model = tmp_path / "enc.onnx"
    shutil.copyfile(kit / "enc.onnx", model)
    spy = _Spy(monkeypatch)
    _update(model, kit / "d.npz", tmp_path / "a.json")
    (old,) = _entries(cache)
    # the same graph and weights, one more ModelProto field (doc_string, field 6): other bytes, so another key
    model.write_bytes(model.read_bytes() + b"\x32\x07p20-doc")
    _update(model, kit / "d.npz", tmp_path / "b.json")
    assert spy.calls == 2
    (new,) = _entries(cache)
    assert new.name != old.name and not old.exists() and not (cache / f"{old.name}.lock").exists()
    assert b"p20-doc" in (new / "enc.onnx").read_bytes()
    assert (new / "enc.onnx").read_bytes() == _fresh(model, tmp_path / "fresh.onnx")
    # other tap arguments are another entry, kept beside it
    _update(model, kit / "d.npz", tmp_path / "c.json", "--taps", "attn-in:1")
    assert spy.calls == 3 and len(_entries(cache)) == 2


def _truncate(entry: Path) -> str:
    tapped = entry / "enc.onnx"
    tapped.write_bytes(tapped.read_bytes()[:1000])
    return "truncated or rewritten"


def _tamper(entry: Path) -> str:
    tapped = entry / "enc.onnx"
    data = bytearray(tapped.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of a weight: the same size
    tapped.write_bytes(bytes(data))
    return "it was modified"


def _other_model(entry: Path) -> str:
    path = entry / tapcache.RECORD
    rec = json.loads(path.read_text())
    rec["key"]["sha256"] = "0" * 64
    path.write_text(json.dumps(rec))
    return "made for another model"


def _garbage(entry: Path) -> str:
    (entry / tapcache.RECORD).write_bytes(b"{" * 300_000)  # over the record's bound: not read
    return "over the limit"


def _no_record(entry: Path) -> str:
    (entry / tapcache.RECORD).unlink()  # a run killed between the tapped file and its record
    return "cannot read tap cache record"


def _fifo(entry: Path) -> str:
    import os

    (entry / tapcache.RECORD).unlink()
    os.mkfifo(entry / tapcache.RECORD)  # read_bounded refuses it without blocking; the entry is made anew
    return "FIFO"


@pytest.mark.parametrize("damage", [_truncate, _tamper, _other_model, _garbage, _no_record, _fifo])
def test_a_damaged_entry_is_tapped_again_with_a_warning(kit, cache, tmp_path, monkeypatch, caplog, damage):
    spy = _Spy(monkeypatch)
    _update(kit / "enc.onnx", kit / "d.npz", tmp_path / "a.json")
    (entry,) = _entries(cache)
    said = damage(entry)
    with caplog.at_level(logging.WARNING, logger="edge.taps"):
        _update(kit / "enc.onnx", kit / "d.npz", tmp_path / "b.json")
    assert spy.calls == 2
    warned = [r.getMessage() for r in caplog.records if r.name == "edge.taps" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "not used" in warned[0] and said in warned[0], warned
    assert (entry / "enc.onnx").read_bytes() == _fresh(kit / "enc.onnx", tmp_path / "fresh.onnx")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edge.taps"):  # rebuilt: the third run reuses it, silently
        _update(kit / "enc.onnx", kit / "d.npz", tmp_path / "c.json")
    assert spy.calls == 2 and not [r for r in caplog.records if r.name == "edge.taps"]


def test_a_cache_that_cannot_be_written_is_warned_about_and_the_run_taps_as_before(kit, tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("x")
    monkeypatch.setenv("EDGE_TAP_CACHE", str(blocked))
    with caplog.at_level(logging.WARNING, logger="edge.taps"):
        report = _update(kit / "enc.onnx", kit / "d.npz", tmp_path / "a.json")
    assert report["samples_seen"] == 24
    warned = [r.getMessage() for r in caplog.records if r.name == "edge.taps"]
    assert len(warned) == 1 and "not kept" in warned[0] and str(blocked) in warned[0], warned
    assert blocked.read_text() == "x"


def test_the_key_covers_external_data_files(kit, tmp_path):
    import onnx

    proto = onnx.load(kit / "enc.onnx")
    onnx.save(proto, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.data", size_threshold=0)
    key = tapcache.source_key(tmp_path / "ext.onnx", "auto", {})
    assert [e[0] for e in key["external"]] == ["ext.data"]
    data = bytearray((tmp_path / "ext.data").read_bytes())
    data[-1] ^= 0x01  # the weights change, the .onnx does not
    (tmp_path / "ext.data").write_bytes(bytes(data))
    again = tapcache.source_key(tmp_path / "ext.onnx", "auto", {})
    assert again["sha256"] == key["sha256"] and again["external"] != key["external"]
    assert tapcache.source_key(kit / "enc.onnx", "auto", {})["external"] == []  # weights inside: none hashed
    assert tapcache.source_key(kit / "enc.onnx", "auto", {"a": "channels-last"}) != tapcache.source_key(
        kit / "enc.onnx", "auto", {}
    )
