"""The sync cache's blob store (helper H, session 21, mending review E21 findings 3, 4 and 8 and its suspicions).

Before: a FIFO at ``blobs/<sha>`` or ``partial/<sha>.part`` hung the sync past ``--deadline`` while it held the
lock; a symlink at ``partial/<sha>.part`` had the registry's bytes appended to the file it named (outside the
device folder); a download cut mid-chunk lost everything received in that 64 KiB chunk (a link slower than 64 KiB
per deadline never finished); a stale ``blobs/<sha>.sig`` was installed beside an unsigned target; a target with no
sha256 named the blobs folder itself; a bin listing a path of another bin crashed with an AttributeError.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading

import pytest

pytest.importorskip("oras", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("filelock", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

from _registry import SKIP_REASON, registry_binary  # noqa: E402
from test_fleet import Fleet  # noqa: E402

from edge.fleet import FleetSecurityError, sync  # noqa: E402
from edge.fleet.blobstore import fetch  # noqa: E402
from edge.fleet.oci import OciClient, RegistryUnreachableError  # noqa: E402

needs_registry = pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)
fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if registry_binary() is None:
        pytest.skip(SKIP_REASON)
    f = Fleet(tmp_path_factory.mktemp("fleetmend_files"), n=2, nbytes=6_000)
    f.push()
    yield f
    f.close()


def _shas(fleet) -> dict[str, str]:
    import hashlib

    return {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in fleet.files}


def _bounded_sync(fleet, dev, **kw):
    out = []
    cfg = dataclasses.replace(fleet.cfg(), deadline=15.0)
    t = threading.Thread(target=lambda: out.append(sync(cfg, dev, model=fleet.model, **kw)), daemon=True)
    t.start()
    t.join(40)
    assert not t.is_alive(), "sync still running 25 s past its --deadline: a FIFO in the cache hung it"
    return out[0]


@needs_registry
@fifo
@pytest.mark.parametrize("where", ["blobs", "partial"])
def test_a_fifo_in_the_cache_is_replaced_by_the_download_not_waited_on(fleet, tmp_path, where):
    dev, sha = tmp_path / "dev", _shas(fleet)["a00"]
    (dev / ".edge-sync" / where).mkdir(parents=True)
    os.mkfifo(dev / ".edge-sync" / where / (sha if where == "blobs" else f"{sha}.part"))
    rep = _bounded_sync(fleet, dev)
    assert rep.status == "updated" and sorted(a["name"] for a in rep.installed) == ["a00", "a01"], rep
    assert (dev / "a00.safetensors").read_bytes() == fleet.files[0].read_bytes()


@needs_registry
@pytest.mark.parametrize("where", ["partial", "blobs"])
def test_a_symlink_in_the_cache_is_never_written_through(fleet, tmp_path, where):
    dev, sha = tmp_path / "dev", _shas(fleet)["a00"]
    (dev / ".edge-sync" / where).mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"outside the folder")
    (dev / ".edge-sync" / where / (sha if where == "blobs" else f"{sha}.part")).symlink_to(victim)
    rep = sync(fleet.cfg(), dev, model=fleet.model)
    assert rep.status == "updated" and len(rep.installed) == 2, rep  # before (partial): 6000 bytes appended
    assert victim.read_bytes() == b"outside the folder"
    assert (dev / "a00.safetensors").read_bytes() == fleet.files[0].read_bytes()


@needs_registry
def test_a_stale_signature_blob_is_not_installed_beside_an_unsigned_target(fleet, tmp_path):
    dev, sha = tmp_path / "dev", _shas(fleet)["a00"]
    (dev / ".edge-sync" / "blobs").mkdir(parents=True)
    (dev / ".edge-sync" / "blobs" / f"{sha}.sig").write_bytes(b"left by an earlier refused install")
    rep = sync(fleet.cfg(), dev, model=fleet.model)
    assert rep.status == "updated" and len(rep.installed) == 2, rep
    assert not (dev / "a00.safetensors.sig").exists()  # before: installed beside it
    assert not (dev / ".edge-sync" / "blobs" / f"{sha}.sig").exists()


@needs_registry
def test_a_bin_listing_a_path_of_another_bin_is_a_rejected_release_not_a_crash(fleet, tmp_path, monkeypatch):
    from edge.fleet.device_state import durable_updater

    real = durable_updater().get_targetinfo
    monkeypatch.setattr(durable_updater(), "get_targetinfo", lambda self, p: None if "a01" in p else real(self, p))
    rep = sync(fleet.cfg(), tmp_path / "dev", model=fleet.model)  # before: AttributeError on tf.custom
    assert rep.status == "rejected" and "lists" in rep.reason and "a path of another bin" in rep.reason, rep


def test_a_target_without_sha256_is_refused_before_it_names_a_file(tmp_path):
    for sub in ("blobs", "partial"):
        (tmp_path / sub).mkdir()
    with pytest.raises(FleetSecurityError, match="its TUF target has no sha256"):  # before: blobs/"" = the folder
        fetch(tmp_path, "a00", {"sha256": "", "length": 5}, None, None, None)


def _half_then_close(total: int, sent: int) -> tuple[socket.socket, threading.Thread]:
    """An HTTP server that announces ``total`` bytes, sends ``sent``, then drops the connection."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total + b"z" * sent)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def test_a_download_cut_mid_chunk_keeps_every_byte_that_arrived(tmp_path):
    import hashlib

    total, sent = 10_000, 1_216  # far less than one 64 KiB chunk
    sha = hashlib.sha256(b"z" * total).hexdigest()
    srv, t = _half_then_close(total, sent)
    client = OciClient(f"http://127.0.0.1:{srv.getsockname()[1]}", "edge/adapters", timeout=5)
    for sub in ("blobs", "partial"):
        (tmp_path / sub).mkdir()

    class Report:
        resumed = bytes_resumed_from = 0

    try:
        with pytest.raises(RegistryUnreachableError):
            fetch(tmp_path, "a00", {"sha256": sha, "length": total}, client, Report(), None)
    finally:
        client.close()
        srv.close()
        t.join(5)
    assert (tmp_path / "partial" / f"{sha}.part").read_bytes() == b"z" * sent  # before: 0 bytes kept
