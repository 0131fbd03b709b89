"""`edge sync` on a slow link: a registry (or proxy) that sends one byte every fraction of a second never trips the
per-read ``--timeout``; the whole sync ends by its ``--deadline`` anyway, keeps what it had, and the next sync
resumes. Also: a second sync waiting for the first, and a sync killed with SIGKILL while it writes an adapter or
its signature (before, killed between the signature and the adapter, the old adapter sat beside the new signature
and a runtime that requires signatures refused it until the next sync).

The drip servers are a few lines of ``http.server`` on 127.0.0.1; the registry tests reuse ``test_fleet``'s
``Fleet`` (a real registry) and put a dripping proxy in front of it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("filelock", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

import requests  # noqa: E402
from _registry import SKIP_REASON, registry_binary  # noqa: E402

REPO = "edge/adapters"
_BOUND = 60.0  # a call still running after this is hung (before the deadline, a drip kept sync alive for ever)
_GAP = 0.2  # seconds between two dripped bytes: far below any read timeout


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
    assert not t.is_alive(), f"still running after {_BOUND} s: nothing bounds the whole sync"
    return out[0]


class _Drip(ThreadingHTTPServer):
    """Answers every GET slowly. ``mode="headers"``: the status line and headers one byte per ``_GAP``;
    ``"body"``: headers at once (a 1 MB body announced), then the body one byte per ``_GAP``;
    ``"proxy"``: forwards to ``upstream``, dripping only adapter blobs after their first ``fast`` bytes."""

    daemon_threads = True

    def __init__(self, mode: str, upstream: str | None = None, fast: int = 0):
        super().__init__(("127.0.0.1", 0), _DripHandler)
        self.mode, self.upstream, self.fast = mode, upstream, fast
        self.dripped, self.stop = 0, threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


class _DripHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Drip

    def log_message(self, *a):
        pass

    def _drip(self, data: bytes) -> None:
        for i in range(len(data)):
            if self.server.stop.wait(_GAP):
                return
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()
            self.server.dripped += 1

    def do_GET(self):  # noqa: N802  (http.server's name)
        try:
            if self.server.mode == "headers":
                self._drip(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"." * 100_000 + b"\r\n\r\n")
            elif self.server.mode == "body":
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
                self._drip(b"{" * 1_000_000)
            else:
                self._forward()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what the deadline is for

    def _forward(self) -> None:
        keep = ("Accept", "Range", "If-None-Match")
        headers = {k: self.headers[k] for k in keep if self.headers[k]}
        r = requests.get(f"http://{self.server.upstream}{self.path}", headers=headers, stream=True, timeout=10)
        body = r.raw.read()
        self.send_response(r.status_code)
        for k, v in r.headers.items():
            if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if f"/v2/{REPO}/blobs/" in self.path:  # adapter blobs (TUF metadata is under REPO/tuf): drip the rest
            self.wfile.write(body[: self.server.fast])
            self.wfile.flush()
            self._drip(body[self.server.fast :])
        else:
            self.wfile.write(body)


def _device_root(tmp: Path) -> Path:
    from edge.fleet.tufrepo import TufRepo

    repo, files = TufRepo.create(tmp / "tuf", tmp / "keys", bits=1)
    repo.commit(files)
    return tmp / "tuf" / "root.json"


@pytest.mark.parametrize("mode", ["headers", "body"])
def test_a_dripping_registry_is_cut_at_the_deadline_offline_exit_1(tmp_path, capsys, mode):
    from edge.cli import main

    root = _device_root(tmp_path)
    srv = _Drip(mode)
    try:
        args = ["sync", f"{srv.host}/{REPO}", "--insecure", "--tuf-root", str(root), "--adapters", str(tmp_path / "d")]
        args += ["--fingerprint", "sha256:" + "ab" * 16, "--timeout", "3", "--deadline", "2"]
        code = _bounded(lambda: main(args))  # before: the drip kept every read alive, and sync with it
    finally:
        srv.close()
    out = capsys.readouterr()
    assert code == 1 and out.out.startswith("offline:") and not out.err, out
    reason = out.out.splitlines()[1]
    assert "sync stopped at its deadline of 2 s (--deadline)" in reason and "resumes" in reason, reason
    assert srv.dripped > 0  # it was cut while the server dripped, not refused for something else
    assert not list((tmp_path / "d").glob("*.safetensors"))


def test_the_deadline_and_timeout_are_checked_as_seconds(tmp_path):
    from edge.errors import ConfigError
    from edge.fleet import DEFAULT_DEADLINE, FleetConfig

    assert FleetConfig("127.0.0.1:5000", REPO).deadline == DEFAULT_DEADLINE
    for bad in (0, -1, float("nan"), float("inf"), True, "300"):
        with pytest.raises(ConfigError, match="deadline must be a number of seconds > 0"):
            FleetConfig("127.0.0.1:5000", REPO, deadline=bad)


needs_registry = pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)


@pytest.fixture
def fleet(tmp_path):
    from test_fleet import Fleet

    f = Fleet(tmp_path, n=2, nbytes=6_000)
    yield f
    f.close()


@needs_registry
def test_a_download_cut_by_the_deadline_keeps_the_old_adapter_and_the_next_sync_resumes(fleet):
    from edge.fleet import FleetConfig, sync

    fleet.push()
    fleet.sync("dev")
    before = fleet.installed("dev")
    big = fleet.adapter(0, seed=7, nbytes=300_000)
    fleet.push([big])
    proxy = _Drip("proxy", upstream=fleet.reg.host, fast=200_000)
    try:
        root = fleet.tmp / "tuf" / "root.json"
        cfg = FleetConfig(proxy.host, REPO, "stable", root, insecure=True, timeout=3, deadline=4)
        cut = _bounded(lambda: sync(cfg, fleet.tmp / "dev", model=fleet.model))
    finally:
        proxy.close()
    assert cut.status == "partial" and not cut.installed and proxy.dripped > 0, cut.to_dict()
    assert [x["name"] for x in cut.failed] == ["a00"] and "deadline of 4 s" in cut.failed[0]["reason"]
    assert fleet.installed("dev") == before  # nothing half-installed
    fleet.assert_loadable("dev")
    parts = list((fleet.tmp / "dev" / ".edge-sync" / "partial").glob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size >= 3 << 16  # what came is kept (whole 64 KiB reads)
    done = fleet.sync("dev")  # straight to the registry: resumes from the partial file
    assert done.status == "updated" and done.resumed == 1 and done.bytes_resumed_from >= 3 << 16
    assert done.bytes_adapters + done.bytes_resumed_from == big.stat().st_size
    assert fleet.installed("dev") == {"a00": big.read_bytes(), "a01": before["a01"]}
    fleet.assert_loadable("dev")


@needs_registry
def test_a_sync_waiting_for_another_gives_up_at_its_deadline_in_one_line(fleet, capsys):
    from filelock import FileLock

    from edge.cli import main

    fleet.push()
    (fleet.tmp / "dev").mkdir()
    args = ["sync", f"{fleet.reg.host}/{REPO}", "--insecure", "--tuf-root", str(fleet.tmp / "tuf" / "root.json")]
    args += ["--adapters", str(fleet.tmp / "dev"), "--model", str(fleet.model), "--deadline", "1"]
    with FileLock(str(fleet.tmp / "dev" / ".edge-sync.lock")):  # a sync of this folder that is still running
        code = _bounded(lambda: main(args))  # before: it waited 600 s whatever the deadline
    out = capsys.readouterr()  # cut by --deadline as any other wait is: offline, exit 1 (README), the reason 2nd
    assert code == 1 and out.out.startswith("offline:") and not out.err, out
    assert "another sync is running" in out.out.splitlines()[1] and "try again later" in out.out, out
    assert not fleet.installed("dev")
    assert main(args[:-1] + ["30"]) == 0 and len(fleet.installed("dev")) == 2  # the lock is free: it runs


_KILLER = """
import os, sys, time
from pathlib import Path
from edge.format import io
from edge.fleet import FleetConfig, sync

host, repo, root, dev, model, stop, ready = sys.argv[1:8]
stop, _, nth = stop.partition("#")
real, seen = io.atomic_write_bytes, []

def write(path, data, **kw):
    path = Path(path)
    seen.append(path.name)
    if path.name == stop and seen.count(stop) == int(nth or 1):  # half of this write in a temp file, then wait
        tmp = path.with_name(f".{path.name}.{os.getpid()}.killed.tmp")
        tmp.write_bytes(data[: len(data) // 2])
        Path(ready).write_text("ready")
        time.sleep(600)
    return real(path, data, **kw)

io.atomic_write_bytes = write
sync(FleetConfig(host, repo, "stable", Path(root), insecure=True, timeout=5), Path(dev), model=Path(model),
     trusted_keys=sys.argv[8:] or None)
"""


@needs_registry
@pytest.mark.parametrize(
    "stop",
    ["a00.safetensors", "a00.safetensors.sig#1", "a00.safetensors.sig#2", "state.json"],
    ids=["adapter", "signature-with-previous", "final-signature", "state"],
)
def test_a_sync_killed_while_writing_an_adapter_leaves_whole_files_and_the_next_heals(fleet, stop):
    import edge
    from edge.format.signing import generate_key, sign_file

    pub = generate_key(fleet.tmp / "team.pem")
    for f in fleet.files:
        sign_file(f, fleet.tmp / "team.pem")
    fleet.push()
    fleet.sync("dev")
    before = fleet.installed("dev")
    fleet.files = [fleet.adapter(0, seed=11), fleet.adapter(1, seed=12)]
    for f in fleet.files:
        sign_file(f, fleet.tmp / "team.pem")
    fleet.push()
    ready = fleet.tmp / "ready"
    argv = [fleet.reg.host, REPO, str(fleet.tmp / "tuf" / "root.json"), str(fleet.tmp / "dev"), str(fleet.model)]
    p = subprocess.Popen([sys.executable, "-c", _KILLER, *argv, stop, str(ready)], stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while not ready.exists() and p.poll() is None and time.monotonic() - t0 < _BOUND:
        time.sleep(0.05)
    assert ready.exists(), p.communicate()[1]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    now = fleet.installed("dev")
    new = {p.stem: p.read_bytes() for p in fleet.files}
    assert set(now) == set(before)
    rt = edge.Runtime(str(fleet.model), trusted_keys=[str(pub)])  # a device that requires signatures
    for name, data in now.items():  # each installed adapter is whole, the old file or the new one, and its
        assert data in (before[name], new[name]), name  # signature is its own
        rt.load_adapter(str(fleet.tmp / "dev" / f"{name}.safetensors"))
    healed = fleet.sync("dev")
    assert healed.status in ("updated", "current") and not healed.failed and not healed.refused
    assert fleet.installed("dev") == new
    assert not [q.name for q in (fleet.tmp / "dev").iterdir() if q.name.endswith(".tmp")]  # the torn temp is gone
    for name in new:
        rt.load_adapter(str(fleet.tmp / "dev" / f"{name}.safetensors"))
