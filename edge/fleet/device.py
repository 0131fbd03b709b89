"""``edge sync``: bring a device's adapter folder to the release its channel names (device side, no torch).

One sync, under a file lock on the adapter folder (concurrent syncs of one device serialise):

1. TUF (python-tuf ngclient, metadata read from the registry by :mod:`edge.fleet.tuf_oci`):
   refresh root -> timestamp -> snapshot -> targets, verifying signatures, versions (no rollback)
   and expiry, starting from the device's ``tuf_root``. A release costs one head manifest, which
   carries it as a delta against the metadata this device already holds (plus the bundle blob for
   a device further behind); a poll with nothing new is one HTTP 304; unchanged hash bins come from
   the cache.
2. The targets under ``<channel>/<model fingerprint>/`` are this device's adapters. One whose
   sha256 equals the installed file's is left alone; one whose release version is lower than the
   installed one is refused.
3. Each changed adapter is downloaded by digest into ``<cache>/partial`` (resumed with an HTTP
   Range after a cut), checked against its TUF length and sha256, then loaded with
   ``edge.load_adapter`` (format) and matched to the model fingerprint (and, given the model file,
   to its tensors), and only then written into the adapter folder: temp file, fsync, rename. Every
   file in the folder is at all times a complete, verified adapter, so a running ``Runtime`` can
   load any of them; a signed one is always beside a signature that verifies it (the new signature
   carries the old one until the adapter is replaced: ``edge.format.signing.with_previous``).
4. When the registry does not answer, the last verified plan (cached, with its expiry) is
   completed from blobs already downloaded; nothing unverified or expired is installed.

The whole sync, waiting for another one included, ends by ``config.deadline`` (:mod:`edge.fleet.deadline`):
however slowly a registry sends, it stops with exit 1 (``offline``; ``partial`` once adapters were downloading) and
keeps what it downloaded for the next sync.

What sync keeps on disk (its state, TUF's trusted metadata, the folders) and how a power cut is healed:
:mod:`edge.fleet.device_state`. The report (:class:`SyncReport`, ``edge sync --json``) says what was installed,
kept, refused and why, and how many bytes moved.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from edge.errors import AdapterMismatchError, ConfigError, FormatError, SignatureError, WriteError
from edge.fleet import blobstore
from edge.fleet.deadline import Deadline
from edge.fleet.deadline import client as bounded_client
from edge.fleet.device_files import disk_reason as _disk_reason
from edge.fleet.device_files import locked as _locked
from edge.fleet.device_files import read_plan as _read_plan
from edge.fleet.device_files import sane_state as _sane_state
from edge.fleet.device_files import sha256_file as _sha256
from edge.fleet.device_files import sig_path as _sig_path
from edge.fleet.device_files import stamp as _stamp
from edge.fleet.device_files import write_json as _write_json
from edge.fleet.device_state import (
    check_root,
    device_slot,
    durable_updater,
    load_state,
    other_plans,
    prepare_folders,
    source_mismatch,
    sweep,
)
from edge.fleet.oci import (
    FleetConfig,
    FleetError,
    FleetSecurityError,
    OciClient,
    RegistryUnreachableError,
    check_name,
    fp_hex,
    require_fleet,
)

__all__ = ["SyncReport", "sync", "STATE_DIR"]

STATE_DIR = ".edge-sync"  # inside the adapter folder: state.json, plan.json, tuf/, head/, blobs/, partial/
# a --cache elsewhere (shared by devices): state.json and plan.json per adapter folder, in devices/<key>/ (device_slot)


@dataclass
class SyncReport:
    """What one ``sync`` did. ``status``: updated | current | offline | partial | rejected."""

    status: str = "current"
    registry: str = ""
    channel: str = ""
    fingerprint: str = ""
    release: int | None = None
    installed: list[dict] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # installed for another model: kept unless prune (a Runtime refuses)
    refused: list[dict] = field(default_factory=list)  # security: tampered, older, expired, wrong base...
    failed: list[dict] = field(default_factory=list)  # transient: network cut (resumable)
    reason: str = ""
    head: str = ""  # how the TUF head came: not-modified (304), delta, inline, cached or blob (see tuf_oci)
    bytes_metadata: int = 0  # HTTP bodies: TUF head, bundle and metadata files, manifests
    bytes_adapters: int = 0  # HTTP bodies: adapter and signature blobs
    bytes_headers: int = 0  # HTTP response status lines and headers (approximate), every request
    requests: int = 0
    resumed: int = 0  # downloads continued from a partial file with an HTTP Range
    bytes_resumed_from: int = 0  # bytes those downloads already had on disk (not moved again)
    seconds: float = 0.0

    @property
    def bytes_total(self) -> int:
        return self.bytes_metadata + self.bytes_adapters

    def to_dict(self) -> dict:
        return asdict(self) | {"bytes_total": self.bytes_total}


def sync(
    config: FleetConfig,
    adapter_dir: str | Path,
    *,
    fingerprint: str | None = None,
    model: str | Path | None = None,
    cache_dir: str | Path | None = None,
    prune: bool = False,
    trusted_keys: list | None = None,
    on_chunk=None,
    create_parents: bool = False,
) -> SyncReport:
    """Sync ``adapter_dir`` to ``config.channel`` for one model (``fingerprint`` or the ``model`` file).

    With ``trusted_keys`` (the profile's Ed25519 public keys, as for ``Runtime``), an adapter is
    installed only with a detached signature by one of them (published beside it by ``edge push``),
    so a runtime that requires signatures can load everything sync installs. A missing parent of ``adapter_dir``
    or ``cache_dir`` (a card that is not mounted?) is refused unless ``create_parents``.
    """
    require_fleet()
    from filelock import Timeout

    t0 = time.perf_counter()
    info = None
    if model is not None:
        from runtimes import read_model_info

        info = read_model_info(model)
        if fingerprint is not None and fingerprint != info.fingerprint:
            raise ConfigError(f"--fingerprint {fingerprint} differs from the model's {info.fingerprint}")
        fingerprint = info.fingerprint
    if fingerprint is None:
        raise ConfigError("sync needs the device model: give its file (model=...) or its fingerprint")
    fp_hex(fingerprint)
    if config.tuf_root is None:
        raise ConfigError("sync needs the TUF root the device trusts (tuf_root: path of root.json from the host)")
    adapter_dir = Path(adapter_dir)
    cache = Path(cache_dir) if cache_dir else adapter_dir / STATE_DIR
    prepare_folders(adapter_dir, cache, create_parents)
    own = cache.resolve() == (adapter_dir / STATE_DIR).resolve()  # the folder's own cache, not a shared --cache
    report = SyncReport(
        registry=f"{config.registry}/{config.repository}", channel=config.channel, fingerprint=fingerprint
    )
    try:
        with Deadline(config.deadline) as deadline:  # the whole sync, waiting for another one included
            with (
                _locked(adapter_dir / ".edge-sync.lock", deadline.remaining()),
                _locked(cache / ".lock", deadline.remaining()),  # a shared --cache: one sync at a time
            ):
                sweep(adapter_dir, cache)  # temp files of killed writes: no other sync can be writing now
                s = _Sync(config, adapter_dir, cache, device_slot(adapter_dir, cache, own), fingerprint, info, report)
                s.hook, s.source["adapters"] = on_chunk, "." if own else str(adapter_dir.resolve())
                if trusted_keys is not None:
                    from edge.format.signing import load_public_key

                    s.trusted = [load_public_key(k) for k in trusted_keys]
                s.run(prune, deadline)
    except Timeout as e:  # cut by its deadline as any other wait is: offline, exit 1 (README, edge sync)
        report.status = "offline"
        report.reason = (
            f"another sync is running (it holds {e.lock_file}); this one waited {time.perf_counter() - t0:.0f} s, "
            "until its deadline (--deadline): try again later"
        )
    report.seconds = round(time.perf_counter() - t0, 4)
    return report


class _Sync:
    def __init__(self, config: FleetConfig, adapter_dir: Path, cache: Path, slot: Path, fp: str, info, report):
        self.cfg, self.dir, self.cache, self.slot, self.fp, self.info = config, adapter_dir, cache, slot, fp, info
        self.r, self.hook = report, None
        self.source = {"registry": config.registry, "repository": config.repository, "channel": config.channel}
        self.source["fingerprint"] = fp
        self.state = load_state(slot, adapter_dir, cache)  # rebuilt, if torn, from what the disk still proves
        if not _sane_state(self.state, slot / "state.json"):  # entries of another shape: set aside, rebuilt
            self.state = load_state(slot, adapter_dir, cache)
        self.trusted: list[bytes] | None = None
        self.others: set[str] | None = None  # the blobs other folders' plans want (read at the first install)

    # -- the four steps ---------------------------------------------------------------------------------------
    def run(self, prune: bool, deadline: Deadline) -> None:
        from edge.fleet.tuf_oci import OciMetadataFetcher

        meta_client = bounded_client(self.cfg.base_url, self.cfg.tuf_repository, self.cfg.timeout, deadline)
        blob_client = bounded_client(self.cfg.base_url, self.cfg.repository, self.cfg.timeout, deadline)
        fetcher = OciMetadataFetcher(meta_client, self.cache / "head", self.cache / "tuf")
        try:
            try:
                plan = self._verified_plan(fetcher)
            except RegistryUnreachableError as e:
                self.r.reason = str(e)
                self._offline()
                return
            except FleetSecurityError as e:
                self.r.status, self.r.reason = "rejected", str(e)
                return
            finally:
                self.r.bytes_metadata, self.r.head = meta_client.bytes_in, fetcher.head_source
            _write_json(self.slot / "plan.json", plan | {"source": self.source})
            self._apply(plan, blob_client, prune)
        finally:
            self.r.bytes_adapters = blob_client.bytes_in
            self.r.bytes_headers = meta_client.header_bytes_in + blob_client.header_bytes_in
            self.r.requests = meta_client.requests_made + blob_client.requests_made
            meta_client.close()
            blob_client.close()

    def _verified_plan(self, fetcher) -> dict:
        """TUF refresh, then this device's targets: ``{"release", "expires", "targets": {name: {...}}}``."""
        from tuf.api import exceptions as tx
        from tuf.api.metadata import Metadata

        from edge.fleet.tuf_oci import METADATA_BASE_URL, bin_probe_paths
        from edge.format.io import read_bounded

        # a regular file of at most ngclient's root_max_length: a FIFO or /dev/zero given as the root cannot hang sync
        root = read_bounded(self.cfg.tuf_root, 512_000, what="TUF root (root.json from `edge release init`)")
        check_root(root, self.cfg.tuf_root)
        meta_dir = self.cache / "tuf"
        try:
            up = durable_updater()(str(meta_dir), METADATA_BASE_URL, fetcher=fetcher, bootstrap=root)
            up.refresh()
            top = Metadata.from_file(str(meta_dir / "targets.json")).signed
            succinct = top.delegations.succinct_roles if top.delegations else None
            if succinct is None:
                raise FleetSecurityError("the fleet's targets metadata has no hash-bin delegation")
            prefix = f"{self.cfg.channel}/{fp_hex(self.fp)}/"
            expires = [
                Metadata.from_file(str(meta_dir / f"{n}.json")).signed.expires for n in ("timestamp", "snapshot")
            ]
            expires.append(top.expires)
            targets = {}
            for role, probe in bin_probe_paths(succinct).items():
                up.get_targetinfo(probe)  # loads and verifies the bin (cached when unchanged)
                signed = Metadata.from_file(str(meta_dir / f"{role}.json")).signed
                expires.append(signed.expires)
                for path in signed.targets:
                    if path.startswith(prefix):
                        tf = up.get_targetinfo(path)  # the verified TargetFile, from ngclient's trusted set
                        if tf is None:  # listed in a bin it does not hash to: ngclient looks for it elsewhere
                            raise FleetSecurityError(f"bin {role} lists {path[:120]}, a path of another bin")
                        targets[path] = tf
            snapshot = Metadata.from_file(str(meta_dir / "snapshot.json")).signed.version
        except RegistryUnreachableError:
            raise
        except tx.DownloadError as e:
            if fetcher.unreachable is not None:
                raise fetcher.unreachable from e
            if isinstance(e, tx.DownloadHTTPError) and e.status_code == 404:
                where = f"{self.cfg.registry}/{self.cfg.tuf_repository}"
                if fetcher.head_read:  # the head is there: a file it names is not (a mirror or GC lost it)
                    raise FleetError(f"the TUF metadata in {where} is incomplete: {e}; push a release again") from e
                fix = "has the host run `edge release init` and `edge push`?"
                raise FleetError(f"no TUF metadata in {where} ({e}); {fix}") from e
            raise FleetSecurityError(f"TUF metadata download refused: {type(e).__name__}: {e}") from e
        except (tx.RepositoryError, FleetSecurityError) as e:
            raise FleetSecurityError(f"TUF verification failed: {type(e).__name__}: {e}") from e
        except OSError as e:  # a full or read-only disk: the head cache, ngclient saving what it verified
            if isinstance(e, WriteError) or e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise WriteError(_disk_reason(meta_dir, e)) from e
            raise FleetError(f"cannot read the TUF metadata cache in {meta_dir}: {e}") from e
        except ValueError as e:  # the registry's metadata, not the disk (the cache holds only what ngclient verified)
            raise FleetSecurityError(f"TUF metadata refused: {type(e).__name__}: {str(e)[:200]}") from e
        self.r.release = int(snapshot)
        out: dict[str, dict] = {}
        for path, tf in sorted(targets.items()):  # "x.safetensors" sorts before "x.safetensors.sig"
            v = (tf.custom if isinstance(tf.custom, dict) else {}).get("version", 0)
            if isinstance(v, bool) or not isinstance(v, int):  # signed, yet no release number: refuse, never crash
                raise FleetSecurityError(f"TUF target {path[:120]} carries version {str(v)[:40]!r}, not an integer")
            entry = {"length": tf.length, "sha256": tf.hashes.get("sha256", ""), "version": v}
            rest = path[len(prefix) :]
            if rest.endswith(".safetensors"):
                out[rest[: -len(".safetensors")]] = entry | {"path": path}
            elif rest.endswith(".safetensors.sig") and rest[: -len(".safetensors.sig")] in out:
                out[rest[: -len(".safetensors.sig")]]["sig"] = entry  # its detached Ed25519 signature
        return {"release": int(snapshot), "expires": min(expires).isoformat(), "targets": out}

    def _apply(self, plan: dict, client: OciClient | None, prune: bool) -> None:
        installed = self.state["adapters"]
        for name, t in sorted(plan["targets"].items()):
            try:  # a signed path such as ../x or /x must never name a file outside the adapter folder
                check_name("adapter name", name)
            except ConfigError as e:
                self._refuse(name[:80], f"target path refused: {e}")
                continue
            have = installed.get(name)
            sig = t.get("sig", {}).get("sha256")
            if have and have["sha256"] == t["sha256"] and have.get("sig") == sig and self._present(name, have):
                self.r.unchanged.append(name)
                continue
            # floors hold across channels and mirrors of one folder: a channel switch or a stale mirror never downgrades
            floor, was = have or self.state.get("floors", {}).get(name), "installed" if have else "migrated floor"
            if floor and floor.get("fingerprint", self.fp) == self.fp and t["version"] < floor["version"]:
                self._refuse(name, f"release version {t['version']} is older than the {was} {floor['version']}")
                continue
            try:
                blob = blobstore.fetch(self.cache, name, t, client, self.r, self.hook)
                sig_ok = "sig" in t and blobstore.cached(_sig_path(blob), t["sig"]["sha256"], int(t["sig"]["length"]))
                if "sig" in t and not sig_ok:  # beside its blob already when an earlier install failed
                    sig_blob = blobstore.fetch(self.cache, f"{name} (signature)", t["sig"], client, self.r, self.hook)
                    os.replace(sig_blob, _sig_path(blob))
                elif (
                    "sig" not in t
                ):  # one left by an earlier install of a signed target with these bytes is not this release's
                    blobstore.drop(_sig_path(blob), quiet=True)
                self._check_adapter(name, blob)
            except RegistryUnreachableError as e:
                self.r.failed.append({"name": name, "reason": str(e)})
                client = None  # the registry is gone: finish from the cache only
                continue
            except (FleetSecurityError, FormatError, AdapterMismatchError, SignatureError) as e:
                self._refuse(name, str(e))
                continue
            except FleetError as e:  # the registry answered with an error (HTTP 5xx...): retry on the next sync
                self.r.failed.append({"name": name, "reason": str(e)})
                continue
            except OSError as e:  # disk full, read-only: the partial download stays, to resume once there is room
                self.r.failed.append({"name": name, "reason": _disk_reason(self.cache, e) if e.errno else str(e)})
                continue
            try:
                self._install(name, t, blob)
            except OSError as e:  # WriteError included: the old file is unchanged, the verified blob kept
                self.r.failed.append({"name": name, "reason": _disk_reason(self.dir, e)})
            except FormatError as e:  # the verified blob or signature swapped since (a FIFO, a longer file)
                self._refuse(name, str(e))
        # left by an older release: what no device's plan in this cache wants (another's partial downloads stay)
        blobstore.clean(self.cache, blobstore.plans_wanting(self.cache, plan, other_plans(self.cache, self.slot)))
        if prune:
            for name in sorted(set(installed) - set(plan["targets"])):
                (self.dir / f"{name}.safetensors").unlink(missing_ok=True)
                _sig_path(self.dir / f"{name}.safetensors").unlink(missing_ok=True)
                del installed[name]
                self.r.removed.append(name)
                _write_json(self.slot / "state.json", self.state)
        self.r.stale = sorted(n for n, e in installed.items() if e.get("fingerprint", self.fp) != self.fp)
        offline = self.r.status == "offline"
        if self.r.refused:
            self.r.status = "rejected"
            self.r.reason = self.r.reason or "; ".join(f"{x['name']}: {x['reason']}" for x in self.r.refused)
        elif not offline and self.r.failed:
            self.r.status = "partial"
        elif not offline and (self.r.installed or self.r.removed):
            self.r.status = "updated"

    def _offline(self) -> None:
        """Registry unreachable: complete the last verified plan from downloaded blobs, if it has not expired."""
        self.r.status = "offline"
        plan = _read_plan(self.slot / "plan.json")
        if not plan:
            self.r.reason += "; no verified release in the cache yet"
            return
        if (other := source_mismatch(plan, self.source, own=self.slot == self.cache)) is not None:
            self.r.reason += f"; the cached release is {other}, nothing installed from it"
            return
        if datetime.fromisoformat(plan["expires"]) <= datetime.now(timezone.utc):
            self.r.reason += f"; the cached release expired at {plan['expires']}, nothing installed from it"
            return
        self.r.release = plan["release"]
        self._apply(plan, None, prune=False)

    # -- helpers ----------------------------------------------------------------------------------------------
    def _present(self, name: str, have: dict) -> bool:
        """The installed file is still the one sync wrote: same stat, else same sha256 (a file swapped in is not)."""
        path = self.dir / f"{name}.safetensors"
        try:
            st = path.stat()
            return st.st_size == have["length"] and (_stamp(st) == have.get("stamp") or _sha256(path) == have["sha256"])
        except (OSError, FormatError):  # gone, or no regular file: installed again
            return False

    def _refuse(self, name: str, reason: str) -> None:
        self.r.refused.append({"name": name, "reason": reason})

    def _check_adapter(self, name: str, blob: Path) -> None:
        from edge.format.adapter import load_adapter

        a = load_adapter(blob, trusted_keys=self.trusted)  # with keys: the signature is checked first
        if a.base_fingerprint != self.fp:
            raise AdapterMismatchError(f"{name}: adapter is for base {a.base_fingerprint}, this device runs {self.fp}")
        if a.name != name:
            raise FormatError(f"{name}: the file names itself {a.name!r}, not the name it was published under")
        if self.info is not None:
            a.check_against(self.info)

    def _install(self, name: str, t: dict, blob: Path) -> None:
        from edge.format.io import atomic_write_bytes, read_bounded

        dst = self.dir / f"{name}.safetensors"
        data = read_bounded(blob, int(t["length"]), what="downloaded adapter")  # before anything is written
        sig, new_sig = _sig_path(blob), None
        if sig.exists():  # signature first, carrying the one it replaces: old or new, the adapter on disk verifies
            from edge.format.signing import MAX_SIG_BYTES, with_previous

            new_sig, old_sig = read_bounded(sig, MAX_SIG_BYTES, what="downloaded signature"), _sig_path(dst)
            try:
                old = read_bounded(old_sig, MAX_SIG_BYTES, what="installed signature")
            except FormatError:  # none, or not a signature file: nothing to carry over
                old = None
            atomic_write_bytes(old_sig, with_previous(new_sig, old))
        else:
            _sig_path(dst).unlink(missing_ok=True)
        atomic_write_bytes(dst, data)
        if new_sig is not None:
            atomic_write_bytes(_sig_path(dst), new_sig)  # then exactly the published signature
        entry = {"sha256": t["sha256"], "version": t["version"], "length": t["length"], "fingerprint": self.fp}
        self.state["adapters"][name] = entry | {"stamp": _stamp(dst.stat())}
        if "sig" in t:
            self.state["adapters"][name]["sig"] = t["sig"]["sha256"]
        self.state["release"], self.state["source"] = self.r.release, self.source  # who wrote it last
        _write_json(self.slot / "state.json", self.state)
        self.r.installed.append({"name": name, "version": t["version"], "bytes": t["length"]})
        if self.others is None:  # installed: the adapter folder is the copy now, unless another folder's plan wants it
            self.others = blobstore.plans_wanting(self.cache, {}, other_plans(self.cache, self.slot))
        if t["sha256"] not in self.others:  # else clean() deletes it once no plan wants it
            blob.unlink(missing_ok=True)
            sig.unlink(missing_ok=True)
