"""The files one device's sync keeps: its JSON state and plan, stamps and hashes of installed adapters, free space.

Shared by :mod:`edge.fleet.device`; nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from edge.fleet.oci import FleetError

__all__ = ["sig_path", "stamp", "free_bytes", "disk_reason", "sha256_file", "read_json", "write_json"]


def sig_path(path: Path) -> Path:
    return path.with_name(path.name + ".sig")  # as edge.format.signing.signature_path


def stamp(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def free_bytes(path: Path) -> int | None:
    st = os.statvfs(path) if hasattr(os, "statvfs") else None  # Windows: the write itself reports a full disk
    return st.f_bavail * st.f_frsize if st else None


def disk_reason(where: Path, e: OSError) -> str:
    fix = f"the disk is full ({e.strerror}); free space there" if e.errno == 28 else f"{e}; check that folder"
    return f"cannot write in {where}: {fix} and sync again (nothing was half-installed)"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise FleetError(f"sync state {path} is unreadable ({e}); delete it to start over") from e


def write_json(path: Path, data: dict) -> None:
    from edge.format.io import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(data, sort_keys=True, indent=1).encode())
