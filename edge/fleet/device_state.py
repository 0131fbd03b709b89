"""What a device keeps on disk between syncs, made to survive a power cut (device side, no torch).

- Folders: the adapter folder (and a ``--cache``) may be created, their missing parents only when asked
  (``create_parents``): a missing parent is most often a card or disk that is not mounted, and creating it would
  put the adapters on the root disk underneath the mount point.
- The sync state (``state.json``): per installed adapter its sha256 and release version, the floor no release may
  go below, beside the last verified plan (``plan.json``, with its source: registry, repository, channel, model
  fingerprint, adapter folder). Both are kept per adapter folder (:func:`device_slot`): in its own cache, or in a
  ``--cache`` devices share, under ``devices/<key>/``; floors hold across channels and mirrors of one folder. A
  state torn by a power cut (set aside by :func:`~edge.fleet.device_files.read_json`) or deleted is rebuilt from
  what the disk still proves: an installed file whose sha256 is a target of the last verified plan
  (``plan.json``) or of TUF's trusted metadata (``tuf/``, read before the refresh replaces it) gets that target's
  version back, the highest if several name it; a file nothing names gets no floor and is downloaded again.
- TUF's trusted metadata: python-tuf 7 writes it with a temp file and a rename but no fsync, so storage that
  reorders writes can show an empty trusted root or timestamp after a cut. ngclient has no public hook for how it
  persists; :func:`durable_updater` overrides its one private writer, ``Updater._persist_file(filename, data)``,
  with :func:`edge.format.io.atomic_write_bytes` (fsync of the file, then of its folder), and refuses to run if a
  python-tuf release no longer has it. The root the device is given (``tuf_root``) is checked first: a torn one is
  a :class:`~edge.errors.ConfigError` naming it and the fix, not a rejected release.
- Temp files of writes killed mid-way, swept under the sync lock (:func:`sweep`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from edge.errors import ConfigError, FormatError
from edge.fleet.device_files import log, read_json, sha256_file, sig_path, stamp, write_json
from edge.fleet.oci import FleetError
from edge.fleet.slot_id import SLOT_ID, device_slot, real_folder  # noqa: F401 (SLOT_ID: kept importable here)

__all__ = [
    "prepare_folders",
    "device_slot",
    "other_plans",
    "source_mismatch",
    "load_state",
    "durable_updater",
    "check_root",
    "sweep",
]

MIGRATED = "migrated.json"  # in a slot: the one-per-cache state was read for it once, never again
MAX_METADATA_BYTES = 5_000_000  # ngclient's targets_max_length: no bin this device verified was larger
_TARGET = re.compile(r"^[^/]+/(?P<fp>[0-9a-f]{16,64})/(?P<name>[^/]+)\.safetensors(?P<sig>\.sig)?$")


def prepare_folders(adapter_dir: Path, cache: Path, create_parents: bool) -> None:
    """Create the adapter folder, the cache and its sub-folders; a missing parent only with ``create_parents``."""
    for folder in (adapter_dir, cache):  # all checked before anything is made
        parent = folder.parent
        if not create_parents and not folder.is_dir() and not parent.is_dir() and parent != adapter_dir:
            from edge.format.paths import kind

            if (found := kind(parent)) is not None:  # a file in the way: no mount or --create-parents helps
                raise ConfigError(f"{parent} is {found}, not a folder, so {folder} cannot be made in it; give a folder")
            raise ConfigError(
                f"{parent} does not exist, so {folder} cannot be made in it: is the card or disk mounted? "
                "Mount it, or pass --create-parents (sync(create_parents=True)) to create the missing folders"
            )
    try:
        for folder in (adapter_dir, cache):
            folder.mkdir(parents=create_parents, exist_ok=True)
        for sub in ("tuf", "blobs", "partial", "head", "devices"):
            real_folder(cache / sub, make=sub not in ("head", "devices"))
    except OSError as e:  # a file in the way, no permission, a read-only or full disk
        from edge.format.paths import kind

        found = kind(e.filename) if e.filename else None
        why = f"it is {found}, not a folder" if found not in (None, "a folder") else e.strerror
        raise ConfigError(f"cannot use {e.filename} as a sync folder: {why}; give a writable folder") from e


def other_plans(cache: Path, slot: Path) -> list[Path]:
    """The other adapter folders' ``plan.json`` in a shared cache (and one from before plans were per folder)."""
    import os

    try:
        keys = sorted(os.listdir(cache / "devices"))[:10_000]
    except OSError:
        keys = []
    found = [cache / "plan.json", *(cache / "devices" / k / "plan.json" for k in keys)]
    return [p for p in found if p != slot / "plan.json" and p.exists()]


def source_mismatch(plan: dict, wanted: dict, own: bool = False) -> str | None:
    """How a cached plan's ``source`` differs from this sync's (registry, repository, channel, fingerprint,
    adapters), or None when it is this sync's. A plan from before sources were recorded is this sync's only in the
    folder's ``own`` cache (no other folder writes there) and when every target is of this channel and model."""
    recorded = plan.get("source")
    if recorded is None and own:
        prefix = f"{wanted['channel']}/{wanted['fingerprint'].split(':')[-1]}/"
        if all(t["path"].startswith(prefix) for t in plan["targets"].values()):
            return None
    if not isinstance(recorded, dict):
        return "from before sync recorded its source (registry, channel, model): the next online sync replaces it"
    for key, value in wanted.items():  # "adapters" names the folder for people: the slot already is this folder's
        if key != "adapters" and recorded.get(key) != value:
            return f"for {key} {str(recorded.get(key))[:120]!r}, not this sync's {value[:120]!r}"
    return None


def load_state(slot: Path, adapter_dir: Path, cache: Path | None = None) -> dict:
    """``state.json`` in ``slot``; when there is none (first sync, torn, deleted), the floors the files on disk prove.

    In a shared ``cache``, a ``state.json`` of the layout before floors were kept per adapter folder (one for the
    whole cache) is migrated once per slot (``migrated.json`` marks it: deleting ``state.json`` later starts the
    floors again from the files): a folder holding at least one file the old state names keeps the old version as
    the floor of every name it has a file of (whatever its bytes now), and of the other names as floors only
    (``floors``: not installed, so prune and stale never name them) when no other slot exists (the old cache most
    likely had one device); a folder with none of its files gets none.
    The old ``state.json`` and ``plan.json`` are then renamed ``*.migrated`` (read by the other folders' first
    migrations, no longer keeping blobs from cleanup)."""
    state = read_json(slot / "state.json")
    shared = cache is not None and cache != slot
    first = shared and not os.path.lexists(slot / MIGRATED)  # a slot never having had a state: migrated once
    if state is None:
        legacy = _legacy(cache) if first else None
        state = {"adapters": _rebuild(slot, adapter_dir, cache, legacy)}
        if state["adapters"]:
            found = ", ".join(f"{n} {e['version']}" for n, e in sorted(state["adapters"].items()))
            log.warning("sync state rebuilt from the files on disk and the verified metadata: %s", found[:400])
        if legacy is not None:
            _migrated(slot, adapter_dir, cache, legacy, state)
        if state["adapters"] or state.get("floors"):  # saved now: the refresh about to run replaces the proof
            write_json(slot / "state.json", state)
        if legacy is not None:
            _retire(cache)
    if first:
        write_json(slot / MIGRATED, {"migrated": True})
    if not isinstance(state, dict) or not isinstance(state.get("adapters"), dict):
        raise FleetError(f"sync state {slot / 'state.json'} is not a sync state; delete it to start over")
    return state


def _legacy(cache: Path):
    for name in ("state.json", "state.json.migrated"):
        if (old := read_json(cache / name, aside=False)) is not None:
            return old
    return None


def _migrated(slot: Path, adapter_dir: Path, cache: Path, legacy, state: dict) -> None:
    """Floors of the one-per-cache ``state.json`` (see :func:`load_state`), never below what the files prove."""
    old = legacy.get("adapters") if isinstance(legacy, dict) else None
    old = old if isinstance(old, dict) else {}
    old = {n: e for n, e in old.items() if isinstance(e, dict) and _rows(f"c/{'0' * 16}/{n}.safetensors", e)}
    held = {n for n in old if os.path.lexists(adapter_dir / f"{n}.safetensors")}
    try:  # the first folder to migrate, no other slot: the old cache most likely had one device
        alone = [k for k in os.listdir(cache / "devices") if k != slot.name] == []
    except OSError:
        alone = False
    out, floors, kept, only = state["adapters"], state.setdefault("floors", {}), [], []
    for name, e in sorted(old.items()) if held else []:  # a folder with none of its files was not that device
        if name not in held and not alone:  # another folder's adapter, most likely
            continue
        if name not in held:  # no file: a floor only (not installed: prune and stale do not name it)
            floors[name] = {"version": e["version"]} | (
                {"fingerprint": e["fingerprint"]} if isinstance(e.get("fingerprint"), str) else {}
            )
            only.append(f"{name} {e['version']}")
            continue
        if name in out and out[name]["version"] >= e["version"]:
            continue
        length = e.get("length") if isinstance(e.get("length"), int) else 0
        entry = out.get(name) or {"sha256": e["sha256"], "length": length}
        entry |= {k: e[k] for k in ("fingerprint", "sig") if isinstance(e.get(k), str) and k not in entry}
        out[name] = entry | {"version": e["version"]}
        kept.append(f"{name} {e['version']}")
    if not floors:
        del state["floors"]
    if kept or only:
        log.warning(
            "version floors kept from the one-per-cache state.json of %s, which names files this folder holds: %s%s",
            cache,
            ", ".join(kept)[:300] or "none installed",
            f"; floors only (no file here, nothing installed): {', '.join(only)[:300]}" if only else "",
        )


def _retire(cache: Path) -> None:
    """Rename the one-per-cache ``state.json``/``plan.json`` ``*.migrated``: their blobs are no longer kept."""
    import os

    for name in ("state.json", "plan.json"):
        try:
            os.replace(cache / name, cache / f"{name}.migrated")
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot rename %s to %s.migrated: %s", cache / name, name, e.strerror)


def _rebuild(slot: Path, adapter_dir: Path, cache: Path | None, legacy) -> dict:
    proofs: dict[str, list[dict]] = {}
    old = legacy.get("adapters") if isinstance(legacy, dict) else None
    for name, e in (old if isinstance(old, dict) else {}).items():
        if isinstance(e, dict) and _rows("c/" + "0" * 16 + f"/{name}.safetensors", e):  # typed as sync writes it
            fp = e.get("fingerprint") if isinstance(e.get("fingerprint"), str) else None
            proofs.setdefault(name, []).append(
                {"sha256": e["sha256"], "version": e["version"], "fingerprint": fp, "sig": e.get("sig")}
            )
    for source in _verified_targets(slot, cache if cache is not None else slot):
        sigs = {(fp, name): sha for fp, name, sha, _, is_sig in source if is_sig}
        for fp, name, sha, version, is_sig in source:
            if not is_sig:
                proof = {"sha256": sha, "version": version, "fingerprint": f"sha256:{fp}", "sig": sigs.get((fp, name))}
                proofs.setdefault(name, []).append(proof)
    out = {}
    for path in sorted(adapter_dir.glob("*.safetensors")) if proofs else []:
        name = path.name[: -len(".safetensors")]
        if name not in proofs or not path.is_file():
            continue
        try:
            st, sha = path.stat(), sha256_file(path)
        except (OSError, FormatError):
            continue
        best = max((p for p in proofs[name] if p["sha256"] == sha), key=lambda p: p["version"], default=None)
        if best is None:
            continue
        entry = {"sha256": sha, "version": best["version"], "length": st.st_size}
        entry |= {"fingerprint": best["fingerprint"]} if best["fingerprint"] else {}
        sig = sig_path(path)
        try:
            if best["sig"] and sig.is_file() and sha256_file(sig) == best["sig"]:
                entry["sig"] = best["sig"]
        except (OSError, FormatError):
            pass
        out[name] = entry | {"stamp": stamp(st)}
    return out


def _verified_targets(slot: Path, cache: Path):
    """Per source (the last plan, each targets file of TUF's trusted set): ``(fp, name, sha256, version, is_sig)``."""
    plan = read_json(slot / "plan.json")
    if isinstance(plan, dict) and isinstance(plan.get("targets"), dict):
        rows = []
        for t in plan["targets"].values():
            rows += _rows(t.get("path"), t) if isinstance(t, dict) else []
            sig = t.get("sig") if isinstance(t, dict) else None
            if isinstance(sig, dict) and isinstance(t.get("path"), str):
                rows += _rows(t["path"] + ".sig", sig)
        yield rows
    from tuf.api.exceptions import RepositoryError
    from tuf.api.metadata import Metadata, Targets

    from edge.format.io import read_bounded

    for path in sorted((cache / "tuf").glob("*.json")):
        if path.is_symlink() or path.name in ("root.json", "timestamp.json", "snapshot.json"):
            continue
        try:
            signed = Metadata.from_bytes(read_bounded(path, MAX_METADATA_BYTES, what="TUF metadata")).signed
        except (FormatError, RepositoryError):  # torn: it proves nothing
            continue
        if isinstance(signed, Targets):
            yield [
                r
                for p, tf in signed.targets.items()
                for r in _rows(p, {**_custom(tf), "sha256": tf.hashes.get("sha256")})
            ]


def _custom(tf) -> dict:
    return tf.custom if isinstance(tf.custom, dict) else {}


def _rows(path, t: dict) -> list[tuple]:
    m = _TARGET.match(path) if isinstance(path, str) else None
    v, sha = t.get("version", 0), t.get("sha256")
    if not m or isinstance(v, bool) or not isinstance(v, int) or not isinstance(sha, str):
        return []
    return [(m["fp"], m["name"], sha, v, bool(m["sig"]))]


_DURABLE = None


def durable_updater():
    """python-tuf's ``Updater``, every metadata file it persists written through ``atomic_write_bytes``."""
    global _DURABLE
    if _DURABLE is None:
        import inspect

        import tuf
        from tuf.ngclient import Updater

        from edge.format.io import atomic_write_bytes

        hook = getattr(Updater, "_persist_file", None)
        if not callable(hook) or list(inspect.signature(hook).parameters) != ["self", "filename", "data"]:
            raise FleetError(
                f"python-tuf {tuf.__version__} no longer writes its metadata through Updater._persist_file(filename, "
                "data), which edge sync overrides to fsync it: install python-tuf 7 (pip install 'tuf>=7,<8')"
            )

        class DurableUpdater(Updater):
            def _persist_file(self, filename: str, data: bytes) -> None:
                if _same_bytes(filename, data):  # the bootstrap root, persisted again by every sync: no flash write
                    return
                atomic_write_bytes(filename, data)  # temp file, fsync, rename, fsync of the folder

        _DURABLE = DurableUpdater
    return _DURABLE


def _same_bytes(path: str, data: bytes) -> bool:
    from edge.format.io import open_regular

    try:
        fd, st = open_regular(path)  # a FIFO in its place cannot hang sync
    except FormatError:
        return False
    try:
        with open(fd, "rb") as f:
            return st.st_size == len(data) and f.read(len(data) + 1) == data
    except OSError:  # unreadable: written again
        return False


def check_root(data: bytes, path) -> None:
    """The device's trusted root must at least be root metadata: a torn one is named, with the fix."""
    from tuf.api.exceptions import RepositoryError
    from tuf.api.metadata import Metadata, Root

    fix = "copy root.json from the host's `edge release init` folder (--tuf-dir) back to it"
    try:
        signed = Metadata.from_bytes(data).signed
    except RepositoryError as e:
        why = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise ConfigError(f"the TUF root this device trusts, {path}, is not TUF metadata ({why}; torn?): {fix}") from e
    if not isinstance(signed, Root):
        raise ConfigError(f"the TUF root this device trusts, {path}, is {signed.type} metadata, not root: {fix}")


def sweep(adapter_dir: Path, cache: Path) -> None:
    """Remove this project's temp files left by killed writes (``.NAME.PID.XXXXXXXX.tmp`` of a dead PID)."""
    from edge.format.io import sweep_stale_temps

    for folder in (adapter_dir, cache, cache / "tuf", cache / "tuf" / "root_history", cache / "head"):
        for path in sweep_stale_temps(folder):
            log.info("removed %s, left by a write that was killed", path)
