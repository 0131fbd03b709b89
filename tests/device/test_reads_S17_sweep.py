"""Reads of user and network files found unbounded in the S17 sweep, each reproduced and refused.

* ``load_samples`` of a data folder listed every entry before counting its ``.npz`` files: a folder of a million
  files took 470 MB and 47 s before its refusal; it now stops at :data:`MAX_FILES` + 1. Device profile folders
  (``--devices-dir``) were listed whole the same way (240 MB, 8 s for a million entries) and had no cap.
* ``edge push`` read an adapter's ``.sig`` with ``read_bytes`` after the upload began: a FIFO there blocked it;
  signatures are now read bounded while the adapters are checked, before anything is uploaded.
* ``lab.digits_model.load_checkpoint`` (``edge demo``'s cache) opened a FIFO in safetensors, which blocked.
* ``edge release``/``edge push`` read a TUF private key with ``read_bytes``: a FIFO there blocked.
* ``edge sync`` installed the verified blob and its signature with ``read_bytes``: a FIFO swapped in after the
  hash check blocked the sync; it is now read bounded by its signed length and refused, the old adapter kept.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from _registry import SKIP_REASON, LocalRegistry, make_adapter, make_model, registry_binary

from edge.errors import ConfigError, FormatError
from edge.format import io, samples


@contextlib.contextmanager
def unblocked(fifos):
    """While the block runs, a reader blocked on one of ``fifos`` gets end-of-file (a writer opens and closes it):
    a regression fails the test instead of hanging the suite."""
    stop = threading.Event()

    def writer():
        while not stop.wait(0.05):
            for f in fifos:
                try:
                    os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while no reader has it open
                except OSError:
                    pass

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def test_data_folder_refused_past_max_files_without_listing_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(samples, "MAX_FILES", 5)
    for i in range(40):
        (tmp_path / f"s{i:02d}.npz").touch()
    (tmp_path / "notes.txt").touch()
    seen = []
    real = os.scandir

    class Counting:  # how many entries were read before the refusal
        def __init__(self, path):
            self.it = real(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.it.close()

        def __iter__(self):
            for e in self.it:
                seen.append(e.name)
                yield e

    monkeypatch.setattr(io.os, "scandir", Counting)
    with pytest.raises(ConfigError, match=r"holds more than 5 \.npz files; merge some"):
        samples.load_samples(tmp_path)
    assert 6 <= len(seen) <= 7  # stopped at the 6th .npz (the .txt may come first), not after 41 entries


def test_profile_folder_capped_and_listed_lazily(tmp_path, monkeypatch):
    import edge.devices as devices

    monkeypatch.setattr(devices, "MAX_PROFILES", 3)
    for i in range(10):
        (tmp_path / f"p{i}.yaml").write_text("not read: the folder is refused first\n")
    with pytest.raises(ConfigError, match=r"device profile folder .* holds more than 3 \.yaml files"):
        devices.list_profiles(search=[tmp_path])
    with pytest.raises(ConfigError, match=r"holds more than 3 \.yaml files"):
        devices.load_profile("nope", search=[tmp_path])


def test_data_folder_reads_its_npz_files_in_order(tmp_path):
    for i, n in enumerate((3, 2)):
        np.savez(tmp_path / f"part{i}.npz", x=np.zeros((n, 4), np.float32), y=np.arange(n))
    (tmp_path / "readme.txt").write_text("not data")
    got = samples.load_samples(tmp_path)
    assert [(name, x.shape, y.tolist()) for name, x, y in got] == [
        ("part0.npz", (3, 4), [0, 1, 2]),
        ("part1.npz", (2, 4), [0, 1]),
    ]


@pytest.mark.slow  # imports torch (lab side): seconds on a busy machine
def test_digits_checkpoint_fifo_refused(tmp_path):
    pytest.importorskip("torch")
    from lab.digits_model import load_checkpoint

    fifo = tmp_path / "encoder.safetensors"
    os.mkfifo(fifo)
    with unblocked([fifo]), pytest.raises(FormatError, match=r"checkpoint .* is a FIFO \(named pipe\), not a regular"):
        load_checkpoint(fifo)


# -- edge sync: the verified blob swapped before it is installed ------------------------------------------------
REPO = "edge/adapters"


def fleet_extra() -> None:
    for name in ("oras", "tuf", "filelock"):
        pytest.importorskip(name, reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")


@pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)
def test_sync_refuses_a_verified_blob_or_signature_swapped_for_a_fifo(tmp_path, monkeypatch):
    fleet_extra()
    from edge.fleet import FleetConfig, init_release, push, sync
    from edge.fleet.device import _Sync
    from edge.fleet.device_files import sig_path
    from edge.format.signing import generate_key, sign_file

    model = tmp_path / "model.onnx"
    info = make_model(model, d_in=64, d_hid=64)
    files = [make_adapter(info, tmp_path / f"a{i}.safetensors", f"a{i}", 4000, i) for i in range(3)]
    generate_key(tmp_path / "team.pem")
    for f in files:
        sign_file(f, tmp_path / "team.pem")
    fifos = []
    check = _Sync._check_adapter

    def then_swap(self, name, blob):  # verified: now a file is replaced, as a local attacker could
        check(self, name, blob)
        target = {"a1": blob, "a2": sig_path(blob)}.get(name)
        if target is not None:
            target.unlink()
            os.mkfifo(target)
            fifos.append(target)

    monkeypatch.setattr(_Sync, "_check_adapter", then_swap)
    reg = LocalRegistry(tmp_path / "registry").start()
    try:
        init_release(reg.host, REPO, tmp_path / "tuf", tmp_path / "keys", bits=3, insecure=True)
        push(reg.host, REPO, "stable", model, files, tmp_path / "tuf", tmp_path / "keys", insecure=True)
        cfg = FleetConfig(reg.host, REPO, "stable", tmp_path / "tuf" / "root.json", insecure=True, timeout=5)
        with unblocked(fifos):
            rep = sync(cfg, tmp_path / "dev", model=model)
    finally:
        reg.stop()
    assert len(fifos) == 2
    assert [a["name"] for a in rep.installed] == ["a0"]
    reasons = {r["name"]: r["reason"] for r in rep.refused}
    assert sorted(reasons) == ["a1", "a2"]
    assert "downloaded adapter" in reasons["a1"] and "downloaded signature" in reasons["a2"]
    assert all("a FIFO (named pipe), not a regular file" in r for r in reasons.values())
    assert sorted(p.name for p in (tmp_path / "dev").iterdir() if not p.name.startswith(".")) == [
        "a0.safetensors",
        "a0.safetensors.sig",
    ]
    assert (tmp_path / "dev" / "a0.safetensors").read_bytes() == Path(files[0]).read_bytes()


@pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)
def test_push_refuses_a_fifo_signature_before_uploading(tmp_path):
    fleet_extra()
    from edge.fleet import push

    model = tmp_path / "model.onnx"
    info = make_model(model, d_in=16, d_hid=16)
    adapter = make_adapter(info, tmp_path / "a0.safetensors", "a0", 2000, 0)
    fifo = tmp_path / "a0.safetensors.sig"
    os.mkfifo(fifo)
    with unblocked([fifo]), pytest.raises(FormatError, match=r"adapter signature .* is a FIFO \(named pipe\)"):
        push("127.0.0.1:9", REPO, "stable", model, [adapter], tmp_path / "tuf", tmp_path / "keys", insecure=True)


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_tuf_private_key_read_bounded(tmp_path, kind):
    fleet_extra()
    from edge.fleet.tufrepo import _signer

    key = tmp_path / "targets.pem"
    os.mkfifo(key) if kind == "fifo" else os.symlink("/dev/zero", key)
    words = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    with unblocked([key] if kind == "fifo" else []), pytest.raises(FormatError) as e:
        _signer(tmp_path, "targets")
    assert f"targets key {key}: it is {words}, not a regular file" in str(e.value)
    with pytest.raises(ConfigError, match="no root key at"):
        _signer(tmp_path, "root")
