"""python-tuf's ngclient reading TUF metadata stored as OCI artifacts (device side, no server of our own).

ngclient asks its fetcher for URLs under ``metadata_base_url``; here that base is ``oci:tuf/`` and
the last path part (``timestamp.json``, ``7.snapshot.json``, ``3.bins-0a.json``) names a file. The
mutable tag ``timestamp.json`` in ``<repository>/tuf`` is the *head*: a manifest whose config blob
is a gzip'd bundle of the timestamp, every file published with it, and the current root version
(:func:`encode_bundle`). The fetcher reads the head once per sync, with ``If-None-Match`` on the
digest it saw last (HTTP 304, no body, when nothing was published), and serves those files from
it; any other file is the one-layer artifact tagged with its name. The bundle is not trusted:
ngclient verifies whatever bytes it gets (signatures, versions, expiry, lengths) as usual. The root
version only lets the fetcher answer "no such root" for newer roots without a request, which is
what an attacker who withholds a new root could answer anyway (TUF's defence against that is the
timestamp's expiry, unchanged). Targets (adapters) are not fetched through ngclient:
:mod:`edge.fleet.device` downloads them by digest with resumable ranges and checks them against the
verified ``TargetFile``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from edge.fleet.oci import MEDIA, FleetSecurityError, OciClient, RegistryUnreachableError, parse_manifest

__all__ = ["OciMetadataFetcher", "METADATA_BASE_URL", "HEAD_TAG", "bin_probe_paths", "encode_bundle", "decode_bundle"]

METADATA_BASE_URL = "oci:tuf/"
HEAD_TAG = "timestamp.json"
BUNDLE_FORMAT = "edge.tuf-bundle/1"
_MAX_METADATA = 8 << 20  # one metadata file, and a whole bundle once decompressed
_MAX_BUNDLE = 1 << 20  # a compressed bundle
_FILE = re.compile(r"^([1-9][0-9]{0,9}\.)?[A-Za-z0-9_-]{1,64}\.json$")


def encode_bundle(files: list[tuple[str, bytes]], root_version: int) -> bytes:
    """The head's config blob: ``{"format", "root", "files": {name: text}}`` as compact JSON, gzip'd.

    One deflate stream over all files shares the key ids, field names and target path prefixes
    they repeat, so a release's timestamp + snapshot + bin cost about half their size on the wire.
    """
    doc = {"format": BUNDLE_FORMAT, "root": int(root_version), "files": {n: b.decode("utf-8") for n, b in files}}
    for name in doc["files"]:
        if not _FILE.match(name):
            raise ValueError(f"{name!r} is not a TUF metadata file name")
    return gzip.compress(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode(), compresslevel=9, mtime=0)


def decode_bundle(data: bytes, what: str = "TUF bundle") -> tuple[int, dict[str, bytes]]:
    """``(root version, {file name: bytes})`` from :func:`encode_bundle` output; bounded, validated."""
    d = zlib.decompressobj(wbits=31)  # gzip framing
    try:
        text = d.decompress(data, _MAX_METADATA + 1)
    except zlib.error as e:
        raise FleetSecurityError(f"{what} is not gzip data: {e}") from e
    if len(text) > _MAX_METADATA or d.unconsumed_tail:
        raise FleetSecurityError(f"{what} inflates to more than {_MAX_METADATA} bytes")
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise FleetSecurityError(f"{what} is not JSON: {e}") from e
    doc = doc if isinstance(doc, dict) else {}
    files, root = doc.get("files"), doc.get("root")
    if doc.get("format") != BUNDLE_FORMAT or not isinstance(files, dict) or type(root) is not int or root < 1:
        raise FleetSecurityError(f"{what} is not an {BUNDLE_FORMAT} document (format, root, files)")
    out = {}
    for name, body in files.items():
        if not (isinstance(name, str) and _FILE.match(name) and isinstance(body, str)):
            raise FleetSecurityError(f"{what} holds a malformed entry {str(name)[:80]!r}")
        out[name] = body.encode("utf-8")
    return root, out


def _fetcher_base():
    from tuf.ngclient.fetcher import FetcherInterface

    return FetcherInterface


class OciMetadataFetcher(_fetcher_base()):  # type: ignore[misc]
    """A ``tuf.ngclient.FetcherInterface`` over an :class:`~edge.fleet.oci.OciClient`.

    ``head_dir`` keeps the last head manifest and bundle, so an unchanged head costs a 304.
    ``unreachable`` is set when a request failed because the registry did not answer, so the
    caller can tell "offline" from "verification failed".
    """

    def __init__(self, client: OciClient, head_dir: str | Path | None = None):
        self.client = client
        self.head_dir = Path(head_dir) if head_dir is not None else None
        self.unreachable: RegistryUnreachableError | None = None
        self._head: tuple[int, dict[str, bytes]] | None = None

    def _fetch(self, url: str) -> Iterator[bytes]:
        from tuf.api.exceptions import DownloadHTTPError

        if not url.startswith(METADATA_BASE_URL):
            raise DownloadHTTPError(f"{url} is outside the fleet's TUF metadata", 404)
        name = url[len(METADATA_BASE_URL) :]
        try:
            root_version, files = self._load_head()
            if name in files:
                yield files[name]
                return
            version, _, role = name.partition(".")
            if role == "root.json" and version.isdigit() and int(version) > root_version:
                raise DownloadHTTPError(f"{name}: the fleet's root is version {root_version}", 404)
            yield from self.client.blob_chunks(self._layer(name))
        except FileNotFoundError as e:
            raise DownloadHTTPError(str(e), 404) from e
        except RegistryUnreachableError as e:
            self.unreachable = e
            raise

    def _load_head(self) -> tuple[int, dict[str, bytes]]:
        """The head's root version and files: read once per sync, 304 when the cached head is current."""
        if self._head is not None:
            return self._head
        what = f"{self.client.repository}:{HEAD_TAG}"
        cached = self._cached_head()
        got = self.client.manifest_bytes(HEAD_TAG, etag=cached[0] if cached else None)
        if got is None:  # 304: the registry still serves the manifest we hold
            self._head = decode_bundle(cached[2], what)
            return self._head
        body, digest = got
        manifest = parse_manifest(body, what)
        config = manifest.get("config")
        if not isinstance(config, dict) or config.get("mediaType") != MEDIA["tuf_bundle"]:
            raise FleetSecurityError(f"{what} is not a TUF head artifact (config {MEDIA['tuf_bundle']})")
        bdigest, size = config.get("digest"), config.get("size")
        if not isinstance(bdigest, str) or not bdigest.startswith("sha256:") or type(size) is not int:
            raise FleetSecurityError(f"{what} has a malformed config descriptor")
        if size > _MAX_BUNDLE:
            raise FleetSecurityError(f"{what}: the bundle is {size} bytes, over the {_MAX_BUNDLE} allowed")
        if cached and cached[1] == bdigest:
            bundle = cached[2]
        else:
            bundle = self.client.blob_bytes(bdigest, _MAX_BUNDLE)
        self._head = decode_bundle(bundle, what)
        self._store_head(body, bundle)
        return self._head

    def _cached_head(self) -> tuple[str, str, bytes] | None:
        """``(manifest digest, bundle digest, bundle)`` from ``head_dir``, if intact."""
        if self.head_dir is None:
            return None
        try:
            with open(self.head_dir / "head.manifest", "rb") as f:
                body = f.read(1 << 16)
            with open(self.head_dir / "head.bundle", "rb") as f:
                bundle = f.read(_MAX_BUNDLE + 1)
            config = parse_manifest(body, "cached TUF head").get("config")
        except (OSError, FleetSecurityError):
            return None
        bdigest = "sha256:" + hashlib.sha256(bundle).hexdigest()
        if not isinstance(config, dict) or config.get("digest") != bdigest:
            return None  # torn or edited: read the head again
        return "sha256:" + hashlib.sha256(body).hexdigest(), bdigest, bundle

    def _store_head(self, body: bytes, bundle: bytes) -> None:
        if self.head_dir is None:
            return
        from edge.format.io import atomic_write_bytes

        self.head_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.head_dir / "head.bundle", bundle)
        atomic_write_bytes(self.head_dir / "head.manifest", body)

    def _layer(self, tag: str) -> str:
        """The digest of the metadata blob tagged ``tag`` (a file an earlier release published)."""
        manifest = self.client.manifest(tag)
        layers = manifest.get("layers")
        if not layers or not isinstance(layers[0], dict) or layers[0].get("mediaType") != MEDIA["tuf_metadata"]:
            raise FleetSecurityError(f"{self.client.repository}:{tag} is not a TUF metadata artifact")
        digest, size = layers[0].get("digest"), layers[0].get("size")
        if not isinstance(digest, str) or not digest.startswith("sha256:") or type(size) is not int:
            raise FleetSecurityError(f"{self.client.repository}:{tag} has a malformed layer")
        if size > _MAX_METADATA:
            raise FleetSecurityError(
                f"{self.client.repository}:{tag} is {size} bytes, over the {_MAX_METADATA} allowed"
            )
        return digest


def bin_probe_paths(succinct) -> dict[str, str]:
    """One made-up target path per hash bin (``bin name -> path``).

    Asking ngclient for a path makes it load and verify the bin that path hashes to; the fleet
    publishes no target under ``.edge-probe/``, so the answer is always "no such target" and the
    bin is then trusted and cached (``<bin>.json`` in the metadata folder), ready to be listed.
    """
    want = set(succinct.get_roles())
    out: dict[str, str] = {}
    i = 0
    while len(out) < len(want):
        path = f".edge-probe/{i}"
        out.setdefault(succinct.get_role_for_target(path), path)
        i += 1
    return out
