"""``edge release``: create the fleet's TUF repository, re-sign it before it expires, rotate its keys (host side).

``init_release`` creates the team's keys and TUF repository and publishes version 1 of its metadata;
``refresh_release`` re-signs snapshot and timestamp before they expire; ``rotate_keys`` publishes a root naming
new role keys. Each publishes through :class:`~edge.fleet.publish.Publisher` (TUF head last), bounded by
``timeout`` per connect and read and ``deadline`` in all, and commits the host's TUF state only once the head is
published, so a cut one is simply run again.
"""

from __future__ import annotations

from pathlib import Path

from edge.fleet.publish import DEADLINE, INLINE, TIMEOUT, Publisher
from edge.fleet.tufrepo import Expiry, TufRepo

__all__ = ["init_release", "refresh_release", "rotate_keys"]


def init_release(
    registry: str,
    repository: str,
    tuf_dir: str | Path,
    keys_dir: str | Path,
    *,
    bits: int = 5,
    insecure: bool = False,
    expiry: Expiry | None = None,
    inline: tuple[str, ...] = INLINE,
    timeout: float = TIMEOUT,
    deadline: float = DEADLINE,
) -> dict:
    """Keys (missing ones are created), TUF metadata version 1, published; returns where the root is."""
    pub = Publisher(registry, repository, insecure, inline, timeout, deadline, "release init")  # checks first
    try:
        repo, files = TufRepo.create(tuf_dir, keys_dir, bits=bits, expiry=expiry)
        pub.tuf_files(files, repo.root_version)
    finally:
        pub.close()
    repo.commit(files)
    return {
        "tuf_root": str(Path(tuf_dir) / "root.json"),
        "keys": str(keys_dir),
        "bins": 2**bits,
        "published": [f for f, _ in files],
        "repository": f"{registry}/{repository}/tuf",
    }


def refresh_release(
    registry: str,
    repository: str,
    tuf_dir: str | Path,
    keys_dir: str | Path,
    *,
    insecure: bool = False,
    expiry: Expiry | None = None,
    inline: tuple[str, ...] = INLINE,
    timeout: float = TIMEOUT,
    deadline: float = DEADLINE,
) -> dict:
    """Re-sign snapshot and timestamp with new expiry dates and publish them."""
    tuf = TufRepo.load(tuf_dir, keys_dir, expiry)
    files = tuf.stage_refresh()
    pub = Publisher(registry, repository, insecure, inline, timeout, deadline, "release refresh")
    try:
        head = pub.tuf_files(files, tuf.root_version, tuf.published(files))
    finally:
        pub.close()
    tuf.commit(files)
    return {
        "release": tuf.release,
        "tuf_head": head,
        "tuf_files": [f for f, _ in files],
        "expires": str(tuf._md["timestamp"].signed.expires),
    }


def rotate_keys(
    registry: str,
    repository: str,
    tuf_dir: str | Path,
    keys_dir: str | Path,
    roles: list[str] | tuple[str, ...] = ("root",),
    *,
    insecure: bool = False,
    expiry: Expiry | None = None,
    inline: tuple[str, ...] = INLINE,
    timeout: float = TIMEOUT,
    deadline: float = DEADLINE,
) -> dict:
    """New keys for ``roles`` and a root naming them, signed by the old and the new root key, published.

    Devices keep the ``tuf_root`` they were given: ngclient walks from it through every published
    root version, each one verified by its predecessor's keys, so no device needs a new image.
    """
    tuf = TufRepo.load(tuf_dir, keys_dir, expiry)
    files = tuf.stage_rotate(roles)
    pub = Publisher(registry, repository, insecure, inline, timeout, deadline, "release rotate")
    try:
        pub.tuf_files(files, tuf.root_version, tuf.published(files))
    finally:
        pub.close()
    retired = tuf.commit(files)
    return {
        "root_version": tuf.root_version,
        "rotated": sorted(set(roles)),
        "retired": [str(p) for p in retired],
        "release": tuf.release,
        "tuf_files": [f for f, _ in files],
    }
