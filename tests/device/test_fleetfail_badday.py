"""A fleet operator's bad day: registries that never answer, refuse connections or fail mid-request.

Each test plays a registry that misbehaves at the TCP or HTTP level (a loopback server of a few
lines: it accepts and stays silent, or accepts and hangs up) and checks that host commands
(`edge release init`, `edge push`) and `edge sync` give up after one bounded attempt with one typed
line that names the timeout, and that nothing is half-written. They need no registry binary.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from pathlib import Path

import pytest

pytest.importorskip("oras", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("filelock", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

from _registry import SKIP_REASON, registry_binary  # noqa: E402

from edge.fleet import RegistryUnreachableError, init_release  # noqa: E402

REPO = "edge/adapters"
_BOUND = 60.0  # seconds a call may take before the test calls it hung (the old push never returned)


class _Server:
    """A loopback TCP server that accepts and then stays silent (``hang``) or hangs up at once; counts connections."""

    def __init__(self, hang: bool):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.hang, self.accepted, self._held = hang, 0, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.hang:
                self._held.append(conn)
            else:
                conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self._held:
            c.close()


@pytest.fixture(params=[True, False], ids=["never-answers", "hangs-up"])
def bad_registry(request):
    s = _Server(hang=request.param)
    yield s
    s.close()


def _bounded(fn):
    """Run ``fn`` in a thread; return what it raised (or returned), failing the test if it does not end."""
    out = []

    def target():
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001  (handed back to the test)
            out.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(_BOUND)
    assert not t.is_alive(), f"still waiting after {_BOUND} s: no timeout bounds it"
    return out[0]


def test_release_init_gives_up_after_one_bounded_attempt_and_commits_nothing(bad_registry, tmp_path):
    err = _bounded(
        lambda: init_release(bad_registry.host, REPO, tmp_path / "tuf", tmp_path / "keys", insecure=True, timeout=0.5)
    )
    assert isinstance(err, RegistryUnreachableError) and isinstance(err, ConnectionError), repr(err)
    words = "no answer within 0.5 s (--timeout)" if bad_registry.hang else "the registry is unreachable"
    assert words in str(err) and bad_registry.host in str(err), str(err)
    assert bad_registry.accepted == 1  # oras-py alone retried five times, sleeping 131 s in all
    assert not (tmp_path / "tuf" / "root.json").exists()  # not committed: `edge release init` can simply run again


def test_cli_push_to_a_registry_that_never_answers_is_one_line_exit_2(tmp_path, capsys):
    from edge.cli import main

    s = _Server(hang=True)
    try:
        args = ["release", "init", f"{s.host}/{REPO}", "--tuf-dir", str(tmp_path / "tuf"), "--keys"]
        code = _bounded(lambda: main([*args, str(tmp_path / "keys"), "--insecure", "--timeout", "0.5"]))
    finally:
        s.close()
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "no answer within 0.5 s" in err, err


def _device_root(tmp: Path) -> Path:
    """A device's root.json (the host's TUF repository, never published: the registry is the broken one)."""
    from edge.fleet.tufrepo import TufRepo

    repo, files = TufRepo.create(tmp / "tuf", tmp / "keys", bits=1)
    repo.commit(files)
    return tmp / "tuf" / "root.json"


def test_cli_sync_against_a_silent_registry_says_why_it_is_offline(tmp_path, capsys):
    from edge.cli import main

    root = _device_root(tmp_path)
    s = _Server(hang=True)
    try:
        args = ["sync", f"{s.host}/{REPO}", "--insecure", "--tuf-root", str(root), "--adapters", str(tmp_path / "dev")]
        code = _bounded(lambda: main([*args, "--fingerprint", "sha256:" + "ab" * 16, "--timeout", "0.5"]))
    finally:
        s.close()
    out = capsys.readouterr().out
    assert code == 1 and out.startswith("offline:"), out
    assert f"registry http://{s.host} is unreachable: no answer within 0.5 s (--timeout)" in out, (
        out
    )  # before: no reason
    assert s.accepted == 1 and not list((tmp_path / "dev").glob("*.safetensors"))


def test_sync_against_a_registry_answering_503_is_offline_not_an_error(tmp_path, capsys):
    """A 5xx (a registry restarting behind its proxy) is "try again later" (exit 1), as a refused connection is."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from edge.cli import main

    class Unavailable(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (http.server's name)
            self.send_response(503)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.write(b"restarting")

        def log_message(self, *a):
            pass

    root = _device_root(tmp_path)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        host = f"127.0.0.1:{srv.server_address[1]}"
        args = ["sync", f"{host}/{REPO}", "--insecure", "--tuf-root", str(root), "--adapters", str(tmp_path / "dev")]
        code = _bounded(lambda: main([*args, "--fingerprint", "sha256:" + "ab" * 16, "--timeout", "2"]))
    finally:
        srv.shutdown()
        srv.server_close()
    out = capsys.readouterr()
    assert code == 1 and out.out.startswith("offline:") and not out.err, out  # before: exit 2, "edge: error: ..."
    assert "answered HTTP 503" in out.out and "try again later" in out.out, out.out


@pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)
def test_registry_killed_mid_push_then_the_same_push_again_publishes_it(tmp_path, monkeypatch):
    """The registry dies just before the head (the last write): devices keep the old release, and the push, run
    again once the registry is back, publishes the new one."""
    from test_fleet import Fleet

    from edge.fleet.publish import Publisher
    from edge.fleet.tuf_oci import HEAD_TAG

    fleet = Fleet(tmp_path, n=3, nbytes=6_000)
    try:
        fleet.push()
        assert fleet.sync("dev").status == "updated"
        before = fleet.installed("dev")
        real = Publisher.manifest

        def crash_before_head(self, repo, tag, manifest):
            if tag == HEAD_TAG:
                fleet.reg.stop(kill=True)
            return real(self, repo, tag, manifest)

        monkeypatch.setattr(Publisher, "manifest", crash_before_head)
        new = [fleet.adapter(0, seed=70), *fleet.files[1:]]
        err = _bounded(lambda: fleet.push(new))
        assert isinstance(err, RegistryUnreachableError) and "unreachable" in str(err), repr(err)  # one attempt
        monkeypatch.setattr(Publisher, "manifest", real)
        assert fleet.sync("dev").status == "offline" and fleet.installed("dev") == before
        fleet.reg.start()
        assert fleet.sync("dev").status == "current" and fleet.installed("dev") == before  # no head: no release
        assert fleet.reg.blob_file("sha256:" + hashlib.sha256(new[0].read_bytes()).hexdigest()).exists()
        again = fleet.push(new)  # the blob the first attempt stored is skipped (blob_exists), the TUF files re-sent
        assert [a["name"] for a in again["adapters"] if a["changed"]] == ["a00"]
        rep = fleet.sync("dev")
        assert rep.status == "updated" and [a["name"] for a in rep.installed] == ["a00"], rep.to_dict()
        assert fleet.installed("dev") == {p.stem: p.read_bytes() for p in new}
    finally:
        fleet.close()


@pytest.fixture
def fleet(tmp_path):
    if registry_binary() is None:
        pytest.skip(SKIP_REASON)
    from test_fleet import Fleet

    f = Fleet(tmp_path, n=3, nbytes=6_000)
    yield f
    f.close()


@pytest.mark.parametrize(("role", "named"), [("snapshot", "snapshot.json is expired"), ("targets", "bins-")])
def test_an_expired_snapshot_or_bin_is_refused_naming_it_and_the_next_good_release_heals(fleet, role, named):
    from datetime import timedelta

    from edge.fleet import Expiry

    fleet.push()
    fleet.sync("dev")
    before = fleet.installed("dev")
    fleet.push([fleet.adapter(0, seed=80)], expiry=Expiry(**{role: timedelta(minutes=-1)}))
    rep = fleet.sync("dev")
    assert rep.status == "rejected" and "ExpiredMetadataError" in rep.reason and named in rep.reason, rep.reason
    assert fleet.installed("dev") == before and not rep.installed
    fleet.push([fleet.adapter(0, seed=81)])
    assert fleet.sync("dev").status == "updated" and fleet.installed("dev")["a00"] != before["a00"]


def test_mix_and_match_an_older_bin_served_under_a_newer_tag_is_refused(fleet):
    """A device two releases behind reads a bin by its tag; the registry (or a mirror) serves version 1 under the
    tag of version N: ngclient checks it against the snapshot's version and the device keeps what it has."""
    import requests

    from edge.fleet.oci import MEDIA

    fleet.push()
    fleet.sync("dev")
    before = fleet.installed("dev")
    r2 = fleet.push([fleet.adapter(1, seed=60)])
    fleet.push([fleet.adapter(0, seed=61)])  # the device is now two releases behind: r2's bin comes by its tag
    bin_file = next(n for n in r2["tuf_files"] if ".bins-" in n)  # e.g. "3.bins-1.json"
    url = f"http://{fleet.reg.host}/v2/{REPO}/tuf/manifests/"
    h = {"Accept": MEDIA["manifest"], "Content-Type": MEDIA["manifest"]}
    v1 = requests.get(url + "1." + bin_file.split(".", 1)[1], headers=h, timeout=5).content
    assert requests.put(url + bin_file, data=v1, headers=h, timeout=5).status_code == 201  # the attacker's retag
    rep = fleet.sync("dev")
    assert rep.status == "rejected" and "BadVersionNumberError" in rep.reason, rep.reason
    assert fleet.installed("dev") == before and not rep.installed


def test_a_full_disk_while_checking_the_release_says_so_and_keeps_the_installed_set(fleet, tmp_path, capsys):
    """ngclient saves each verified file in the state folder: on a full disk that write fails before any adapter
    moves. One line naming the disk (before: "cannot read the TUF metadata cache"), nothing touched."""
    import os
    import subprocess

    from edge.cli import main

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        fleet.push()
        args = ["sync", f"{fleet.reg.host}/{REPO}", "--insecure", "--tuf-root", str(fleet.tmp / "tuf" / "root.json")]
        args += ["--adapters", str(mnt / "dev"), "--model", str(fleet.model)]
        assert main(args) == 0
        before = {p.name: p.read_bytes() for p in (mnt / "dev").glob("*.safetensors")}
        fleet.push([fleet.adapter(0, seed=40)])
        st = os.statvfs(mnt)
        (mnt / "fill").write_bytes(b"\0" * (st.f_bavail * st.f_frsize))  # the disk is full
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "the disk is full" in err and "sync again" in err, err
        assert {p.name: p.read_bytes() for p in (mnt / "dev").glob("*.safetensors")} == before
        assert not [p for p in (mnt / "dev").rglob("*") if p.name.endswith(".tmp")]
        (mnt / "fill").unlink()
        assert main(args) == 0 and (mnt / "dev" / "a00.safetensors").read_bytes() != before["a00.safetensors"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
