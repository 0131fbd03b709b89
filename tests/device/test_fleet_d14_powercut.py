"""Power cuts on storage that reorders or drops writes (helper D, session 14): what a device keeps of its sync state
and of TUF's trusted metadata, and what it rebuilds from the files still on disk.

A power cut is simulated by tearing files (zeros, truncation), never by killing a process this test did not start.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("oras", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("filelock", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

from _registry import SKIP_REASON, LocalRegistry, registry_binary  # noqa: E402
from test_fleet import Fleet  # noqa: E402

from edge.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path, n=2, nbytes=6_000)
    yield f
    f.close()


def _tear(*paths: Path) -> None:
    for p in paths:
        p.write_bytes(b"\0" * p.stat().st_size)


def _cache(fleet, device: str = "dev") -> Path:
    return fleet.tmp / device / ".edge-sync"


def _tuf_files(cache: Path) -> list[Path]:
    """TUF's trusted metadata but the root chain (timestamp, snapshot, targets, bins)."""
    return [p for p in (cache / "tuf").glob("*.json") if p.is_file() and not p.is_symlink()]


def _mirror_then_newer_a01(fleet, tmp_path) -> Path:
    """Release 2 (a00, a01) copied to a mirror that stops syncing there; release 3 changes a01; ``dev`` installs it."""
    fleet.push()
    mirror = fleet.reg.copy_storage(tmp_path / "mirror")
    fleet.push([fleet.adapter(1, seed=41)])
    assert fleet.sync("dev").status == "updated"
    return mirror


def _floor(fleet, device: str = "dev") -> dict[str, int]:
    state = json.loads((_cache(fleet, device) / "state.json").read_text())
    return {name: entry["version"] for name, entry in state["adapters"].items()}


def test_a_torn_state_and_trusted_metadata_rebuild_the_floor_from_the_plan_and_a_stale_mirror_is_refused(
    fleet, tmp_path
):
    """Before: the torn state was set aside and rebuilt empty, TUF (its own metadata torn too) took the mirror's
    older release as a first sync would, and the older a01 replaced the newer one: a downgrade."""
    mirror_root = _mirror_then_newer_a01(fleet, tmp_path)
    newest = fleet.installed("dev")
    assert _floor(fleet) == {"a00": 2, "a01": 3}
    cache = _cache(fleet)
    _tear(cache / "state.json", *_tuf_files(cache))  # plan.json survived
    with LocalRegistry(mirror_root) as mirror:
        rep = fleet.sync("dev", host=mirror.host)
    assert rep.status == "rejected" and [x["name"] for x in rep.refused] == ["a01"], rep.to_dict()
    assert "older than the installed 3" in rep.refused[0]["reason"]
    assert fleet.installed("dev") == newest
    assert _floor(fleet) == {"a00": 2, "a01": 3}  # kept on disk: the mirror's plan proves nothing about a01
    rep = fleet.sync("dev")  # the real registry again
    assert rep.status == "current" and rep.bytes_adapters == 0, rep.to_dict()


def test_a_torn_state_and_plan_rebuild_the_floor_from_tufs_trusted_metadata_without_downloading_again(fleet, tmp_path):
    """Before: every installed adapter was downloaded and written again (status updated), the floor unknown."""
    _mirror_then_newer_a01(fleet, tmp_path)
    cache = _cache(fleet)
    _tear(cache / "state.json", cache / "plan.json")
    rep = fleet.sync("dev")
    assert rep.status == "current" and rep.bytes_adapters == 0 and sorted(rep.unchanged) == ["a00", "a01"], (
        rep.to_dict()
    )
    assert _floor(fleet) == {"a00": 2, "a01": 3}
    fleet.assert_loadable("dev")


def test_an_installed_file_no_verified_metadata_names_gets_no_floor_and_is_downloaded_again(fleet, tmp_path):
    _mirror_then_newer_a01(fleet, tmp_path)
    cache = _cache(fleet)
    (fleet.tmp / "dev" / "a00.safetensors").write_bytes(fleet.files[1].read_bytes())  # bytes of another adapter
    _tear(cache / "state.json", cache / "plan.json")
    rep = fleet.sync("dev")
    assert rep.status == "updated" and [a["name"] for a in rep.installed] == ["a00"], rep.to_dict()
    assert fleet.installed("dev")["a00"] == fleet.files[0].read_bytes()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an fsynced descriptor through /proc (Linux)")
def test_every_file_tuf_persists_is_fsynced_with_its_folder(fleet, monkeypatch):
    """python-tuf 7 writes its trusted metadata to a temp file and renames it, with no fsync: on storage that
    reorders writes a power cut can leave the trusted timestamp or root empty. Before: none of them was fsynced."""
    fleet.push()
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):  # a temp file fsynced, then renamed, counts as its final name
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        m = re.match(r"^\.(.+)\.\d+\.[a-z0-9_]{8}\.tmp$", path.name)
        synced.append(str(path.with_name(m.group(1)) if m else path))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fleet.sync("dev")
    tuf = _cache(fleet) / "tuf"
    written = {str(p.resolve()) for p in tuf.rglob("*.json") if p.is_file() and not p.is_symlink()}
    assert written and len(written) > 5
    assert written <= set(synced), sorted(written - set(synced))
    assert str(tuf.resolve()) in synced and str((tuf / "root_history").resolve()) in synced


@pytest.mark.parametrize("torn", [b"", b'{"signed": {"_type": "root", "spec_ver'])
def test_a_torn_trusted_root_given_to_sync_is_a_config_error_naming_the_file_and_the_fix(fleet, tmp_path, torn):
    """Before: ngclient's DeserializationError became a *rejected release* ("TUF verification failed"), as if the
    registry had been tampered with."""
    fleet.push()
    root = tmp_path / "device-root.json"
    root.write_bytes(torn)
    cfg = fleet.cfg()
    cfg = type(cfg)(cfg.registry, cfg.repository, cfg.channel, root, insecure=True, timeout=5)
    from edge.fleet import sync

    with pytest.raises(ConfigError, match="device-root.json") as e:
        sync(cfg, fleet.tmp / "dev", model=fleet.model)
    assert "release init" in str(e.value) and len(str(e.value).splitlines()) == 1


def test_a_torn_root_learnt_from_a_rotation_is_fetched_again(fleet, tmp_path):
    from edge.fleet import rotate_keys, sync

    fleet.push()
    shipped = tmp_path / "shipped-root.json"  # the root the device was installed with: version 1
    shipped.write_bytes((fleet.tmp / "tuf" / "root.json").read_bytes())
    base = fleet.cfg()
    cfg = type(base)(base.registry, base.repository, base.channel, shipped, insecure=True, timeout=5)
    assert sync(cfg, fleet.tmp / "dev", model=fleet.model).status == "updated"
    rotate_keys(fleet.reg.host, "edge/adapters", fleet.tmp / "tuf", fleet.tmp / "keys", ["root"], insecure=True)
    assert sync(cfg, fleet.tmp / "dev", model=fleet.model).status == "current"  # learns root 2 from the registry
    history = _cache(fleet) / "tuf" / "root_history"
    data = {p: p.read_bytes() for p in (history / "1.root.json", history / "2.root.json")}
    for p in data:
        p.write_bytes(b"")  # zero-length: the rename reached the disk, the data did not
    assert sync(cfg, fleet.tmp / "dev", model=fleet.model).status == "current"
    assert {p: p.read_bytes() for p in data} == data  # 1 from the shipped root, 2 from the registry again


def test_a_timestamp_given_as_the_root_is_named_too(fleet):
    from edge.fleet.device_state import check_root

    fleet.push()
    ts = fleet.tmp / "tuf" / "timestamp.json"
    with pytest.raises(ConfigError, match="is timestamp metadata, not root"):
        check_root(ts.read_bytes(), ts)


def test_a_python_tuf_without_the_persist_hook_is_refused_not_run_without_fsync(monkeypatch):
    """No silent fallback to ngclient's own writes (no fsync) if a python-tuf release renames its writer."""
    from tuf.ngclient import Updater

    from edge.fleet import FleetError, device_state

    monkeypatch.setattr(device_state, "_DURABLE", None)
    monkeypatch.delattr(Updater, "_persist_file")
    with pytest.raises(FleetError, match="no longer writes its metadata through Updater._persist_file"):
        device_state.durable_updater()
