"""Sync's own files holding JSON of another shape (review N, session 16).

``plan.json`` is read bounded and depth-limited since cab8b6f, but its shape was not checked: with the registry
down, a plan holding ``[1]``, an ``expires`` that is a number or a date without a time zone, or a target without its
``sha256`` stopped ``edge sync`` with a bare TypeError/KeyError (``list indices must be integers``, ``fromisoformat:
argument must be str``, ``can't compare offset-naive and offset-aware datetimes``). Now it is moved aside as torn
bytes are, and the offline sync says it has no verified release; the plan the sync wrote is still used offline.
Likewise a ``state.json`` whose adapter entry is a number, lacks its ``sha256`` or has a string ``version`` stopped
every sync (registry up) with a bare TypeError/KeyError: it is now set aside and rebuilt from the disk's proofs.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("oras", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("filelock", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

from _registry import SKIP_REASON, registry_binary  # noqa: E402
from test_fleet import Fleet  # noqa: E402

from edge.fleet.device_files import read_plan, sane_state  # noqa: E402

pytestmark = pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)


def _bad_plans(good: dict) -> dict[str, object]:
    name = next(iter(good["targets"]))
    no_sha = {k: v for k, v in good["targets"][name].items() if k != "sha256"}
    bad_sig = {**good["targets"][name], "sig": "x"}
    return {
        "a list": [1],
        "a string": "plan",
        "expires a number": {**good, "expires": 5},
        "expires without a time zone": {**good, "expires": "2999-01-01T00:00:00"},
        "expires no date": {**good, "expires": "soon"},
        "release a bool": {**good, "release": True},
        "targets a list": {**good, "targets": [1]},
        "a target without sha256": {**good, "targets": {name: no_sha}},
        "a signature no object": {**good, "targets": {name: bad_sig}},
    }


def test_an_offline_sync_with_a_plan_of_another_shape_has_no_verified_release(tmp_path):
    fleet = Fleet(tmp_path, n=1, nbytes=6_000)
    try:
        fleet.push()
        assert fleet.sync("dev").status == "updated"
        cache = tmp_path / "dev" / ".edge-sync"
        good = json.loads((cache / "plan.json").read_text())
        assert read_plan(cache / "plan.json") == good  # what sync writes is a plan
        fleet.reg.stop()
        for what, body in _bad_plans(good).items():
            (cache / "plan.json").write_text(json.dumps(body))
            rep = fleet.sync("dev")
            assert rep.status == "offline" and not rep.installed, (what, rep.to_dict())
            assert rep.reason.endswith("no verified release in the cache yet"), (what, rep.reason)
            assert not (cache / "plan.json").exists() and (cache / "plan.json.unreadable").is_file(), what
        (cache / "plan.json").write_text(json.dumps(good))
        rep = fleet.sync("dev")
        assert rep.status == "offline" and rep.release == good["release"] and rep.unchanged == ["a00"], rep.to_dict()
        fleet.assert_loadable("dev")
    finally:
        fleet.close()


def test_a_state_whose_adapter_entries_are_of_another_shape_is_set_aside_and_rebuilt(tmp_path):
    fleet = Fleet(tmp_path, n=1, nbytes=6_000)
    try:
        fleet.push()
        assert fleet.sync("dev").status == "updated"
        state = tmp_path / "dev" / ".edge-sync" / "state.json"
        good = json.loads(state.read_text())
        entry = good["adapters"]["a00"]
        assert sane_state(good, state) and state.is_file()  # what sync writes is a state
        bad = {
            "a number": 5,
            "no sha256": {k: v for k, v in entry.items() if k != "sha256"},
            "version a string": {**entry, "version": "2"},
            "length a bool": {**entry, "length": True},
            "stamp a string": {**entry, "stamp": "x"},
        }
        for what, body in bad.items():
            state.write_text(json.dumps({**good, "adapters": {"a00": body}}))
            rep = fleet.sync("dev")
            assert rep.status == "current" and rep.unchanged == ["a00"] and not rep.installed, (what, rep.to_dict())
            assert (state.parent / "state.json.unreadable").is_file(), what
            assert json.loads(state.read_text())["adapters"]["a00"]["version"] == entry["version"], what
        fleet.assert_loadable("dev")
    finally:
        fleet.close()
