"""Fleet distribution: adapters published to an OCI registry (oras) and synced by devices, secured by TUF.

Host: :func:`init_release` (keys, TUF repository), :func:`push` (model once, adapters, a signed
release per channel), :func:`refresh_release` (re-sign before expiry), :func:`rotate_keys` (new
role keys and a root signed by the old and the new root key). Device: :func:`sync`
(verify, download only what changed, resume, install atomically), all of it within
:data:`DEFAULT_DEADLINE` seconds unless told otherwise (:mod:`edge.fleet.deadline`). Needs the ``fleet`` extra
(``oras``, ``tuf``, ``filelock``); imported lazily, so ``import edge.fleet`` costs nothing.
See :mod:`edge.fleet.oci` for the registry layout and media types.
"""

from __future__ import annotations

from edge.fleet.oci import (
    ANN,
    DEFAULT_DEADLINE,
    MEDIA,
    FleetConfig,
    FleetError,
    FleetSecurityError,
    RegistryUnreachableError,
)

__all__ = [
    "ANN",
    "DEFAULT_DEADLINE",
    "DeadlineExceededError",
    "MEDIA",
    "Expiry",
    "FleetConfig",
    "FleetError",
    "FleetSecurityError",
    "RegistryUnreachableError",
    "SyncReport",
    "init_release",
    "push",
    "refresh_release",
    "rotate_keys",
    "sync",
]

_LAZY = {
    "DeadlineExceededError": "edge.fleet.deadline",
    "Expiry": "edge.fleet.tufrepo",
    "SyncReport": "edge.fleet.device",
    "sync": "edge.fleet.device",
    "init_release": "edge.fleet.release",
    "push": "edge.fleet.publish",
    "refresh_release": "edge.fleet.release",
    "rotate_keys": "edge.fleet.release",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edge.fleet' has no attribute {name!r}")
