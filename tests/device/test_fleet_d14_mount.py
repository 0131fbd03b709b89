"""The folders a device syncs into (helper D, session 14): a card that is not mounted is not recreated on the root
disk, and temp files of writes killed mid-way are swept under the sync lock, only ours."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge.format.io import sweep_stale_temps

_WRITER = (
    "import os, sys, tempfile\n"
    "tempfile.mkstemp(prefix=f'.{sys.argv[2]}.{os.getpid()}.', suffix='.tmp', dir=sys.argv[1])\n"
    "os._exit(0)  # gone before its rename, as a write killed mid-way\n"
)


def _killed_write(folder: Path, name: str) -> Path:
    """The temp file atomic_write_bytes would leave for ``name`` in ``folder`` if its process died mid-write."""
    before = set(folder.iterdir())
    subprocess.run([sys.executable, "-c", _WRITER, str(folder), name], check=True)
    (temp,) = set(folder.iterdir()) - before
    return temp


def _ours_alive(folder: Path, name: str) -> Path:
    path = folder / f".{name}.{os.getpid()}.abcd1234.tmp"  # a writer that still runs (this process)
    path.write_bytes(b"x")
    return path


def test_the_sweep_removes_only_temp_files_of_this_project_whose_writer_is_gone(tmp_path):
    stale = [_killed_write(tmp_path, "a00.safetensors"), _killed_write(tmp_path, "state.json")]
    kept = [_ours_alive(tmp_path, "a01.safetensors")]
    for name in ("notes.tmp", ".a00.safetensors.tmp", "a00.safetensors", ".x.123.tmp", ".x.1.abcdefgh.tmp.keep"):
        (tmp_path / name).write_bytes(b"user's")
        kept.append(tmp_path / name)
    folder = tmp_path / ".y.1.abcdefgh.tmp"  # a folder of that name is not ours to remove
    folder.mkdir()
    assert sorted(sweep_stale_temps(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in [*kept, folder]) and not any(p.exists() for p in stale)
    assert sweep_stale_temps(tmp_path / "missing") == []


# -- against a registry ---------------------------------------------------------------------------------------------

pytest.importorskip("oras", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("filelock", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

from _registry import SKIP_REASON, registry_binary  # noqa: E402
from test_fleet import REPO, Fleet  # noqa: E402

from edge.errors import ConfigError  # noqa: E402
from edge.fleet import sync  # noqa: E402

needs_registry = pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path, n=2, nbytes=6_000)
    yield f
    f.close()


@needs_registry
def test_a_sync_sweeps_temp_files_of_killed_writes_that_no_write_would_replace(fleet):
    """Before: a temp file was removed only when the same name was written again; an adapter withdrawn since, or a
    TUF file that did not change, kept its temp file (as large as the adapter) for ever."""
    fleet.push()
    fleet.sync("dev")
    dev, cache = fleet.tmp / "dev", fleet.tmp / "dev" / ".edge-sync"
    stale = [
        _killed_write(dev, "withdrawn.safetensors"),
        _killed_write(cache, "state.json"),
        _killed_write(cache / "tuf", "timestamp.json"),
        _killed_write(cache / "tuf" / "root_history", "2.root.json"),
    ]
    kept = [_ours_alive(dev, "a00.safetensors"), dev / "notes.tmp", dev / ".withdrawn.safetensors.tmp"]
    for p in kept[1:]:
        p.write_bytes(b"user's")
    assert fleet.sync("dev").status == "current"
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


@needs_registry
def test_a_missing_parent_of_the_adapter_folder_is_refused_unless_asked_to_create_it(fleet, capsys):
    """Before: mkdir(parents=True) recreated an unmounted card's folder on the root disk and synced into it."""
    from edge.cli import main

    fleet.push()
    card = fleet.tmp / "media" / "card"
    with pytest.raises(ConfigError, match="is the card or disk mounted") as e:
        sync(fleet.cfg(), card / "adapters", model=fleet.model)
    assert str(card) in str(e.value) and not (fleet.tmp / "media").exists()
    with pytest.raises(ConfigError, match="is the card or disk mounted"):  # a --cache on the card: the same
        sync(fleet.cfg(), fleet.tmp / "dev", model=fleet.model, cache_dir=card / "cache")
    assert not (fleet.tmp / "media").exists() and not (fleet.tmp / "dev").exists()

    base = ["sync", f"{fleet.reg.host}/{REPO}", "--insecure", "--tuf-root", str(fleet.tmp / "tuf" / "root.json")]
    base += ["--model", str(fleet.model), "--adapters", str(card / "adapters")]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is the card or disk mounted" in err and "--create-parents" in err, err
    assert not (fleet.tmp / "media").exists()
    assert main([*base, "--create-parents"]) == 0  # asked for: made, and synced into
    assert sorted(p.name for p in (card / "adapters").glob("*.safetensors")) == ["a00.safetensors", "a01.safetensors"]
    assert sync(fleet.cfg(), fleet.tmp / "first-run", model=fleet.model).status == "updated"  # its parent exists
