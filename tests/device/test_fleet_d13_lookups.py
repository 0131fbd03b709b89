"""A device process that runs `sync()` every minute for months against a name server that never answers: each sync
stops at its deadline (test_fleetdns_deadline), and the threads its lookups leave behind stay bounded (before, one
more thread blocked in ``getaddrinfo`` per sync, each for minutes); and deadlines nobody closed leave nothing on
urllib3's logger and no timer thread (before, one filter per deadline stacked up, and a timer lived to its end).

The dead resolver is ``socket.getaddrinfo`` monkeypatched to block on an Event for ``*.invalid`` names; every
connection goes to 127.0.0.1.
"""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time

import pytest

pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("filelock", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

import requests  # noqa: E402  (an oras dependency)
from _registry import SKIP_REASON, registry_binary  # noqa: E402
from test_fleetslow_deadline import _device_root  # noqa: E402

from edge.fleet import FleetConfig, sync  # noqa: E402
from edge.fleet.deadline import MAX_LOOKUPS, Deadline, mount  # noqa: E402

REPO = "edge/adapters"
FP = "sha256:" + "ab" * 16


def _connect_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("edge-connect-")]


def _join(threads, seconds: float = 20.0) -> None:
    end = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    assert not [t.name for t in threads if t.is_alive()], "connection threads still running after the resolver answered"


@pytest.fixture
def dead_resolver(monkeypatch):
    """``getaddrinfo("*.invalid")`` blocks until ``release`` is set, then answers ``answer`` (None: unknown name)."""
    _join(_connect_threads())  # none left by another test: their slots would count here
    real, release = socket.getaddrinfo, threading.Event()
    state = {"asked": [], "answer": None, "release": release}

    def getaddrinfo(host, port, *args, **kwargs):
        if not str(host).endswith(".invalid"):
            return real(host, port, *args, **kwargs)
        state["asked"].append(host)
        release.wait(120)
        if state["answer"] is None:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(state["answer"], port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield state
    release.set()
    _join(_connect_threads())


@pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)
def test_syncs_against_a_dead_resolver_hold_one_lookup_thread_and_the_first_after_it_answers_installs(
    tmp_path, dead_resolver
):
    from test_fleet import Fleet

    fleet = Fleet(tmp_path, n=2, nbytes=6_000)
    try:
        fleet.push()
        port = fleet.reg.host.rsplit(":", 1)[1]
        root = fleet.tmp / "tuf" / "root.json"

        def cfg(deadline: float) -> FleetConfig:
            return FleetConfig(f"registry.invalid:{port}", REPO, "stable", root, insecure=True, deadline=deadline)

        for i in range(6):  # a sync a minute, the name server dead
            rep = sync(cfg(0.3), fleet.tmp / "dev", model=fleet.model)
            assert rep.status == "offline" and "deadline of 0.3 s" in rep.reason, rep.to_dict()
            if i:  # the later ones wait for the first lookup instead of starting their own
                assert "waiting for the name lookup of registry.invalid:" in rep.reason, rep.reason
        assert len(_connect_threads()) == 1  # before: 6, each blocked until the resolver gave up
        assert dead_resolver["asked"] == ["registry.invalid"]
        assert not fleet.installed("dev")

        out: list = []  # a sync with time to spare waits on the pending lookup, within its own deadline
        waiting = threading.Thread(target=lambda: out.append(sync(cfg(60), fleet.tmp / "dev", model=fleet.model)))
        waiting.start()
        dead_resolver["answer"] = "127.0.0.1"
        dead_resolver["release"].set()  # the name server answers again
        waiting.join(60)
        assert not waiting.is_alive() and out, "the sync waiting on the lookup never finished"
        assert out[0].status == "updated" and not out[0].failed, out[0].to_dict()
        assert fleet.installed("dev") == {p.stem: p.read_bytes() for p in fleet.files}
        assert sync(cfg(60), fleet.tmp / "dev", model=fleet.model).status == "current"
    finally:
        fleet.close()


def test_past_max_lookups_hung_hosts_a_sync_is_offline_at_once_and_says_why(tmp_path, dead_resolver):
    root = _device_root(tmp_path)
    hosts = [f"h{i}.invalid" for i in range(MAX_LOOKUPS + 2)]
    reports = []
    for h in hosts:  # e.g. registries behind names of their own, mirrors, a CDN: every lookup hangs
        cfg = FleetConfig(f"{h}:5000", REPO, tuf_root=root, insecure=True, deadline=0.3)
        reports.append(sync(cfg, tmp_path / "d", fingerprint=FP))
    assert all(r.status == "offline" for r in reports), [r.to_dict() for r in reports]
    assert dead_resolver["asked"] == hosts[:MAX_LOOKUPS]  # the last two never reached the resolver
    assert len(_connect_threads()) == MAX_LOOKUPS  # before: one more per sync
    for r in reports[MAX_LOOKUPS:]:
        assert "deadline" not in r.reason and "still waiting for the name server" in r.reason, r.reason
        assert f"({MAX_LOOKUPS})" in r.reason and "check the device's DNS" in r.reason, r.reason
    dead_resolver["release"].set()  # the name server fails fast now: every slot frees
    _join(_connect_threads())
    cfg = FleetConfig(f"{hosts[-1]}:5000", REPO, tuf_root=root, insecure=True, deadline=5)
    rep = sync(cfg, tmp_path / "d", fingerprint=FP)
    assert rep.status == "offline" and "Temporary failure in name resolution" in rep.reason, rep.reason
    assert dead_resolver["asked"][-1] == hosts[-1]  # looked up this time


def test_deadlines_never_closed_leave_no_filter_and_no_timer_behind():
    logger = logging.getLogger("urllib3.connection")
    filters = len(logger.filters)
    gc.collect()
    timers = {t for t in threading.enumerate() if isinstance(t, threading.Timer)}
    for _ in range(20):  # a caller that mounts sessions on deadlines and never closes them
        mount(requests.Session(), Deadline(300))
    assert len(logger.filters) <= filters + 1  # before: 20 more, one per deadline, each kept until close()
    gc.collect()  # the deadlines are garbage: their timers are cancelled
    _join([t for t in threading.enumerate() if isinstance(t, threading.Timer) and t not in timers], 10)

    cut = logging.LogRecord("urllib3.connection", logging.WARNING, __file__, 1, "Failed to parse headers", (), None)
    other = logging.LogRecord("urllib3.connection", logging.WARNING, __file__, 1, "Something else", (), None)
    with Deadline(0.05) as d:
        mount(requests.Session(), d)
        time.sleep(0.1)
        assert d.expired and not logger.filter(cut) and logger.filter(other)  # the cut is this deadline's to say
    assert logger.filter(cut)  # closed: urllib3's warnings pass again
