"""Outside audit of `edge sync` (helper W): a publisher, registry and disk this project did not write.

Each test plays one hostile or unlucky party against the local registry of ``test_fleet`` (its
``Fleet`` fixture): a targets key that signs ``../`` or absolute paths, a signed length the disk
cannot hold, a registry blob shorter than its signed length, a full disk, an installed adapter
swapped for another of the same size, a model replaced under the adapter folder, a registry that
stalls, and two ``edge sync`` processes on one folder. Nothing is half-installed or lost, and each
refusal says what was wrong in one line.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("oras", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("filelock", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

from _registry import SKIP_REASON, make_adapter, make_model, registry_binary  # noqa: E402
from test_fleet import REPO, Fleet  # noqa: E402  (the fleet tests' registry, host and device helpers)

from edge.fleet import push, sync  # noqa: E402
from edge.fleet.oci import MEDIA, fp_hex  # noqa: E402

pytestmark = pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path, n=3, nbytes=6_000)
    yield f
    f.close()


def _sign_target(fleet: Fleet, suffix: str, data: bytes, length: int | None = None, channel: str = "stable") -> None:
    """What a holder of the targets key (or a buggy publisher) can publish: any path, any signed length."""
    from edge.fleet.publish import Publisher
    from edge.fleet.tufrepo import TufRepo

    pub = Publisher(fleet.reg.host, REPO, insecure=True)
    try:
        digest = pub.blob(REPO, data, MEDIA["adapter"])["digest"].split(":", 1)[1]
        tuf = TufRepo.load(fleet.tmp / "tuf", fleet.tmp / "keys")
        path = f"{channel}/{fp_hex(fleet.info.fingerprint)}/{suffix}"
        files = tuf.stage_targets({path: (len(data) if length is None else length, digest, {"method": "shira"})})
        pub.tuf_files(files, tuf.root_version, tuf.published(files))
        tuf.commit(files)
    finally:
        pub.close()


@pytest.mark.parametrize("name", ["../../escaped", "sub/escaped", "/tmp/edge-outside-audit/escaped"])
def test_a_signed_target_path_outside_the_adapter_folder_is_refused(fleet, name):
    fleet.push()
    fleet.sync("dev")
    before = fleet.installed("dev")
    evil = make_adapter(fleet.info, fleet.tmp / "evil.safetensors", name, 2000, 9)  # names itself as its path says
    _sign_target(fleet, f"{name}.safetensors", evil.read_bytes())
    evil.unlink()
    rep = fleet.sync("dev")
    assert rep.status == "rejected" and [x["name"] for x in rep.refused] == [name]
    assert "target path refused" in rep.refused[0]["reason"] and "letters, digits" in rep.refused[0]["reason"]
    outside = [fleet.tmp.parent / "escaped.safetensors", Path("/tmp/edge-outside-audit/escaped.safetensors")]
    assert not any(p.exists() for p in outside) and not list(fleet.tmp.rglob("escaped.safetensors"))
    assert fleet.installed("dev") == before
    fleet.assert_loadable("dev")


def test_a_signed_length_the_disk_cannot_hold_fails_before_any_byte_moves(fleet):
    fleet.push()
    fleet.sync("dev")
    before = fleet.installed("dev")
    big = make_adapter(fleet.info, fleet.tmp / "huge.safetensors", "huge", 2000, 9)
    _sign_target(fleet, "huge.safetensors", big.read_bytes(), length=1 << 50)  # a petabyte, signed
    rep = fleet.sync("dev")
    assert rep.status == "partial" and [x["name"] for x in rep.failed] == ["huge"] and rep.bytes_adapters == 0
    assert "disk is full" in rep.failed[0]["reason"] and str(2 << 50) in rep.failed[0]["reason"]
    assert fleet.installed("dev") == before and not list((fleet.tmp / "dev" / ".edge-sync" / "partial").iterdir())


def test_a_registry_blob_shorter_than_its_signed_length_is_refused_on_the_first_sync(fleet):
    """The registry announces the blob's size (Content-Length): one that is not the signed length is refused before
    a byte is kept, on every sync, and the installed set stays."""
    fleet.push()
    fleet.sync("dev")
    before = fleet.installed("dev")
    short = make_adapter(fleet.info, fleet.tmp / "short.safetensors", "short", 2000, 9)
    _sign_target(fleet, "short.safetensors", short.read_bytes(), length=short.stat().st_size + 5000)
    for _ in range(2):
        rep = fleet.sync("dev")
        assert rep.status == "rejected" and [x["name"] for x in rep.refused] == ["short"]
        reason = rep.refused[0]["reason"]
        assert f"is {short.stat().st_size} bytes, {short.stat().st_size + 5000} were signed" in reason, reason
    assert fleet.installed("dev") == before


def test_an_installed_adapter_swapped_for_another_of_the_same_size_is_restored(fleet):
    fleet.push()
    fleet.sync("dev")
    dst = fleet.tmp / "dev" / "a01.safetensors"
    other = make_adapter(fleet.info, fleet.tmp / "other.safetensors", "a01", 6_000, 7)  # seed 1 -> 7: same size
    assert other.stat().st_size == dst.stat().st_size and other.read_bytes() != dst.read_bytes()
    shutil.copyfile(other, dst)
    rep = fleet.sync("dev")
    assert rep.status == "updated" and [a["name"] for a in rep.installed] == ["a01"]
    assert dst.read_bytes() == fleet.files[1].read_bytes()
    assert fleet.sync("dev").status == "current"  # untouched files are recognised by stat alone again


def test_a_new_model_under_the_same_adapter_folder_takes_its_own_versions(fleet):
    other = fleet.tmp / "model2.onnx"
    info2 = make_model(other, d_in=256, d_hid=256, seed=5)
    b00 = make_adapter(info2, fleet.tmp / "b" / "a00.safetensors", "a00", 2000, 1)
    push(fleet.reg.host, REPO, "stable", other, [b00], fleet.tmp / "tuf", fleet.tmp / "keys", insecure=True)
    fleet.push()  # the first model's a00 now carries a higher release version than the new model's
    assert fleet.sync("dev").status == "updated"
    rep = sync(fleet.cfg(), fleet.tmp / "dev", model=other)  # the device's model was replaced
    assert rep.status == "updated" and [a["name"] for a in rep.installed] == ["a00"], rep.to_dict()
    assert rep.stale == ["a01", "a02"] and not rep.removed  # the old model's: kept, and said (a Runtime refuses them)
    rep = sync(fleet.cfg(), fleet.tmp / "dev", model=other, prune=True)
    assert rep.status == "updated" and sorted(rep.removed) == ["a01", "a02"] and rep.stale == []
    assert fleet.installed("dev") == {"a00": b00.read_bytes()}


def test_a_full_disk_installs_what_fits_keeps_the_rest_as_it_was_and_resumes(fleet, monkeypatch):
    from edge.fleet import blobstore
    from edge.format import io

    fleet.push()
    fleet.sync("dev")
    before = fleet.installed("dev")
    fleet.push([fleet.adapter(i, seed=50 + i) for i in range(3)])
    real = io.atomic_write_bytes

    def full_after_one(path, data):  # the disk fills up after the first adapter is written
        if Path(path).suffix == ".safetensors" and full_after_one.n:
            raise io.WriteError(f"cannot write {path}: No space left on device (the file is unchanged)")
        full_after_one.n += Path(path).suffix == ".safetensors"
        return real(path, data)

    full_after_one.n = 0
    monkeypatch.setattr(io, "atomic_write_bytes", full_after_one)
    monkeypatch.setattr(blobstore, "free_bytes", lambda path: None)  # no statvfs: only the write itself can tell
    rep = fleet.sync("dev")
    assert rep.status == "partial" and len(rep.installed) == 1 and len(rep.failed) == 2
    assert all("No space left" in x["reason"] and "sync again" in x["reason"] for x in rep.failed)
    now = fleet.installed("dev")
    assert sum(now[n] != before[n] for n in now) == 1  # one new adapter, the other two exactly as they were
    fleet.assert_loadable("dev")
    monkeypatch.setattr(io, "atomic_write_bytes", real)
    done = fleet.sync("dev")  # room again: the two verified blobs kept in the cache are installed, not downloaded
    assert done.status == "updated" and len(done.installed) == 2 and done.bytes_adapters == 0
    assert fleet.installed("dev") == {p.stem: p.read_bytes() for p in fleet.files}  # the files the push rewrote


def test_a_small_tmpfs_fills_up_and_sync_says_so_in_one_line(fleet, tmp_path, capsys):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        from edge.cli import main

        fleet.push([fleet.adapter(i, seed=i, nbytes=24_000) for i in range(3)])  # 72 KB of adapters, 96 KB disk
        args = ["sync", f"{fleet.reg.host}/{REPO}", "--insecure", "--tuf-root", str(fleet.tmp / "tuf" / "root.json")]
        code = main([*args, "--adapters", str(mnt / "dev"), "--model", str(fleet.model)])
        out = capsys.readouterr().out
        assert code == 1 and out.startswith("partial:") and "the disk is full" in out, out
        for p in (mnt / "dev").glob("*.safetensors"):  # whatever was installed is complete and verified
            assert p.read_bytes() == (fleet.tmp / p.name).read_bytes()
        assert not [p for p in (mnt / "dev").iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_stalled_registry_times_out_and_the_next_sync_completes(fleet):
    fleet.push()
    fleet.reg.proc.send_signal(signal.SIGSTOP)  # the registry accepts connections and never answers
    try:
        from edge.fleet import FleetConfig

        cfg = FleetConfig(fleet.reg.host, REPO, "stable", fleet.tmp / "tuf" / "root.json", insecure=True, timeout=1)
        stalled = sync(cfg, fleet.tmp / "dev", model=fleet.model)
    finally:
        fleet.reg.proc.send_signal(signal.SIGCONT)
    assert stalled.status == "offline" and "unreachable" in stalled.reason and not fleet.installed("dev")
    done = fleet.sync("dev")
    assert done.status == "updated" and fleet.installed("dev") == {p.stem: p.read_bytes() for p in fleet.files}


def test_two_sync_processes_on_one_folder_serialise(fleet):
    fleet.push()
    cmd = [sys.executable, "-m", "edge.cli", "sync", f"{fleet.reg.host}/{REPO}", "--insecure"]
    cmd += ["--tuf-root", str(fleet.tmp / "tuf" / "root.json"), "--adapters", str(fleet.tmp / "dev")]
    cmd += ["--model", str(fleet.model)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and all(not err for _, err in outs), outs
    assert sorted(o.split(":", 1)[0] for o, _ in outs) == ["current", "updated"]
    assert fleet.installed("dev") == {p.stem: p.read_bytes() for p in fleet.files}
    fleet.assert_loadable("dev")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_given_as_the_tuf_root_is_refused_not_waited_on(fleet):
    os.mkfifo(fleet.tmp / "root.fifo")
    cmd = [sys.executable, "-m", "edge.cli", "sync", f"{fleet.reg.host}/{REPO}", "--insecure"]
    cmd += [
        "--tuf-root",
        str(fleet.tmp / "root.fifo"),
        "--adapters",
        str(fleet.tmp / "dev"),
        "--model",
        str(fleet.model),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)  # before: read_bytes() on the FIFO hung
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "not a regular file" in r.stderr, r.stderr


def test_an_adapter_folder_or_cache_that_is_a_file_and_a_foreign_state_are_refused_in_one_line(fleet, capsys):
    from edge.cli import main

    fleet.push()
    (fleet.tmp / "afile").write_text("not a folder")
    base = ["sync", f"{fleet.reg.host}/{REPO}", "--insecure", "--tuf-root", str(fleet.tmp / "tuf" / "root.json")]
    base += ["--model", str(fleet.model)]
    for extra, words in [
        (["--adapters", str(fleet.tmp / "afile")], "cannot use"),  # before: FileExistsError, a traceback
        (["--adapters", str(fleet.tmp / "dev"), "--cache", str(fleet.tmp / "afile")], "cannot use"),
    ]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and words in err and "writable folder" in err, err
    state = fleet.tmp / "dev" / ".edge-sync" / "state.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text("[1]")  # valid JSON, not a sync state: before, a TypeError deep in the install loop
    assert main([*base, "--adapters", str(fleet.tmp / "dev")]) == 2
    err = capsys.readouterr().err
    assert "is not a sync state; delete it to start over" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("version", ["7; rm -rf /", 2.5])
def test_a_signed_target_whose_version_is_not_a_number_rejects_the_release(fleet, monkeypatch, version):
    from tuf.api.metadata import TargetFile

    fleet.push()
    fleet.sync("dev")
    before = fleet.installed("dev")
    fleet.push([fleet.adapter(0, seed=90)])
    # what ngclient hands back from signed metadata whose "custom" a buggy or hostile publisher wrote
    monkeypatch.setattr(TargetFile, "custom", property(lambda self: {"method": "shira", "version": version}))
    rep = fleet.sync("dev")  # before: int("7; rm -rf /") raised ValueError out of sync, a traceback in the CLI
    assert rep.status == "rejected" and "not an integer" in rep.reason and not rep.installed
    assert fleet.installed("dev") == before


def test_devices_sharing_one_cache_folder_sync_at_once_without_false_alarms(fleet):
    from concurrent.futures import ThreadPoolExecutor

    fleet.push([fleet.adapter(i, seed=i, nbytes=300_000) for i in range(3)])
    shared = fleet.tmp / "shared-cache"
    with ThreadPoolExecutor(3) as ex:  # before: their .part files interleaved, read as tampered blobs
        reps = list(ex.map(lambda d: fleet.sync(d, cache_dir=shared), ["d1", "d2", "d3"]))
    assert [r.status for r in reps] == ["updated"] * 3, [r.to_dict() for r in reps]
    assert not any(r.refused or r.failed for r in reps)
    for d in ("d1", "d2", "d3"):
        assert fleet.installed(d) == {p.stem: p.read_bytes() for p in fleet.files}
