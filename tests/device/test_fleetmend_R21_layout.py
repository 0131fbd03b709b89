"""The sync cache's layout after the second fleet review (helper R, session 21, mending review P21 findings 1-9).

Before: a symlinked ``partial/`` or ``blobs/`` let the end-of-sync cleanup delete (and rmtree) another folder's
files; the per-folder slot was keyed by the resolved path (two devices mounted at one path shared floors, one folder
reached by two paths had two and a floor went down); the migration of the one-per-cache ``state.json`` dropped the
floor of an adapter whose file was deleted or replaced; an install deleted a blob another folder's plan wanted; a
signed adapter whose install failed could never finish offline; an own-cache device upgraded would not use its
source-less plan offline; the old ``plan.json`` was never retired; a hard link at ``partial/<sha>.part`` had the
registry's bytes appended to a file outside the cache; a lock-wait refusal printed "release None".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("oras", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("filelock", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

from _registry import SKIP_REASON, make_adapter, registry_binary  # noqa: E402
from test_fleet import Fleet  # noqa: E402

from edge.errors import ConfigError  # noqa: E402
from edge.fleet import sync  # noqa: E402
from edge.fleet.blobstore import clean  # noqa: E402
from edge.fleet.device_state import SLOT_ID, device_slot  # noqa: E402

pytestmark = pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Stable: a00 (signed), a01 (release 2); canary: another a00 (release 3)."""
    from edge.format.signing import generate_key, sign_file

    f = Fleet(tmp_path_factory.mktemp("fleetmend_r21"), n=2, nbytes=6_000)
    f.pub = generate_key(f.tmp / "team.pem")
    sign_file(f.files[0], f.tmp / "team.pem")
    f.push()
    (f.tmp / "canary").mkdir()
    f.canary_a00 = make_adapter(f.info, f.tmp / "canary" / "a00.safetensors", "a00", 6_000, 40)
    f.push([f.canary_a00], channel="canary")
    f.sha = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in f.files}
    yield f
    f.close()


def _sync(fleet, dev: Path, channel: str = "stable", cache: Path | None = None, **kw):
    return sync(fleet.cfg(channel), dev, model=fleet.model, cache_dir=cache, **kw)


def _floors(dev: Path, cache: Path) -> dict:
    state = json.loads((device_slot(dev, cache, False) / "state.json").read_text())
    return {n: e["version"] for n, e in state["adapters"].items()}


def test_symlinked_cache_folders_are_made_again_and_cleanup_reaches_nothing_through_them(fleet, tmp_path):
    dev, victim = tmp_path / "dev", tmp_path / "victim"
    assert _sync(fleet, dev).status == "updated"
    (victim / "sub").mkdir(parents=True)
    for name in ("notes.txt", "0" * 64, f"{'1' * 64}.part", "sub/keep.txt"):
        (victim / name).write_text("mine")
    for sub in ("partial", "blobs", "head"):
        shutil.rmtree(dev / ".edge-sync" / sub)
        (dev / ".edge-sync" / sub).symlink_to(victim, target_is_directory=True)
    assert _sync(fleet, dev).status == "current"  # before: notes.txt, the hex names and sub/ were deleted
    assert sorted(str(p.relative_to(victim)) for p in victim.rglob("*")) == sorted(
        ["notes.txt", "0" * 64, f"{'1' * 64}.part", "sub", "sub/keep.txt"]
    )
    for sub in ("partial", "blobs", "head"):
        assert (dev / ".edge-sync" / sub).is_dir() and not (dev / ".edge-sync" / sub).is_symlink()
    cache = tmp_path / "cache"  # a shared cache: devices/ a symlink too
    (cache / "devices").parent.mkdir()
    (cache / "devices").symlink_to(victim, target_is_directory=True)
    assert _sync(fleet, tmp_path / "two", cache=cache).status == "updated"
    assert not (cache / "devices").is_symlink() and len(os.listdir(victim)) == 4  # nothing written into it


def test_cleanup_unlinks_only_the_caches_own_names_never_a_folder(tmp_path):
    cache = tmp_path / "cache"
    (cache / "blobs").mkdir(parents=True)
    (cache / "partial" / f"{'2' * 64}.part").mkdir(parents=True)  # a folder of a cache name: left, not rmtree'd
    (cache / "partial" / f"{'2' * 64}.part" / "x").write_text("x")
    for name in ("blobs/" + "3" * 64, "blobs/" + "3" * 64 + ".sig", "blobs/" + "4" * 64, "blobs/notes.txt"):
        (cache / name).write_text("x")
    (cache / "partial" / f"{'5' * 64}.part").symlink_to(cache / "blobs" / "notes.txt")  # removed, not followed
    clean(cache, {"4" * 64})
    assert sorted(os.listdir(cache / "blobs")) == ["4" * 64, "notes.txt"]
    assert os.listdir(cache / "partial") == [f"{'2' * 64}.part"] and (cache / "blobs" / "notes.txt").read_text() == "x"
    (cache / "partial").rename(tmp_path / "elsewhere")
    (cache / "partial").symlink_to(tmp_path / "elsewhere")  # a symlink put there after prepare: not listed at all
    (tmp_path / "elsewhere" / ("6" * 64)).write_text("x")
    clean(cache, set())
    assert (tmp_path / "elsewhere" / ("6" * 64)).is_file()


def test_the_slot_is_the_folders_id_file_whatever_path_it_is_mounted_at(fleet, tmp_path):
    cache, here = tmp_path / "cache", tmp_path / "mnt"
    assert _sync(fleet, here, "canary", cache).status == "updated"  # device A, canary a00 3
    key = (here / SLOT_ID).read_text().strip()
    assert len(key) == 32 and int(key, 16) >= 0 and device_slot(here, cache, False).name == key
    here.rename(tmp_path / "sd1")  # the same card, mounted at another path: the same slot, its floor holds
    rep = _sync(fleet, tmp_path / "sd1", "stable", cache)  # before: a second slot, a00 2 installed over 3
    assert rep.status == "rejected" and "a00: release version 2 is older than the installed 3" in rep.reason, rep
    here.mkdir()  # another device's folder mounted at A's old path: its own slot
    rep = _sync(fleet, here, "stable", cache)  # before: A's floors ("a00 ... older than the installed 3")
    assert rep.status == "updated" and sorted(a["name"] for a in rep.installed) == ["a00", "a01"], rep
    assert len(os.listdir(cache / "devices")) == 2 and _floors(here, cache) == {"a00": 2, "a01": 2}
    assert _sync(fleet, here, "stable", cache, prune=True).removed == [] and (here / SLOT_ID).is_file()
    slot = device_slot(here, cache, False)  # a slot of the path-keyed layout moves to the id on first sight
    (here / SLOT_ID).unlink()
    slot.rename(cache / "devices" / hashlib.sha256(str(here.resolve()).encode()).hexdigest()[:16])
    assert _sync(fleet, here, "stable", cache).status == "current"
    assert len(os.listdir(cache / "devices")) == 2 and _floors(here, cache) == {"a00": 2, "a01": 2}
    (here / SLOT_ID).write_text("../../etc\n")
    with pytest.raises(ConfigError, match=r"holds '../../etc', not the 32 or 64 lowercase hex digits"):
        _sync(fleet, here, "stable", cache)


def test_migrating_the_one_per_cache_state_keeps_floors_and_retires_the_old_files(fleet, tmp_path):
    cache, dev, other = tmp_path / "cache", tmp_path / "dev", tmp_path / "other"
    assert _sync(fleet, dev, "canary", cache).status == "updated"
    assert _sync(fleet, other, "stable", cache).status == "updated"
    legacy = {"adapters": {"a00": {"sha256": "7" * 64, "length": 9, "version": 3}}}  # the old shared state
    legacy["adapters"]["a01"] = {"sha256": "8" * 64, "length": 9, "version": 5}
    (cache / "state.json").write_text(json.dumps(legacy))
    (cache / "plan.json").write_text(json.dumps({"release": 1, "targets": {}}))
    (cache / "blobs" / ("9" * 64)).write_text("only the old plan wanted it")
    shutil.rmtree(device_slot(dev, cache, False))
    (dev / "a00.safetensors").unlink()
    (dev / "a01.safetensors").write_text("replaced")
    theirs = device_slot(other, cache, False) / "plan.json"
    theirs.write_text('{"release": "from a newer edge"}')  # another folder's file: read, never moved aside
    rep = _sync(fleet, dev, "stable", cache)  # before: floors dropped, a00 2 installed over the old 3
    assert rep.status == "rejected" and "a00: release version 2 is older than the installed 3" not in rep.reason
    assert "a01: release version 2 is older than the installed 5" in rep.reason, rep  # a file there: any bytes
    assert _floors(dev, cache) == {"a00": 2, "a01": 5}  # a00 gone, another slot exists: the cache was shared
    assert not (cache / "state.json").exists() and (cache / "state.json.migrated").is_file()
    assert not (cache / "plan.json").exists() and not (cache / "blobs" / ("9" * 64)).exists()
    assert (
        theirs.read_text() == '{"release": "from a newer edge"}'
        and not theirs.with_name("plan.json.unreadable").exists()
    )


def test_an_install_keeps_the_blob_another_folders_plan_wants_and_a_signed_one_finishes_offline(fleet, tmp_path):
    cache, one, two = tmp_path / "cache", tmp_path / "one", tmp_path / "two"
    (two / "a00.safetensors").mkdir(parents=True)  # two's install of a00 fails: its blob and signature are kept
    rep = _sync(fleet, two, cache=cache)
    assert [x["name"] for x in rep.failed] == ["a00"] and rep.installed[0]["name"] == "a01", rep
    assert _sync(fleet, one, cache=cache).status == "updated"  # before: deleted the blob two still wants
    assert (cache / "blobs" / fleet.sha["a00"]).is_file()
    own = tmp_path / "own"
    (own / "a00.safetensors").mkdir(parents=True)
    assert [x["name"] for x in _sync(fleet, own).failed] == ["a00"]
    (two / "a00.safetensors").rmdir()
    (own / "a00.safetensors").rmdir()
    fleet.reg.stop()
    try:
        for dev, kw in ((two, {"cache": cache}), (own, {})):
            rep = _sync(fleet, dev, **kw)  # before: "a00 (signature): not in the cache and the registry is ..."
            assert rep.status == "offline" and [a["name"] for a in rep.installed] == ["a00"], rep
            assert (dev / "a00.safetensors").read_bytes() == fleet.files[0].read_bytes()
            assert (dev / "a00.safetensors.sig").is_file()
    finally:
        fleet.reg.start()
    rep = _sync(fleet, own, trusted_keys=[fleet.pub])  # before: the signature downloaded again
    assert rep.status == "current" and rep.bytes_adapters == 0, rep


def test_an_own_cache_completes_its_source_less_plan_offline(fleet, tmp_path):
    dev = tmp_path / "dev"
    assert _sync(fleet, dev).status == "updated"
    plan = json.loads((dev / ".edge-sync" / "plan.json").read_text())
    (dev / ".edge-sync" / "plan.json").write_text(json.dumps({k: v for k, v in plan.items() if k != "source"}))
    fleet.reg.stop()
    try:
        rep = _sync(fleet, dev)  # before: "from before sync recorded its source ...", release None
        assert rep.status == "offline" and rep.release == plan["release"] and rep.unchanged == ["a00", "a01"], rep
        rep = _sync(fleet, dev, "canary")  # targets of another channel: still refused
        assert rep.release is None and "from before sync recorded its source" in rep.reason, rep
    finally:
        fleet.reg.start()


def test_a_hard_link_at_a_partial_download_is_replaced_not_appended_to(fleet, tmp_path):
    dev, victim = tmp_path / "dev", tmp_path / "victim.txt"
    victim.write_bytes(b"sixteen bytes!!\n")
    (dev / ".edge-sync" / "partial").mkdir(parents=True)
    os.link(victim, dev / ".edge-sync" / "partial" / f"{fleet.sha['a01']}.part")
    rep = _sync(fleet, dev)
    assert rep.status == "updated", rep  # before: the registry's bytes appended to victim.txt
    assert victim.read_bytes() == b"sixteen bytes!!\n"
    assert (dev / "a01.safetensors").read_bytes() == fleet.files[1].read_bytes()


def test_a_lock_wait_refusal_prints_no_release_none(monkeypatch, capsys, tmp_path):
    import edge.fleet
    from edge.commands import sync as cmd
    from edge.fleet.device import SyncReport

    rep = SyncReport(status="offline", reason="another sync is running (it holds x); try again later")
    monkeypatch.setattr(edge.fleet, "sync", lambda *a, **kw: rep)
    args = argparse.Namespace(
        device=None, reference="127.0.0.1:9/edge/adapters", tuf_root=tmp_path / "root.json", channel="stable",
        insecure=True, trusted_keys=None, deadline=None, timeout=5, adapters=tmp_path, fingerprint=None,
        model=None, cache=None, prune=False, create_parents=False, json=False, devices_dir=None,
    )  # fmt: skip
    assert cmd.run(args) == 1
    out = capsys.readouterr().out
    assert out.startswith("offline: no verified release, 0 installed") and "None" not in out, out
