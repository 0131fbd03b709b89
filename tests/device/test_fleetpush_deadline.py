"""`edge push` and `edge release` under a total ``--deadline``: a registry that answers every request just under
``--timeout`` (dripping its headers, a byte every fraction of a second) never trips the per-read timeout, and a push
of many blobs took as long as the registry pleased. Now it stops at its deadline with one line (exit 2), and the
registry holds no tag naming a partial upload: blobs go first, each manifest after its blobs, the TUF head last, so
devices keep the previous release; the same push run again (no proxy) publishes it.

A real registry (CNCF distribution, ``test_fleet.Fleet``) behind a dripping proxy on 127.0.0.1 (the drip of
``test_fleetslow_deadline``, extended to every method a push uses).
"""

from __future__ import annotations

from http.server import ThreadingHTTPServer

import pytest

pytest.importorskip("oras", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("filelock", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

import requests  # noqa: E402
from _registry import SKIP_REASON, registry_binary  # noqa: E402
from test_fleetslow_deadline import _bounded, _DripHandler  # noqa: E402

from edge.fleet.oci import MEDIA, release_tag  # noqa: E402

pytestmark = pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)
REPO = "edge/adapters"
_PAD = 4  # bytes of padding header dripped before each slow answer (one per _GAP = 0.2 s: 0.8 s a request)


class _SlowRegistry(ThreadingHTTPServer):
    """Forwards every request to ``upstream``; answers those whose path contains ``slow`` after dripping a few
    header bytes, each well inside any read timeout (counted in ``dripped``), or with ``hold``, never (the registry
    took the request; its answer is lost on the way back: counted in ``held``)."""

    daemon_threads = True

    def __init__(self, upstream: str, slow: str, hold: bool = False):
        import threading

        super().__init__(("127.0.0.1", 0), _SlowHandler)
        self.upstream, self.slow, self.hold = upstream, slow, hold
        self.dripped, self.held, self.stop = 0, 0, threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


class _SlowHandler(_DripHandler):
    server: _SlowRegistry

    def _any(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "content-length")}
        r = requests.request(  # Host passes through: the registry's upload Locations name this proxy
            self.command, f"http://{self.server.upstream}{self.path}", headers=headers, data=body, timeout=10
        )
        if self.server.hold and self.server.slow in self.path:
            self.server.held += 1
            self.server.stop.wait(60)
            return
        try:
            self.wfile.write(f"HTTP/1.1 {r.status_code} {r.reason}\r\n".encode())
            if self.server.slow in self.path:
                self._drip(b"X-Slow: " + b"." * _PAD)
                self.wfile.write(b"\r\n")
            for k, v in r.headers.items():
                if k.lower() not in ("connection", "transfer-encoding", "content-length", "content-encoding"):
                    self.wfile.write(f"{k}: {v}\r\n".encode())
            length = r.headers.get("Content-Length", "0") if self.command == "HEAD" else str(len(r.content))
            self.wfile.write(f"Content-Length: {length}\r\n\r\n".encode())
            if self.command != "HEAD":
                self.wfile.write(r.content)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what the deadline is for

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any  # noqa: N815  (http.server's names)


@pytest.fixture
def fleet(tmp_path):
    from test_fleet import Fleet

    f = Fleet(tmp_path, n=3, nbytes=4_000, bits=1)
    yield f
    f.close()


def _tags_are_whole(host: str) -> dict[str, str]:
    """Every tag in the fleet's repositories names a manifest whose blobs (config, layers) the registry has."""
    seen = {}
    for repo in (REPO, f"{REPO}/tuf"):
        tags = requests.get(f"http://{host}/v2/{repo}/tags/list", timeout=5).json().get("tags") or []
        for tag in tags:
            r = requests.get(
                f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": MEDIA["manifest"]}, timeout=5
            )
            assert r.status_code == 200, (repo, tag, r.status_code)
            m = r.json()
            for desc in [m["config"], *m.get("layers", [])]:
                blob = requests.head(f"http://{host}/v2/{repo}/blobs/{desc['digest']}", timeout=5)
                assert blob.status_code == 200, f"{repo}:{tag} names {desc['digest']}, which is not in the registry"
            seen[f"{repo}:{tag}"] = r.headers["Docker-Content-Digest"]
    return seen


@pytest.mark.parametrize(
    "slow", [f"/v2/{REPO}/blobs/", f"/v2/{REPO}/tuf/"], ids=["cut-in-the-adapter-blobs", "cut-in-the-tuf-metadata"]
)
def test_a_push_to_a_dripping_registry_stops_at_its_deadline_and_devices_keep_the_last_release(fleet, capsys, slow):
    from edge.cli import main

    fleet.push()
    assert fleet.sync("dev").status == "updated"
    before = fleet.installed("dev")
    before_tags = _tags_are_whole(fleet.reg.host)
    fleet.files = [fleet.adapter(i, seed=20 + i) for i in range(3)]  # a new version of every adapter
    proxy = _SlowRegistry(fleet.reg.host, slow)
    try:
        args = ["push", f"{proxy.host}/{REPO}", *map(str, fleet.files), "--model", str(fleet.model), "--insecure"]
        args += ["--tuf-dir", str(fleet.tmp / "tuf"), "--keys", str(fleet.tmp / "keys"), "--timeout", "3"]
        code = _bounded(lambda: main([*args, "--deadline", "2"]))  # before: every request slow, none timed out
    finally:
        proxy.close()
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "push stopped at its deadline of 2 s (--deadline)" in err, err
    assert "devices still see what was published before" in err, err
    assert proxy.dripped > 0  # cut while the registry dripped
    tags = _tags_are_whole(fleet.reg.host)  # no tag names a blob the cut left unfinished
    head = f"{REPO}/tuf:timestamp.json"
    assert tags[head] == before_tags[head]  # the TUF head, the release's last step, did not move
    release = f"{REPO}:{release_tag('stable', fleet.info.fingerprint)}"  # moved only if cut after the adapters:
    assert (tags[release] != before_tags[release]) == ("tuf" in slow)  # whole, unsigned, never read by devices
    assert fleet.sync("dev").status == "current" and fleet.installed("dev") == before
    res = fleet.push()  # the same push, straight to the registry: it publishes the release
    assert res["tuf_files"] and all(a["changed"] for a in res["adapters"])
    assert fleet.sync("dev").status == "updated"
    assert fleet.installed("dev") == {p.stem: p.read_bytes() for p in fleet.files}
    fleet.assert_loadable("dev")


def test_release_refresh_and_the_api_take_a_deadline_too(fleet):
    from edge.errors import ConfigError
    from edge.fleet import DeadlineExceededError, refresh_release

    proxy = _SlowRegistry(fleet.reg.host, "/v2/")
    try:
        kw = {"insecure": True, "timeout": 3, "deadline": 1}
        err = _bounded(lambda: refresh_release(proxy.host, REPO, fleet.tmp / "tuf", fleet.tmp / "keys", **kw))
    finally:
        proxy.close()
    assert isinstance(err, DeadlineExceededError) and isinstance(err, TimeoutError), repr(err)
    assert "release refresh stopped at its deadline of 1 s" in str(err), str(err)
    for bad in (0, -1, float("nan"), float("inf"), True, "60"):
        with pytest.raises(ConfigError, match="deadline must be a number of seconds > 0"):
            fleet.push(deadline=bad)


def test_a_push_cut_while_the_registry_takes_its_tuf_head_says_so_and_runs_again_safely(fleet, capsys):
    """The one step a cut leaves uncertain: the registry took the new head, its answer never came. The error says the
    release may be live; it is, devices get it, and the same push run again republishes it without harm."""
    import time

    from edge.cli import main

    took = time.monotonic()
    fleet.push()  # the first release (the model too): more requests than the push cut below, without its head
    took = time.monotonic() - took
    assert fleet.sync("dev").status == "updated"
    fleet.files = [fleet.adapter(i, seed=20 + i) for i in range(3)]
    new = {p.stem: p.read_bytes() for p in fleet.files}
    deadline = f"{max(5.0, 8 * took + 2):.1f}"  # all but the held head well within it, through the proxy, loaded
    proxy = _SlowRegistry(fleet.reg.host, f"/v2/{REPO}/tuf/manifests/timestamp.json", hold=True)
    try:
        args = ["push", f"{proxy.host}/{REPO}", *map(str, fleet.files), "--model", str(fleet.model), "--insecure"]
        args += ["--tuf-dir", str(fleet.tmp / "tuf"), "--keys", str(fleet.tmp / "keys"), "--timeout", "30"]
        code = _bounded(lambda: main([*args, "--deadline", deadline]))  # was 10 s: waited out in full every run
    finally:
        proxy.close()
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and proxy.held == 1, err
    assert "while publishing the TUF head" in err and "may or may not be live" in err, err
    live = fleet.sync("dev")
    assert live.status == "updated" and fleet.installed("dev") == new  # it was live
    again = fleet.push()  # the host committed nothing: the same release number, signed again
    assert again["tuf_files"] and again["release"]["number"] == live.release
    assert fleet.sync("dev").status == "current" and fleet.sync("dev2").status == "updated"
    assert fleet.installed("dev2") == new
    _tags_are_whole(fleet.reg.host)
