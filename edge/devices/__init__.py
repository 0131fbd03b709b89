"""Device profiles: what a target board runs, with which options, within which budgets.

A profile is one YAML file (``devices/NAME.yaml``) loaded into frozen dataclasses::

    profile = load_profile("jetson-orin-nano")          # by name, from the search path
    options = profile.backend_options("onnxruntime")    # runtimes.base.BackendOptions for this machine
    providers, warning = resolve_providers(profile, "onnxruntime", ["CPUExecutionProvider"])

Search path, first match wins: the ``--devices-dir`` folders (``search=``), then those in
``$EDGE_DEVICES`` (``os.pathsep``-separated), then the profiles shipped with the package. A user adds a
profile by dropping ``NAME.yaml`` into such a folder; its ``name`` must equal ``NAME``.

Validation names what is wrong and what is allowed: unknown keys, missing fields,
unknown backends, unknown providers (per backend) and, where the runtime documents
them, unknown provider options. Option names are the runtimes' own (onnxruntime's
provider options, LiteRT's delegate options); values are passed on as strings.

Fallback policy when a profile's provider is missing on this machine:
``error`` raises :class:`~edge.errors.BackendUnavailableError`; ``cpu`` drops the missing
providers (keeping the available ones, in order, with the backend's CPU provider last),
logs a warning, and the caller records the providers that actually ran.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Sequence
from pathlib import Path

from edge.devices.profile import (
    ARCHITECTURES,
    FALLBACKS,
    BackendPreference,
    Budgets,
    DeviceProfile,
    ProviderSpec,
    Tolerances,
    available_providers,
    backend_status,
    resolve_providers,
)
from edge.errors import ConfigError

__all__ = [
    "ARCHITECTURES",
    "FALLBACKS",
    "BackendPreference",
    "Budgets",
    "DeviceProfile",
    "ProviderSpec",
    "Tolerances",
    "available_providers",
    "backend_status",
    "check_fits",
    "list_profiles",
    "load_profile",
    "packaged_dir",
    "resolve_providers",
    "search_path",
    "this_machine",
]

log = logging.getLogger("edge.devices")

ENV_VAR = "EDGE_DEVICES"


# -- finding and loading -----------------------------------------------------------------------
def packaged_dir() -> Path | None:
    """The profiles shipped with the package: ``edge/devices/profiles`` when installed, ``devices/`` in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "profiles", here.parent.parent / "devices"):
        if cand.is_dir() and any(cand.glob("*.yaml")):
            return cand
    return None


def search_path(extra: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Folders searched for profiles, first match wins: ``extra``, then ``$EDGE_DEVICES``, then the packaged ones."""
    dirs = [Path(d) for d in extra]
    dirs += [Path(d) for d in os.environ.get(ENV_VAR, "").split(os.pathsep) if d]
    packaged = packaged_dir()
    if packaged is not None:
        dirs.append(packaged)
    seen, out = set(), []
    for d in dirs:  # a folder named twice (or $EDGE_DEVICES naming the shipped one) is searched and listed once
        key = os.path.realpath(d)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def list_profiles(search: Sequence[str | os.PathLike] | None = None) -> list[DeviceProfile]:
    """Every profile on the search path (sorted by name; a name found twice: the first folder wins)."""
    seen: dict[str, Path] = {}
    for d in search_path(search or ()):
        _check_folder(d)
        for f in _profile_files(d):
            seen.setdefault(f.stem, f)
    return [_load_file(seen[n]) for n in sorted(seen)]


def load_profile(
    name_or_path: str | os.PathLike | DeviceProfile, search: Sequence[str | os.PathLike] | None = None
) -> DeviceProfile:
    """A profile by name (looked up on :func:`search_path`) or by path to a YAML file."""
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    text = str(name_or_path)
    p = Path(text)
    if p.suffix in (".yaml", ".yml") or os.sep in text:
        if not p.is_file():
            from edge.format.paths import not_a

            raise ConfigError(
                f"device profile file {p} {not_a(p, 'a regular file')}; give a NAME.yaml file or a profile's name"
            )
        return _load_file(p)
    dirs = search_path(search or ())
    for d in dirs:
        _check_folder(d)
        f = d / f"{text}.yaml"
        if os.path.lexists(f):  # a folder, FIFO or broken link of that name is refused as such, not skipped
            return _load_file(f)
    known = sorted({f.stem for d in dirs for f in _profile_files(d)})
    yml = [str(d / f"{text}.yml") for d in dirs if os.path.lexists(d / f"{text}.yml")]  # only NAME.yaml is searched
    raise ConfigError(
        (f"{yml[0]} is not searched: rename it to {text}.yaml, or pass its path; " if yml else "")
        + f"unknown device profile {text!r}; known: {', '.join(known) or 'none'} "
        f"(searched {', '.join(map(str, dirs)) or 'nothing'}; add NAME.yaml to a folder in ${ENV_VAR} "
        "or --devices-dir)"
    )


def _check_folder(d: Path) -> None:
    """A folder on the search path that is not one (missing, a FIFO, a file...) is refused, naming what it is."""
    from edge.format.paths import require_folder

    require_folder(d, "device profile folder", f"give a folder of NAME.yaml files (from --devices-dir or ${ENV_VAR})")


MAX_PROFILE_BYTES = 1 << 20  # a profile is a page of YAML
MAX_PROFILES = 1000  # NAME.yaml files in one profile folder


def _profile_files(folder: Path) -> list[Path]:
    """The NAME.yaml files of a profile folder, sorted; a folder of a million entries is not listed whole."""
    from edge.format.io import folder_files

    return folder_files(folder, ".yaml", MAX_PROFILES, what="device profile folder", fix="keep one per device there")


def _load_file(path: Path) -> DeviceProfile:
    """Read one profile: bounded read, then the project's one YAML path (duplicate keys, aliases and depth limited)."""
    from edge.format.io import load_yaml, read_bounded

    data = load_yaml(
        read_bounded(path, MAX_PROFILE_BYTES, what="device profile"), source=f"cannot read device profile {path}"
    )
    from edge.devices.schema import from_dict

    try:
        profile = from_dict(data, source=path)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    if profile.name != path.stem:
        raise ConfigError(f"{path}: name {profile.name!r} differs from the file name; rename one so they match")
    return profile


def check_fits(model: str | os.PathLike, profile: DeviceProfile) -> None:
    """Refuse a model file larger than ``profile``'s ``budgets.memory_mb`` before any byte of it is read.

    Its weights alone (at least the file's size, less its graph) would exceed the budget, so no strategy can fit;
    the backends' own check (predicted footprint) comes only after they have read the weights into memory.
    A path that is not a regular file is left to the loader, which names it."""
    path = Path(model)
    if not path.is_file():
        return
    size_mb, budget = path.stat().st_size / 2**20, profile.budgets.memory_mb
    if size_mb > budget:
        raise ConfigError(
            f"{path.name} is {size_mb:.1f} MB on disk, over the memory budget of {budget:g} MB of device profile "
            f"{profile.name!r} (budgets.memory_mb): its weights alone would not fit; raise budgets.memory_mb, or "
            "load a smaller or quantized model"
        )


def this_machine() -> str:
    """``platform.machine()`` in the profiles' spelling (``arm64`` -> ``aarch64``, ``AMD64`` -> ``x86_64``)."""
    m = platform.machine()
    return {"arm64": "aarch64", "AMD64": "x86_64", "amd64": "x86_64"}.get(m, m)
