"""Slots of a shared ``--cache`` and the one-time migration (helper W, session 21, mending review U21 F1-F3).

Before: a copied adapter folder (``cp -a``, a cloned card) or a symlinked ``.edge-sync-id`` shared the original's
slot, and the copy's ``--prune`` removed the original's floor; a new empty folder migrating first got floors for
adapters it never had (prune then "removed" them); ``state.json.migrated`` was read again on every rebuild, so
deleting a slot's ``state.json`` never reset its floors. A blob that cannot be unlinked (EBUSY) ended the sync.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("oras", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("filelock", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

from _registry import SKIP_REASON, registry_binary  # noqa: E402

from edge.errors import ConfigError  # noqa: E402
from edge.fleet import blobstore  # noqa: E402
from edge.fleet.device_state import load_state  # noqa: E402
from edge.fleet.slot_id import SLOT_ID, device_slot  # noqa: E402

OLD = {"adapters": {n: {"sha256": c * 64, "length": 3, "version": 7} for n, c in (("legal", "a"), ("medical", "b"))}}


def _cache(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    (cache / "devices").mkdir(parents=True)
    (cache / "state.json").write_text(json.dumps(OLD))  # the one-per-cache layout
    return cache


def _load(dev: Path, cache: Path) -> dict:
    dev.mkdir(exist_ok=True)
    return load_state(device_slot(dev, cache, False), dev, cache)


def test_a_symlinked_id_is_refused_and_a_copied_folder_gets_a_slot_of_its_own(tmp_path, caplog):
    cache, a, b = tmp_path / "cache", tmp_path / "a", tmp_path / "b"
    for d in (a, b, cache):
        d.mkdir()
    slot = device_slot(a, cache, False)
    assert (slot / "folder.json").is_file() and device_slot(a, cache, False) == slot  # stable on the next sync
    os.symlink(a / SLOT_ID, b / SLOT_ID)
    with pytest.raises(ConfigError, match=r"\.edge-sync-id is a symbolic link.*delete the link"):
        device_slot(b, cache, False)
    assert (b / SLOT_ID).is_symlink()  # not replaced, not followed
    shutil.copytree(a, tmp_path / "c", symlinks=True)  # cp -a: the same id in another folder
    with caplog.at_level(logging.WARNING, logger="edge.fleet"):
        other = device_slot(tmp_path / "c", cache, False)
    assert other != slot and other.parent == slot.parent
    assert (tmp_path / "c" / SLOT_ID).read_text().strip() == other.name != (a / SLOT_ID).read_text().strip()
    assert "holds the .edge-sync-id of another folder" in caplog.text and str(a.resolve()) in caplog.text
    assert device_slot(a, cache, False) == slot and device_slot(tmp_path / "c", cache, False) == other
    a.rename(tmp_path / "moved")  # the same folder elsewhere (same inode): its slot kept
    assert device_slot(tmp_path / "moved", cache, False) == slot


def test_an_empty_folder_migrating_first_gets_no_floors(tmp_path, caplog):
    cache = _cache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="edge.fleet"):
        state = _load(tmp_path / "fresh", cache)
    assert state == {"adapters": {}} and "floors kept" not in caplog.text
    assert (cache / "state.json.migrated").is_file() and not (cache / "state.json").exists()


def test_a_folder_with_one_old_file_keeps_it_installed_and_the_rest_as_floors_only(tmp_path, caplog):
    cache, dev = _cache(tmp_path), tmp_path / "dev"
    dev.mkdir()
    (dev / "legal.safetensors").write_bytes(b"other bytes")
    with caplog.at_level(logging.WARNING, logger="edge.fleet"):
        state = _load(dev, cache)
    assert {n: e["version"] for n, e in state["adapters"].items()} == {"legal": 7}
    assert state["floors"] == {"medical": {"version": 7}}  # not installed: prune and stale do not name it
    assert "names files this folder holds: legal 7; floors only (no file here, nothing installed): medical 7" in (
        caplog.text
    )


def test_the_old_state_is_read_once_per_slot(tmp_path):
    cache, dev = _cache(tmp_path), tmp_path / "dev"
    dev.mkdir()
    (dev / "legal.safetensors").write_bytes(b"x")
    slot = device_slot(dev, cache, False)
    assert load_state(slot, dev, cache)["adapters"]["legal"]["version"] == 7
    (slot / "state.json").unlink()  # as the error texts advise: start over
    assert load_state(slot, dev, cache) == {"adapters": {}}  # the *.migrated floors do not come back
    assert json.loads((slot / "migrated.json").read_text()) == {"migrated": True}
    second = tmp_path / "second"  # another folder's first sync still migrates from *.migrated
    second.mkdir()
    (second / "medical.safetensors").write_bytes(b"y")
    assert load_state(device_slot(second, cache, False), second, cache)["adapters"]["medical"]["version"] == 7


def test_a_blob_that_cannot_be_unlinked_is_warned_about_and_the_sync_goes_on(tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    for sub in ("partial", "blobs"):
        (cache / sub).mkdir(parents=True)
    (cache / "blobs" / ("c" * 64)).write_text("old")
    real = os.unlink

    def busy(name, *, dir_fd=None):
        if name == "c" * 64:
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real(name, dir_fd=dir_fd)

    monkeypatch.setattr(blobstore.os, "unlink", busy)
    with caplog.at_level(logging.WARNING, logger="edge.fleet"):
        blobstore.clean(cache, set())  # before: OSError out of the sync, after its installs
    assert "not removed: Device or resource busy" in caplog.text and (cache / "blobs" / ("c" * 64)).is_file()


@pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)
def test_a_copys_prune_never_lowers_the_originals_floor(tmp_path_factory):
    from test_fleet import Fleet

    from edge.fleet import sync

    f = Fleet(tmp_path_factory.mktemp("fleetmend_w21"), n=2, nbytes=6_000)
    try:
        f.push()
        root = tmp_path_factory.mktemp("w21_devs")
        cache, a, c = root / "cache", root / "a", root / "c"
        assert sync(f.cfg("stable"), a, model=f.model, cache_dir=cache).status == "updated"
        shutil.copytree(a, c, symlinks=True)  # a cloned card
        (c / "a01.safetensors").unlink()
        f.push([f.adapter(0, seed=41)], channel="other")  # a plan without a01
        rep = sync(f.cfg("other"), c, model=f.model, cache_dir=cache, prune=True)
        assert "a01" not in rep.removed  # the copy's own slot: nothing of a01 recorded there
        state = json.loads((device_slot(a, cache, False) / "state.json").read_text())
        assert sorted(state["adapters"]) == ["a00", "a01"]  # the original's floors untouched
    finally:
        f.close()


def test_a_card_mounted_elsewhere_as_another_device_number_keeps_its_slot(tmp_path):
    """A removable card's st_dev can change from one mount to the next (sdb1, then sdc1) while its inodes stay: the
    same folder at another path is not a copy, so it keeps its floors (the lead, session 21)."""
    cache, a = tmp_path / "cache", tmp_path / "sd"
    for d in (a, cache):
        d.mkdir()
    slot = device_slot(a, cache, False)
    record = json.loads((slot / "folder.json").read_text())
    record.update(dev=record["dev"] + 1, path="/media/sd-before-reboot")  # the last mount: another device number
    (slot / "folder.json").write_text(json.dumps(record))
    assert device_slot(a, cache, False) == slot
    assert json.loads((slot / "folder.json").read_text())["dev"] == os.stat(a).st_dev  # the record follows it
