"""`edge sync --deadline` covers name resolution: a device whose resolver hangs (a captive portal, a dead DNS
server: glibc retries 5 s x attempts x servers, longer on some set-ups) stops at its deadline like a dripping
registry does (offline, exit 1, nothing installed) instead of blocking in ``socket.getaddrinfo``, which no socket
timeout bounds (urllib3/urllib3#1334, #3588). And a deadline that cuts a response in the middle of a header name
says so in its lines only (before, urllib3 logged a traceback to stderr as well).

The hung resolver is ``socket.getaddrinfo`` monkeypatched for one name; every connection goes to 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading

import pytest

pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("filelock", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

from test_fleetslow_deadline import _device_root  # noqa: E402

REPO = "edge/adapters"
HUNG = "registry.invalid"  # RFC 6761: never resolves anywhere, so a real lookup could not pass the test either
_BOUND = 20.0  # seconds: 20 x the deadline; before, sync waited for the resolver however long it took


def _bounded(fn):
    out = []

    def target():
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001  (handed back to the test)
            out.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(_BOUND)
    assert not t.is_alive(), f"still running after {_BOUND} s: the deadline does not cover name resolution"
    return out[0]


@pytest.fixture
def hung_resolver(monkeypatch):
    """``getaddrinfo(HUNG)`` blocks until released, then answers with ``answer`` (default: the name is unknown)."""
    real, release = socket.getaddrinfo, threading.Event()
    state = {"asked": 0, "answer": None, "returned": threading.Event()}

    def getaddrinfo(host, port, *args, **kwargs):
        if host != HUNG:
            return real(host, port, *args, **kwargs)
        state["asked"] += 1
        release.wait(120)
        try:
            if state["answer"] is None:
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            return real(state["answer"], port, *args, **kwargs)
        finally:
            state["returned"].set()

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    state["release"] = release
    yield state
    release.set()


def test_sync_stops_at_its_deadline_while_the_resolver_hangs(tmp_path, capsys, hung_resolver):
    from edge.cli import main

    root = _device_root(tmp_path)
    args = ["sync", f"{HUNG}:5000/{REPO}", "--insecure", "--tuf-root", str(root), "--adapters", str(tmp_path / "d")]
    args += ["--fingerprint", "sha256:" + "ab" * 16, "--timeout", "3", "--deadline", "1"]
    code = _bounded(lambda: main(args))  # before: blocked in getaddrinfo until the resolver gave up
    out = capsys.readouterr()
    assert code == 1 and out.out.startswith("offline:") and not out.err, out  # as a slow registry: retry later
    reason = out.out.splitlines()[1]
    assert "sync stopped at its deadline of 1 s (--deadline)" in reason, reason
    assert f"looking up and connecting to {HUNG}:5000" in reason, reason  # says where it hung
    assert hung_resolver["asked"] == 1
    assert not list((tmp_path / "d").glob("*.safetensors"))


def test_a_lookup_that_answers_after_the_deadline_leaves_no_connection_open(tmp_path, hung_resolver):
    """The abandoned lookup still finishes in its thread: the socket it then connects is closed, not leaked."""
    from edge.fleet import DeadlineExceededError, FleetConfig, sync

    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    hung_resolver["answer"] = "127.0.0.1"
    try:
        cfg = FleetConfig(
            f"{HUNG}:{server.getsockname()[1]}", REPO, tuf_root=_device_root(tmp_path), insecure=True, deadline=1
        )
        rep = _bounded(lambda: sync(cfg, tmp_path / "d", fingerprint="sha256:" + "ab" * 16))
        assert rep.status == "offline" and "deadline of 1 s" in rep.reason, rep.to_dict()
        assert issubclass(DeadlineExceededError, TimeoutError)
        hung_resolver["release"].set()  # the resolver answers now: the late thread connects, sees it was abandoned
        conn, _ = server.accept()
        conn.settimeout(10)
        assert conn.recv(1) == b""  # closed by the client, no byte sent (a leaked socket: recv times out, fails)
        conn.close()
    finally:
        server.close()


def test_a_cut_in_the_middle_of_a_header_name_is_offline_in_one_reason_no_traceback(tmp_path, capsys, caplog):
    from edge.cli import main

    server = socket.create_server(("127.0.0.1", 0))
    held = []

    def serve() -> None:  # the status line and two bytes of a header name, then silence (a stalled proxy)
        try:
            conn, _ = server.accept()
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-")
            held.append(conn)
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    root = _device_root(tmp_path)
    host = f"127.0.0.1:{server.getsockname()[1]}"
    args = ["sync", f"{host}/{REPO}", "--insecure", "--tuf-root", str(root), "--adapters", str(tmp_path / "d")]
    args += ["--fingerprint", "sha256:" + "ab" * 16, "--timeout", "5", "--deadline", "1"]
    try:
        code = _bounded(lambda: main(args))
    finally:
        server.close()
        for c in held:
            c.close()
    out = capsys.readouterr()
    assert code == 1 and out.out.startswith("offline:"), out  # before: "rejected" (an empty manifest), exit 2
    assert "sync stopped at its deadline of 1 s (--deadline)" in out.out, out.out
    assert not out.err, out.err
    logged = [r.getMessage()[:80] for r in caplog.records if r.name.startswith("urllib3")]
    assert not logged, logged  # before: "Failed to parse headers" and a traceback, on the CLI's stderr
