"""A device that runs `edge sync` unattended for months (outside review, helper D): its clock jumps to 2038 or back to
1970, its adapter folder's mount turns read-only or goes away, its disk fills up in the middle of a download, and
the power is cut between two writes on storage that does not keep what it was told to. Each time nothing installed
is lost, and the next sync after the fault is gone heals with no one at the device.

Not repeated here (see test_fleet, test_outside_fleet, test_fleetslow_deadline, test_fleetfail_badday): two syncs at
once (threads, processes, a shared cache), a sync killed at each write, a full disk before a download or while
checking the release, metadata that expired at the publisher.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

pytest.importorskip("oras", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("filelock", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

from _registry import SKIP_REASON, registry_binary  # noqa: E402
from test_fleet import Fleet  # noqa: E402

from edge.errors import WriteError  # noqa: E402
from edge.fleet import sync  # noqa: E402

pytestmark = pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path, n=2, nbytes=6_000)
    yield f
    f.close()


@pytest.fixture
def clock(monkeypatch):
    """``clock(datetime)`` sets the device's wall clock as TUF and the offline plan read it (None: the real one)."""
    import tuf.ngclient._internal.trusted_metadata_set as tms

    from edge.fleet import device

    real = datetime

    class Clock(real):
        at = None

        @classmethod
        def now(cls, tz=None):
            return cls.at if cls.at is not None else real.now(tz)

    class Module:  # what trusted_metadata_set calls: datetime.datetime.now(datetime.timezone.utc)
        datetime, timezone = Clock, timezone

    monkeypatch.setattr(tms, "datetime", Module)
    monkeypatch.setattr(device, "datetime", Clock)

    def set_clock(at: datetime | None) -> None:
        Clock.at = at

    return set_clock


@contextlib.contextmanager
def _tmpfs(mnt: Path, size: str):
    mnt.mkdir(exist_ok=True)
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]).returncode
    ):
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


Y2038 = datetime(2038, 6, 1, tzinfo=timezone.utc)
Y1970 = datetime(1970, 1, 2, tzinfo=timezone.utc)


def test_a_clock_set_to_2038_refuses_the_release_keeps_the_set_and_the_sync_after_the_clock_is_fixed_heals(
    fleet, clock
):
    fleet.push()
    fleet.sync("dev")
    before = fleet.installed("dev")
    fleet.push([fleet.adapter(0, seed=40)])
    clock(Y2038)  # every signed expiry is in the past now
    rep = fleet.sync("dev")
    assert rep.status == "rejected" and "ExpiredMetadataError" in rep.reason, rep.to_dict()
    assert fleet.installed("dev") == before and not rep.installed
    clock(Y1970)  # nothing has expired yet: TUF has no "not before", the release verifies and installs
    rep = fleet.sync("dev")
    assert rep.status == "updated" and [a["name"] for a in rep.installed] == ["a00"], rep.to_dict()
    clock(None)  # NTP fixed the clock: nothing the 2038 sync saw was kept as trusted
    assert fleet.sync("dev").status == "current"
    fleet.push([fleet.adapter(1, seed=41)])
    assert fleet.sync("dev").status == "updated" and fleet.installed("dev")["a01"] != before["a01"]


def test_offline_a_cached_release_is_used_only_while_the_device_clock_says_it_has_not_expired(fleet, clock):
    from edge.fleet import device

    fleet.push()

    def power_cut(self, name, t, blob):  # a00 downloaded and verified, the power went before its install
        raise KeyboardInterrupt("power cut")

    real = device._Sync._install
    device._Sync._install = power_cut
    try:
        with pytest.raises(KeyboardInterrupt):
            fleet.sync("dev")
    finally:
        device._Sync._install = real
    fleet.reg.stop()
    clock(Y2038)
    rep = fleet.sync("dev")
    assert rep.status == "offline" and "the cached release expired at" in rep.reason and not rep.installed
    clock(None)
    rep = fleet.sync("dev")
    assert rep.status == "offline" and [a["name"] for a in rep.installed] == ["a00"], rep.to_dict()  # the blob
    assert [x["name"] for x in rep.failed] == ["a01"]  # the cut came first: never downloaded
    fleet.assert_loadable("dev")


def test_a_read_only_mount_is_one_write_error_keeps_the_set_and_the_sync_after_remount_heals(fleet, tmp_path):
    with _tmpfs(tmp_path / "mnt", "4m") as mnt:
        fleet.push()
        assert sync(fleet.cfg(), mnt / "dev", model=fleet.model).status == "updated"
        before = {p.name: p.read_bytes() for p in (mnt / "dev").glob("*.safetensors")}
        fleet.push([fleet.adapter(0, seed=40)])
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(WriteError, match="Read-only file system") as e:  # before: filelock's bare OSError
            sync(fleet.cfg(), mnt / "dev", model=fleet.model)
        assert "sync again" in str(e.value) and len(str(e.value).splitlines()) == 1
        assert {p.name: p.read_bytes() for p in (mnt / "dev").glob("*.safetensors")} == before
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        rep = sync(fleet.cfg(), mnt / "dev", model=fleet.model)
        assert rep.status == "updated" and [a["name"] for a in rep.installed] == ["a00"], rep.to_dict()


def test_the_adapter_folder_removed_mid_download_is_rebuilt_by_the_next_sync(fleet):
    fleet.push()
    fleet.sync("dev")
    fleet.push([fleet.adapter(0, seed=40, nbytes=300_000)])
    gone = []

    def unplug(n):  # the card is pulled (or the folder deleted) while the first chunk is on its way
        if not gone:
            gone.append(n)
            shutil.rmtree(fleet.tmp / "dev")

    rep = fleet.sync("dev", on_chunk=unplug)  # before: FileNotFoundError out of sync (listing the gone cache)
    assert rep.status == "partial" and [x["name"] for x in rep.failed] == ["a00", "a01"], rep.to_dict()
    assert all("No such file or directory" in x["reason"] and "sync again" in x["reason"] for x in rep.failed)
    rep = fleet.sync("dev")  # the folder is back (recreated): everything is downloaded and installed again
    assert rep.status == "updated" and not rep.failed and not rep.refused, rep.to_dict()
    assert fleet.installed("dev") == {p.stem: p.read_bytes() for p in [fleet.tmp / "a00.safetensors", fleet.files[1]]}
    fleet.assert_loadable("dev")


def test_a_disk_that_fills_up_mid_download_keeps_the_bytes_and_resumes_once_there_is_room(fleet, tmp_path):
    with _tmpfs(tmp_path / "small", "2m") as mnt:
        fleet.push()
        dev = mnt / "dev"
        assert sync(fleet.cfg(), dev, model=fleet.model).status == "updated"
        before = {p.name: p.read_bytes() for p in dev.glob("*.safetensors")}
        big = fleet.adapter(0, seed=40, nbytes=400_000)
        fleet.push([big])
        filler = mnt / "other-app.log"

        chunks = []

        def fill(n):  # another program fills the disk once the first chunk is written
            chunks.append(n)
            if len(chunks) == 2:
                st = os.statvfs(mnt)
                with open(filler, "wb") as f:
                    with contextlib.suppress(OSError):
                        f.write(b"\0" * (st.f_bavail * st.f_frsize))

        rep = sync(fleet.cfg(), dev, model=fleet.model, on_chunk=fill)
        assert rep.status == "partial" and [x["name"] for x in rep.failed] == ["a00"], rep.to_dict()
        assert "the disk is full" in rep.failed[0]["reason"] and "sync again" in rep.failed[0]["reason"]
        assert {p.name: p.read_bytes() for p in dev.glob("*.safetensors")} == before
        parts = list((dev / ".edge-sync" / "partial").glob("*.part"))
        assert len(parts) == 1 and parts[0].stat().st_size > 0  # what came before the disk filled is kept
        filler.unlink()
        done = sync(fleet.cfg(), dev, model=fleet.model)
        assert done.status == "updated" and done.resumed == 1, done.to_dict()
        assert done.bytes_adapters + done.bytes_resumed_from == big.stat().st_size
        assert (dev / "a00.safetensors").read_bytes() == big.read_bytes()


def test_a_power_cut_on_storage_that_ignored_fsync_is_healed_by_the_next_sync(fleet, caplog):
    """What such storage can show after the power comes back: the sync state, TUF metadata and head cache torn to
    zeros, a partial download whose tail is zeros. Before, the torn state stopped every sync ("delete it to start
    over") until someone came to the device."""
    fleet.push()
    fleet.sync("dev")
    fleet.push([fleet.adapter(0, seed=40, nbytes=300_000)])

    def cut(n):
        raise KeyboardInterrupt("power cut mid-download")

    with pytest.raises(KeyboardInterrupt):
        fleet.sync("dev", on_chunk=cut)
    state = fleet.tmp / "dev" / ".edge-sync"
    (part,) = (state / "partial").glob("*.part")
    with open(part, "r+b") as f:  # the last bytes written never reached the flash
        f.seek(max(0, part.stat().st_size - 4096))
        f.write(b"\0" * 4096)
    torn = [state / "state.json", *(p for p in (state / "tuf").rglob("*.json") if p.is_file())]
    torn += [p for p in (state / "head").rglob("*") if p.is_file()]
    for p in torn:
        p.write_bytes(b"\0" * p.stat().st_size)
    with caplog.at_level(logging.WARNING, logger="edge.fleet"):
        rep = fleet.sync("dev")
    assert rep.status == "updated" and not rep.failed and not rep.refused, rep.to_dict()
    assert fleet.installed("dev") == {p.stem: p.read_bytes() for p in [fleet.tmp / "a00.safetensors", fleet.files[1]]}
    assert (state / "state.json.unreadable").exists() and "state.json was unreadable" in caplog.text
    fleet.assert_loadable("dev")
    assert fleet.sync("dev").status == "current"
