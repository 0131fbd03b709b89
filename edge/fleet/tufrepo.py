"""The host's TUF repository for a fleet: keys, signed metadata, one new version per release (host side).

Built on python-tuf's Metadata API (``tuf.api.metadata``) with securesystemslib's ``CryptoSigner``
(Ed25519 via ``cryptography``). Four top-level roles, one Ed25519 key each, kept as PEM files in a
keys folder (``root.pem``, ``targets.pem``, ``snapshot.pem``, ``timestamp.pem``; ``edge keygen``
format). Targets are spread over ``2**bits`` hash bins (TUF succinct hash-bin delegation, TAP 15,
signed with the targets key), so a release that changes one adapter re-signs one small bin plus
snapshot and timestamp, and a device downloads only those: the metadata a device moves per release
does not grow with the number of adapters.

Consistent snapshots are on: every file but ``timestamp.json`` is published under a versioned
name (``7.snapshot.json``), never rewritten. The folder holds the current ``<role>.json`` files
and every ``<N>.root.json``; the registry holds the published copies. :meth:`TufRepo.stage_rotate`
replaces role keys with a new root signed by the old and the new root key (``keys/retired/``
keeps the old keys).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edge.errors import ConfigError
from edge.fleet.oci import FleetError, require_fleet

__all__ = ["Expiry", "TufRepo", "ROLES"]

ROLES = ("root", "targets", "snapshot", "timestamp")
BINS_PREFIX = "bins"


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid after it is signed (negative: already expired, for tests)."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=30)
    timestamp: timedelta = timedelta(days=7)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _serializer():
    from tuf.api.serialization.json import JSONSerializer

    return JSONSerializer(compact=True)


def _signer(keys_dir: Path, role: str, path: Path | None = None):
    from cryptography.hazmat.primitives import serialization
    from securesystemslib.signer import CryptoSigner

    from edge.format.io import read_bounded
    from edge.format.signing import MAX_PRIVATE_KEY_BYTES

    path = path or keys_dir / f"{role}.pem"
    if not path.exists():
        raise ConfigError(f"no {role} key at {path}; create the keys with `edge release init --keys {keys_dir}`")
    data = read_bounded(path, MAX_PRIVATE_KEY_BYTES, what=f"{role} key")  # a FIFO or /dev/zero: a FormatError
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as e:
        raise ConfigError(f"{path} is not an unencrypted Ed25519 PEM private key: {e}") from e
    return CryptoSigner(key)


def _no_file_in_the_way(meta_dir: str | Path, keys_dir: str | Path) -> None:
    """``--tuf-dir`` and ``--keys`` that exist must be folders (one that is missing is made, or named later)."""
    from edge.format.paths import require_folder

    for folder, flag in ((Path(meta_dir), "--tuf-dir"), (Path(keys_dir), "--keys")):
        if folder.exists() or folder.is_symlink():
            require_folder(folder, f"{flag} folder", f"give a folder (the one `edge release init` makes for {flag})")


class TufRepo:
    """TUF metadata in ``meta_dir``, signed with the keys in ``keys_dir``.

    ``stage_*`` methods change metadata in memory and return the files to publish
    (``[(filename, bytes)]``, timestamp last); :meth:`commit` writes them to ``meta_dir`` once the
    registry has them, so a failed upload leaves the host's state as it was.
    """

    def __init__(self, meta_dir: str | Path, keys_dir: str | Path, expiry: Expiry | None = None):
        self.meta_dir = Path(meta_dir)
        self.keys_dir = Path(keys_dir)
        self.expiry = expiry or Expiry()
        self._md: dict[str, object] = {}
        self._new_keys: dict[str, Path] = {}  # role -> staged key (rotation), moved into keys_dir by commit

    # -- creation ---------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, meta_dir: str | Path, keys_dir: str | Path, bits: int = 5, expiry: Expiry | None = None
    ) -> tuple[TufRepo, list[tuple[str, bytes]]]:
        """New keys (those missing) and version 1 of every role; ``bits`` sets ``2**bits`` hash bins."""
        require_fleet(host=True)
        _no_file_in_the_way(meta_dir, keys_dir)
        from tuf.api.metadata import (
            Delegations,
            Metadata,
            Root,
            Snapshot,
            SuccinctRoles,
            Targets,
            Timestamp,
        )

        from edge.format.signing import generate_key

        if not 1 <= int(bits) <= 10:
            raise ConfigError(f"bits must be 1..10 (2 to 1024 hash bins), got {bits}")
        repo = cls(meta_dir, keys_dir, expiry)
        if (repo.meta_dir / "root.json").exists():
            raise ConfigError(f"{repo.meta_dir} already holds a TUF repository (root.json); use `edge push`")
        repo.keys_dir.mkdir(parents=True, exist_ok=True)
        for role in ROLES:
            if not (repo.keys_dir / f"{role}.pem").exists():
                generate_key(repo.keys_dir / f"{role}.pem")
        signers = {role: _signer(repo.keys_dir, role) for role in ROLES}
        now, ex = _now(), repo.expiry
        root = Root(expires=now + ex.root, consistent_snapshot=True)
        for role in ROLES:
            root.add_key(signers[role].public_key, role)
        tkey = signers["targets"].public_key
        succinct = SuccinctRoles([tkey.keyid], 1, int(bits), BINS_PREFIX)
        targets = Targets(
            expires=now + ex.targets, delegations=Delegations({tkey.keyid: tkey}, succinct_roles=succinct)
        )
        repo._md = {"root": Metadata(root), "targets": Metadata(targets)}
        for name in succinct.get_roles():
            repo._md[name] = Metadata(Targets(expires=now + ex.targets))
        snap = Snapshot(expires=now + ex.snapshot)
        repo._md["snapshot"] = Metadata(snap)
        repo._md["timestamp"] = Metadata(Timestamp(expires=now + ex.timestamp))
        files = []
        for name in ["root", "targets", *succinct.get_roles()]:
            repo._sign(name)
            files.append((f"1.{name}.json", repo._bytes(name)))
            if name != "root":
                repo._set_meta(name)
        files += repo._stage_snapshot_and_timestamp(bump=False)
        return repo, files

    # -- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, meta_dir: str | Path, keys_dir: str | Path, expiry: Expiry | None = None) -> TufRepo:
        require_fleet(host=True)
        from tuf.api.metadata import Metadata

        repo = cls(meta_dir, keys_dir, expiry)
        _no_file_in_the_way(repo.meta_dir, repo.keys_dir)
        if not (repo.meta_dir / "root.json").exists():
            raise ConfigError(
                f"no TUF repository in {repo.meta_dir}; create it with "
                f"`edge release init --tuf-dir {repo.meta_dir} --keys {repo.keys_dir} ...`"
            )
        for role in ("root", "targets", "snapshot", "timestamp"):
            repo._md[role] = Metadata.from_file(str(repo.meta_dir / f"{role}.json"))
        for name in repo.bins.get_roles():
            repo._md[name] = Metadata.from_file(str(repo.meta_dir / f"{name}.json"))
        return repo

    @property
    def bins(self):
        return self._md["targets"].signed.delegations.succinct_roles

    @property
    def _snapshot(self):
        return self._md["snapshot"].signed

    @property
    def root_version(self) -> int:
        return int(self._md["root"].signed.version)

    @property
    def release(self) -> int:
        """The snapshot version: one per release, the version number given to adapters it changes."""
        return int(self._snapshot.version)

    def root_bytes(self) -> bytes:
        return self._bytes("root")

    def targets(self, prefix: str = "") -> dict[str, object]:
        """Every published target (path -> ``TargetFile``) whose path starts with ``prefix``."""
        out = {}
        for name in self.bins.get_roles():
            for path, tf in self._md[name].signed.targets.items():
                if path.startswith(prefix):
                    out[path] = tf
        return dict(sorted(out.items()))

    # -- releases ---------------------------------------------------------------------------------------------
    def stage_targets(
        self, add: dict[str, tuple[int, str, dict]], remove: Iterable[str] = ()
    ) -> list[tuple[str, bytes]]:
        """Publish targets ``{path: (length, sha256 hex, custom)}`` and drop ``remove``; unchanged ones are kept.

        A changed target gets ``custom["version"]`` = the new release number, so versions grow
        across channels and models. Returns the files to upload ([] when nothing changed).
        """
        from tuf.api.metadata import TargetFile

        release = self.release + 1
        changed: set[str] = set()
        for path, (length, sha, custom) in add.items():
            role = self.bins.get_role_for_target(path)
            current = self._md[role].signed.targets.get(path)
            if current is not None and current.length == length and current.hashes.get("sha256") == sha:
                continue
            fields = {"custom": {**custom, "version": release}}
            self._md[role].signed.targets[path] = TargetFile(length, {"sha256": sha}, path, fields)
            changed.add(role)
        for path in remove:
            role = self.bins.get_role_for_target(path)
            if self._md[role].signed.targets.pop(path, None) is not None:
                changed.add(role)
        if not changed:
            return []
        files = []
        now = _now()
        for role in sorted(changed):
            files.append(self._resign_targets(role, now))
        return files + self._stage_snapshot_and_timestamp(bump=True)

    def stage_refresh(self) -> list[tuple[str, bytes]]:
        """Re-sign snapshot and timestamp with fresh expiry dates (run before the timestamp expires)."""
        return self._stage_snapshot_and_timestamp(bump=True)

    def stage_rotate(self, roles: Iterable[str]) -> list[tuple[str, bytes]]:
        """New keys for ``roles`` and the root version that names them, signed by the current root key and,
        when root itself rotates, by the new one (TUF: a device trusts root N+1 only if N's keys and N+1's
        own keys signed it). A rotated targets key re-signs targets and every bin; snapshot and timestamp
        are always re-signed. New keys wait in ``keys_dir/rotating/`` until :meth:`commit`, which moves
        them into place and the old ones to ``keys_dir/retired/``.
        """
        from edge.format.signing import generate_key

        roles = sorted(set(roles))
        if not roles or set(roles) - set(ROLES):
            raise ConfigError(f"rotate which keys? got {roles}; choose among {', '.join(ROLES)}")
        staging = self.keys_dir / "rotating"
        staging.mkdir(parents=True, exist_ok=True)
        md, now = self._md["root"], _now()
        old_root = _signer(self.keys_dir, "root")
        root = md.signed
        for role in roles:
            self._new_keys[role] = staging / f"{role}.pem"
            generate_key(self._new_keys[role])
            for keyid in list(root.roles[role].keyids):
                root.revoke_key(keyid, role)
            root.add_key(self._key_signer(role).public_key, role)
        root.version += 1
        root.expires = now + self.expiry.root
        md.sign(old_root)
        if "root" in roles:
            md.sign(self._key_signer("root"), append=True)
        files = [(f"{root.version}.root.json", self._bytes("root"))]
        if "targets" in roles:
            new = self._key_signer("targets").public_key
            top = self._md["targets"].signed  # succinct bins: the key is added to and revoked from all of them
            for keyid in list(top.delegations.keys):
                top.revoke_key(keyid)
            top.add_key(new)
            for name in ["targets", *self.bins.get_roles()]:
                files.append(self._resign_targets(name, now))
        return files + self._stage_snapshot_and_timestamp(bump=True)

    def _resign_targets(self, role: str, now) -> tuple[str, bytes]:
        """A targets role (top-level or a bin) at its next version, signed, as the file to publish."""
        signed = self._md[role].signed
        signed.version += 1
        signed.expires = now + self.expiry.targets
        self._sign(role)
        self._set_meta(role)
        return f"{signed.version}.{role}.json", self._bytes(role)

    def published(self, files: list[tuple[str, bytes]]) -> dict[str, bytes]:
        """The last published version of each role ``files`` replace (role -> bytes), from ``meta_dir``.

        Call before :meth:`commit`: these are the bytes a device current as of the last release holds
        in its TUF cache, the base of the head's delta (:func:`edge.fleet.tuf_oci.encode_delta`).
        """
        from edge.fleet.tuf_oci import role_of

        out = {}
        for name, _ in files:
            path = self.meta_dir / role_of(name)
            if path.is_file():
                out[role_of(name)] = path.read_bytes()
        return out

    def commit(self, files: list[tuple[str, bytes]]) -> list[Path]:
        """Write published files to ``meta_dir`` (versioned roots kept, others as ``<role>.json``); put
        rotated keys in place. Returns where the retired keys went."""
        import os

        from edge.format.io import atomic_write_bytes

        for filename, data in files:
            role = filename.split(".", 1)[1] if filename[0].isdigit() else filename
            if role == "root.json":
                atomic_write_bytes(self.meta_dir / filename, data)
            atomic_write_bytes(self.meta_dir / role, data)
        retired = []
        if self._new_keys:
            (self.keys_dir / "retired").mkdir(exist_ok=True)
        for role, staged in sorted(self._new_keys.items()):
            for suffix in (".pem", ".pub"):
                old = self.keys_dir / f"{role}{suffix}"
                if old.exists():
                    dst = self.keys_dir / "retired" / f"{role}.root-{self.root_version - 1}{suffix}"
                    os.replace(old, dst)
                    retired.append(dst)
                if staged.with_suffix(suffix).exists():
                    os.replace(staged.with_suffix(suffix), old)
        self._new_keys = {}
        return [p for p in retired if p.suffix == ".pem"]

    # -- internals --------------------------------------------------------------------------------------------
    def _stage_snapshot_and_timestamp(self, bump: bool) -> list[tuple[str, bytes]]:
        from tuf.api.metadata import MetaFile

        now = _now()
        snap = self._snapshot
        if bump:
            snap.version += 1
        snap.expires = now + self.expiry.snapshot
        self._sign("snapshot")
        ts = self._md["timestamp"].signed
        if bump:
            ts.version += 1
        ts.expires = now + self.expiry.timestamp
        ts.snapshot_meta = MetaFile(version=snap.version, length=len(self._bytes("snapshot")))
        self._sign("timestamp")
        return [
            (f"{snap.version}.snapshot.json", self._bytes("snapshot")),
            ("timestamp.json", self._bytes("timestamp")),
        ]

    def _set_meta(self, role: str) -> None:
        from tuf.api.metadata import MetaFile

        self._snapshot.meta[f"{role}.json"] = MetaFile(version=self._md[role].signed.version)

    def _key_signer(self, role: str):
        return _signer(self.keys_dir, role, self._new_keys.get(role))

    def _sign(self, role: str) -> None:
        key_role = "targets" if role.startswith(BINS_PREFIX + "-") else role
        try:
            self._md[role].sign(self._key_signer(key_role))
        except ConfigError:
            raise
        except Exception as e:  # securesystemslib raises several types for bad keys
            raise FleetError(f"could not sign {role} metadata with {self.keys_dir / (key_role + '.pem')}: {e}") from e

    def _bytes(self, role: str) -> bytes:
        return self._md[role].to_bytes(_serializer())
