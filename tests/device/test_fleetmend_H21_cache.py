"""Devices sharing one ``--cache`` (helper H, session 21, mending review E21 findings 1 and 2).

Before: ``plan.json`` and ``state.json`` were one per cache. An offline sync completed whichever device's plan was
written last (a canary device installed the stable channel's adapters), a device whose channel changed while
offline completed the old channel's plan, the version floors of one device refused another's older release
forever, ``--prune`` removed another device's entries, and the final cleanup deleted another device's resumable
partial downloads. Now each adapter folder keeps its plan and state in ``<cache>/devices/<key>/``, the plan records
its source (registry, repository, channel, fingerprint, adapter folder), and a cached plan of another source is
ignored with the reason said. A ``state.json`` of the old layout is migrated: each folder takes the floors its own
installed files prove.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("oras", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("filelock", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

from _registry import SKIP_REASON, registry_binary  # noqa: E402
from test_fleet import Fleet  # noqa: E402

from edge.fleet import sync  # noqa: E402
from edge.fleet.device_state import device_slot  # noqa: E402

pytestmark = pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)
DEAD = "127.0.0.1:9"  # discard port: nothing listens, the registry is unreachable


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Stable publishes a00, a01, a02 (release 2); canary publishes another a00 (release 3)."""
    f = Fleet(tmp_path_factory.mktemp("fleetmend_cache"), n=3, nbytes=6_000)
    f.push()
    f.canary_a00 = f.adapter(0, seed=40)
    f.push([f.canary_a00], channel="canary")
    yield f
    f.close()


def _sync(fleet, dev: Path, channel: str, cache: Path, host: str | None = None, **kw):
    return sync(fleet.cfg(channel, host), dev, model=fleet.model, cache_dir=cache, **kw)


def _state(dev: Path, cache: Path) -> dict:
    return json.loads((device_slot(dev, cache, False) / "state.json").read_text())


def test_devices_sharing_a_cache_keep_their_own_floors_prune_plan_and_offline_source(fleet, tmp_path):
    cache, canary, stable = tmp_path / "cache", tmp_path / "canary", tmp_path / "stable"
    assert _sync(fleet, canary, "canary", cache).status == "updated"
    rep = _sync(fleet, stable, "stable", cache)  # before: "a00: release version 2 is older than the installed 3"
    assert rep.status == "updated" and sorted(a["name"] for a in rep.installed) == ["a00", "a01", "a02"], rep
    assert {n: e["version"] for n, e in _state(stable, cache)["adapters"].items()} == {"a00": 2, "a01": 2, "a02": 2}
    assert {n: e["version"] for n, e in _state(canary, cache)["adapters"].items()} == {"a00": 3}
    assert not (cache / "state.json").exists() and not (cache / "plan.json").exists()
    plan = json.loads((device_slot(canary, cache, False) / "plan.json").read_text())
    assert plan["source"] == {
        "registry": fleet.reg.host,
        "repository": "edge/adapters",
        "channel": "canary",
        "fingerprint": fleet.info.fingerprint,
        "adapters": str(canary.resolve()),
    }
    rep = _sync(fleet, canary, "canary", cache, prune=True)  # before: "removed a01, a02", the stable device's
    assert rep.status == "current" and rep.removed == [], rep
    assert _sync(fleet, stable, "stable", cache).status == "current"  # before: downloaded and installed again
    (stable / "a01.safetensors").unlink()
    fleet.reg.stop()  # the registry unreachable, its host unchanged (the plan's source names it)
    try:
        # the stable device synced last: before, the canary device completed the stable plan (3 installed)
        rep = _sync(fleet, canary, "canary", cache)
        assert rep.status == "offline" and rep.installed == [] and rep.unchanged == ["a00"], rep
        assert sorted(p.name for p in canary.glob("*.safetensors")) == ["a00.safetensors"]
        assert (canary / "a00.safetensors").read_bytes() == fleet.canary_a00.read_bytes()
        # another channel while offline (the device's profile changed): the cached stable plan is not completed
        rep = _sync(fleet, stable, "canary", cache)
        assert rep.status == "offline" and rep.installed == [] and rep.unchanged == [], rep
        assert "the cached release is for channel 'stable', not this sync's 'canary', nothing installed" in rep.reason
        rep = _sync(fleet, stable, "stable", cache, host=DEAD)  # another registry: the same
        assert rep.status == "offline" and rep.installed == [] and "the cached release is for registry" in rep.reason
        rep = _sync(fleet, stable, "stable", cache)  # its own source: completed from the cache (a01's blob is gone)
        assert rep.status == "offline" and [a["name"] for a in rep.failed] == ["a01"], rep
        assert sorted(rep.unchanged) == ["a00", "a02"], rep
    finally:
        fleet.reg.start()


def test_a_sync_keeps_the_partial_downloads_another_device_sharing_the_cache_still_wants(fleet, tmp_path):
    cache, one, two = tmp_path / "cache", tmp_path / "one", tmp_path / "two"
    assert _sync(fleet, one, "stable", cache).status == "updated"
    assert _sync(fleet, two, "canary", cache).status == "updated"
    sha = json.loads((device_slot(one, cache, False) / "plan.json").read_text())["targets"]["a01"]["sha256"]
    (cache / "partial" / f"{sha}.part").write_bytes(b"x" * 100)  # one's download of a01, cut
    (cache / "partial" / f"{'0' * 64}.part").write_bytes(b"y")  # no plan wants it
    assert _sync(fleet, two, "canary", cache).status == "current"
    assert sorted(p.name for p in (cache / "partial").iterdir()) == [f"{sha}.part"]  # before: both deleted


def test_a_state_of_the_one_per_cache_layout_is_migrated_per_folder_by_the_files_it_proves(fleet, tmp_path):
    cache, canary, stable = tmp_path / "cache", tmp_path / "canary", tmp_path / "stable"
    assert _sync(fleet, canary, "canary", cache).status == "updated"
    assert _sync(fleet, stable, "stable", cache).status == "updated"
    old = {"adapters": _state(canary, cache)["adapters"] | {"a01": _state(stable, cache)["adapters"]["a01"]}}
    old["adapters"]["a00"] = old["adapters"]["a00"] | {"version": 7}  # as the one shared state.json held them
    for dev in (canary, stable):
        shutil.rmtree(device_slot(dev, cache, False))
    (cache / "state.json").write_text(json.dumps(old))
    assert _sync(fleet, canary, "canary", cache).status == "current"
    # the first folder to migrate (no other slot yet: the old cache may have had one device) keeps every old floor
    assert {n: e["version"] for n, e in _state(canary, cache)["adapters"].items()} == {"a00": 7}
    assert _state(canary, cache)["floors"] == {
        "a01": {"version": 2, "fingerprint": old["adapters"]["a01"]["fingerprint"]}
    }
    assert not (cache / "state.json").exists() and (cache / "state.json.migrated").is_file()  # R21 #8: retired
    # R21 #4: its a00 file (other bytes) keeps the old floor 7 (HEAD refused a00 2 here): never lowered by migrating
    assert _sync(fleet, stable, "stable", cache).status == "current"
    got = {n: e["version"] for n, e in _state(stable, cache)["adapters"].items()}
    assert got == {"a00": 7, "a01": 2, "a02": 2}, got
