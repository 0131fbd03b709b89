"""python-tuf's ngclient reading TUF metadata stored as OCI artifacts (device side, no server of our own).

ngclient asks its fetcher for URLs under ``metadata_base_url``; here that base is ``oci:tuf/`` and
the last path part (``timestamp.json``, ``7.snapshot.json``, ``3.bins-0a.json``) names a file. The
mutable tag ``timestamp.json`` in ``<repository>/tuf`` is the *head*: a manifest whose config blob
is a gzip'd bundle of the timestamp, every file published with it, and the current root version
(:func:`encode_bundle`). The head carries a release inline (OCI descriptor ``data``, base64; the
registry stores and serves manifests byte for byte): a *delta* layer (:func:`encode_delta`), that
release's files deflated with the files they replace as the preset dictionary, which a device
one release behind holds in its own TUF cache; or, when there is no delta (the first release) and
the bundle fits in :data:`EMBED_MAX`, the bundle itself. So a device that polls moves one manifest
per release and fetches the bundle blob only when its cache does not match the delta's base
(checked by sha256 before use). The fetcher reads the head once per sync, with ``If-None-Match``
on the digest it saw last (HTTP 304, no body, when nothing was published), and serves those files
from it; any other file is the one-layer artifact tagged with its name.

None of this is trusted: ngclient verifies whatever bytes it gets (signatures, versions, expiry,
lengths) as usual. The root version only lets the fetcher answer "no such root" for newer roots
without a request, which is what an attacker who withholds a new root could answer anyway (TUF's
defence against that is the timestamp's expiry, unchanged). Targets (adapters) are not fetched
through ngclient: :mod:`edge.fleet.device` downloads them by digest with resumable ranges and
checks them against the verified ``TargetFile``.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from edge.fleet.oci import ANN, MEDIA, FleetSecurityError, OciClient, RegistryUnreachableError, parse_manifest

__all__ = [
    "OciMetadataFetcher",
    "METADATA_BASE_URL",
    "HEAD_TAG",
    "EMBED_MAX",
    "DICT_MAX",
    "BUNDLE_FORMAT",
    "DELTA_FORMAT",
    "bin_probe_paths",
    "encode_bundle",
    "decode_bundle",
    "encode_delta",
    "decode_delta",
    "inline_data",
    "role_of",
]

METADATA_BASE_URL = "oci:tuf/"
HEAD_TAG = "timestamp.json"
BUNDLE_FORMAT = "edge.tuf-bundle/1"
DELTA_FORMAT = "edge.tuf-delta/1"
HEAD_CACHE_FORMAT = "edge.tuf-head/1"
EMBED_MAX = 4096  # bytes of a delta or bundle the head carries inline (base64 in the manifest); larger: a blob
DICT_MAX = 32 << 10  # a delta's base: deflate sees at most the last 32 KiB of a preset dictionary anyway
_MAX_METADATA = 8 << 20  # one metadata file, and a whole bundle once decompressed
_MAX_BUNDLE = 1 << 20  # a compressed bundle or delta
_MAX_ROLES = 64  # files a delta's base may name
_FILE = re.compile(r"^([1-9][0-9]{0,9}\.)?[A-Za-z0-9_-]{1,64}\.json$")
_ROLE = re.compile(r"^[A-Za-z0-9_-]{1,64}\.json$")


def role_of(name: str) -> str:
    """``3.bins-0a.json`` -> ``bins-0a.json``: the name the host's TUF folder and ngclient's cache both use."""
    return name.split(".", 1)[1] if name[:1].isdigit() else name


def encode_bundle(files: list[tuple[str, bytes]], root_version: int) -> bytes:
    """The head's config blob: ``{"format", "root", "files": {name: text}}`` as compact JSON, gzip'd.

    One deflate stream over all files shares the key ids, field names and target path prefixes
    they repeat, so a release's timestamp + snapshot + bin cost about 40 % of their size on the wire.
    """
    for name, _ in files:
        if not _FILE.match(name):
            raise ValueError(f"{name!r} is not a TUF metadata file name")
    doc = {"format": BUNDLE_FORMAT, "root": int(root_version), "files": {n: b.decode("utf-8") for n, b in files}}
    return gzip.compress(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode(), compresslevel=9, mtime=0)


def decode_bundle(data: bytes, what: str = "TUF bundle") -> tuple[int, dict[str, bytes]]:
    """``(root version, {file name: bytes})`` from :func:`encode_bundle` output; bounded, validated."""
    from edge.errors import FormatError
    from edge.format.io import load_json

    text = _inflate(zlib.decompressobj(wbits=31), data, what, "gzip")  # gzip framing
    try:  # bounded depth, no duplicated keys: a registry's bytes never reach a bare RecursionError
        doc = load_json(text, source=what)
    except FormatError as e:
        raise FleetSecurityError(f"{what} is not JSON: {e}") from e
    return _bundle_doc(doc, what)


def encode_delta(
    files: list[tuple[str, bytes]], root_version: int, previous: Mapping[str, bytes]
) -> tuple[bytes, str, list[str]] | None:
    """A release as a delta: ``(deflate stream, sha256 of its base, the base's roles)``, or None without a base.

    The base is the previous version of each file's role (``previous``: role -> bytes, what a device
    current as of the last release holds in its TUF cache), concatenated in the files' order and
    used as deflate's preset dictionary. The stream inflates to one JSON header line
    (``{"format", "root", "files": [[name, length], ...]}``) followed by the files' bytes. A
    release's new signatures, versions, dates and changed target hashes are most of what is left:
    about half the gzip'd bundle (433 against 923 bytes for 100 adapters in 32 bins, BENCHMARKS.md).
    """
    roles = [role_of(n) for n, _ in files]
    if not files or any(r not in previous for r in roles):
        return None
    base = b"".join(previous[r] for r in roles)
    if len(base) > DICT_MAX:
        return None
    header = {"format": DELTA_FORMAT, "root": int(root_version), "files": [[n, len(b)] for n, b in files]}
    for name, _ in files:
        if not _FILE.match(name):
            raise ValueError(f"{name!r} is not a TUF metadata file name")
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=base)  # raw deflate: the base is checked by sha256
    data = json.dumps(header, separators=(",", ":")).encode() + b"\n" + b"".join(b for _, b in files)
    return c.compress(data) + c.flush(), "sha256:" + hashlib.sha256(base).hexdigest(), roles


def decode_delta(data: bytes, base: bytes, what: str = "TUF delta") -> tuple[int, dict[str, bytes]]:
    """``(root version, {file name: bytes})`` from :func:`encode_delta` output and its base; bounded, validated."""
    text = _inflate(zlib.decompressobj(wbits=-15, zdict=base), data, what, "deflate")
    from edge.errors import FormatError
    from edge.format.io import load_json

    head, nl, body = text.partition(b"\n")
    try:
        header = load_json(head if nl else b"no header line", source=what)
    except FormatError as e:
        raise FleetSecurityError(f"{what} has no JSON header line: {e}") from e
    if (
        not isinstance(header, dict)
        or header.get("format") != DELTA_FORMAT
        or not isinstance(header.get("files"), list)
    ):
        raise FleetSecurityError(f"{what} is not an {DELTA_FORMAT} stream (format, root, files)")
    files, at = {}, 0
    for entry in header["files"]:
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
        if not (ok and type(entry[1]) is int and 0 <= entry[1] <= len(body) - at) or entry[0] in files:
            raise FleetSecurityError(f"{what} holds a malformed entry {str(entry)[:80]!r}")
        try:
            files[entry[0]] = body[at : at + entry[1]].decode("utf-8")
        except UnicodeDecodeError as e:
            raise FleetSecurityError(f"{what}: {entry[0]} is not UTF-8 text") from e
        at += entry[1]
    if at != len(body):
        raise FleetSecurityError(f"{what}: {len(body) - at} bytes follow the files its header lists")
    return _bundle_doc({"format": BUNDLE_FORMAT, "root": header.get("root"), "files": files}, what)


def inline_data(desc: dict, what: str) -> bytes | None:
    """The bytes a descriptor carries in ``data`` (base64), checked against its size and digest; None if absent."""
    if "data" not in desc:
        return None
    text, size = desc["data"], desc.get("size")
    if not isinstance(text, str) or type(size) is not int or len(text) > 4 * ((_MAX_BUNDLE + 2) // 3):
        raise FleetSecurityError(f"{what}: malformed or oversized inline data")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FleetSecurityError(f"{what}: inline data is not base64 ({e})") from e
    if len(data) != size or "sha256:" + hashlib.sha256(data).hexdigest() != desc.get("digest"):
        raise FleetSecurityError(f"{what}: inline data does not match the descriptor's size and digest")
    return data


def _inflate(d, data: bytes, what: str, kind: str) -> bytes:
    try:
        text = d.decompress(data, _MAX_METADATA + 1)
    except zlib.error as e:
        raise FleetSecurityError(f"{what} is not {kind} data (or not against this base): {e}") from e
    if len(text) > _MAX_METADATA or d.unconsumed_tail:
        raise FleetSecurityError(f"{what} inflates to more than {_MAX_METADATA} bytes")
    if not d.eof or d.unused_data:
        raise FleetSecurityError(f"{what} is a truncated or padded {kind} stream")
    return text


def _bundle_doc(doc, what: str) -> tuple[int, dict[str, bytes]]:
    doc = doc if isinstance(doc, dict) else {}
    files, root = doc.get("files"), doc.get("root")
    if doc.get("format") != BUNDLE_FORMAT or not isinstance(files, dict) or type(root) is not int or root < 1:
        raise FleetSecurityError(f"{what} is not an {BUNDLE_FORMAT} document (format, root, files)")
    out = {}
    for name, body in files.items():
        if not (isinstance(name, str) and _FILE.match(name) and isinstance(body, str)):
            raise FleetSecurityError(f"{what} holds a malformed entry {str(name)[:80]!r}")
        try:
            out[name] = body.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800"): JSON allows it, no metadata holds it
            raise FleetSecurityError(f"{what}: {name} holds text that is not UTF-8 ({e.reason})") from e
    return root, out


def _descriptor(desc, media: str, what: str) -> dict:
    if not isinstance(desc, dict) or desc.get("mediaType") != media:
        raise FleetSecurityError(f"{what} is not a TUF head artifact (want a {media} descriptor)")
    digest, size = desc.get("digest"), desc.get("size")
    if not _digest(digest) or type(size) is not int or size < 0:
        raise FleetSecurityError(f"{what} has a malformed {media} descriptor (digest {str(digest)[:80]!r})")
    if size > _MAX_BUNDLE:
        raise FleetSecurityError(f"{what}: the {media} blob is {size} bytes, over the {_MAX_BUNDLE} allowed")
    return desc


def _digest(digest) -> bool:
    """``sha256:`` and 64 lowercase hex: nothing else from a manifest becomes part of a URL path."""
    return isinstance(digest, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", digest) is not None


def _fetcher_base():
    from tuf.ngclient.fetcher import FetcherInterface

    return FetcherInterface


class OciMetadataFetcher(_fetcher_base()):  # type: ignore[misc]
    """A ``tuf.ngclient.FetcherInterface`` over an :class:`~edge.fleet.oci.OciClient`.

    ``head_dir`` keeps the last head read (``head.json``: manifest digest, bundle digest, files), so
    an unchanged head costs a 304; ``tuf_dir`` is ngclient's metadata cache, the base a delta is
    decoded against. ``head_source`` says how this sync got the head: ``not-modified`` (304),
    ``delta``, ``inline`` (the bundle in the manifest), ``cached`` (same bundle as last time) or
    ``blob``. ``unreachable`` is set when a request failed because the registry did not answer, so
    the caller can tell "offline" from "verification failed".
    """

    def __init__(self, client: OciClient, head_dir: str | Path | None = None, tuf_dir: str | Path | None = None):
        self.client = client
        self.head_dir = Path(head_dir) if head_dir is not None else None
        self.tuf_dir = Path(tuf_dir) if tuf_dir is not None else None
        self.unreachable: RegistryUnreachableError | None = None
        self.head_source = ""
        self.head_read = False  # the head manifest was there: a 404 after it is a file it names, not "no release"
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
        got = self.client.manifest_bytes(HEAD_TAG, etag=cached["manifest"] if cached else None)
        self.head_read = True
        if got is None:  # 304: the registry still serves the manifest we hold
            self._head, self.head_source = (cached["root"], cached["files"]), "not-modified"
            return self._head
        body, digest = got
        manifest = parse_manifest(body, what)
        config = _descriptor(manifest.get("config"), MEDIA["tuf_bundle"], f"{what} config")
        head = self._from_delta(manifest, what)
        if head is None:
            head = self._from_config(config, cached, what)
        self._head = head
        # files from a delta are not what the config digest names: never reuse them by that digest (an edited
        # delta beside the real config would otherwise outlive the attack)
        self._store_head(digest, "" if self.head_source == "delta" else config["digest"], head)
        return head

    def _from_delta(self, manifest: dict, what: str) -> tuple[int, dict[str, bytes]] | None:
        """The release from the head's delta layer; None without one or when this device's cache is not its base."""
        layers = manifest.get("layers")
        if not isinstance(layers, list):
            raise FleetSecurityError(f"{what} has no layers list")
        found = [x for x in layers if isinstance(x, dict) and x.get("mediaType") == MEDIA["tuf_delta"]]
        if not found or self.tuf_dir is None:
            return None
        desc = _descriptor(found[0], MEDIA["tuf_delta"], f"{what} delta")
        ann = desc.get("annotations") if isinstance(desc.get("annotations"), dict) else {}
        roles, want = str(ann.get(ANN["delta_roles"], "")).split(), ann.get(ANN["delta_base"])
        if not roles or len(roles) > _MAX_ROLES or not all(_ROLE.match(r) for r in roles):
            raise FleetSecurityError(f"{what}: the delta names a malformed base {ann.get(ANN['delta_roles'])!r}")
        base = self._base(roles)
        if base is None or "sha256:" + hashlib.sha256(base).hexdigest() != want:
            return None  # this device is not one release behind: it reads the whole bundle
        data = inline_data(desc, f"{what} delta")
        if data is None:
            return None
        self.head_source = "delta"
        return decode_delta(data, base, f"{what} delta")

    def _base(self, roles: list[str]) -> bytes | None:
        """The previous version of each role from ngclient's cache (the delta's dictionary), if all are there."""
        from edge.errors import FormatError
        from edge.format.io import read_bounded

        out = bytearray()
        for role in roles:
            try:
                out += read_bounded(self.tuf_dir / role, DICT_MAX - len(out), what="cached TUF metadata")
            except FormatError:  # missing, or more than a base can be: not this device's base
                return None
        return bytes(out)

    def _from_config(self, config: dict, cached: dict | None, what: str) -> tuple[int, dict[str, bytes]]:
        bundle = inline_data(config, f"{what} config")
        if bundle is not None:
            self.head_source = "inline"
        elif cached and cached["config"] == config["digest"]:
            self.head_source = "cached"
            return cached["root"], cached["files"]
        else:
            self.head_source = "blob"
            try:
                bundle = self.client.blob_bytes(config["digest"], _MAX_BUNDLE)
            except FileNotFoundError as e:  # not "no release yet": the head is there, its bundle is not
                raise FileNotFoundError(
                    f"{what} names the bundle blob {config['digest']}, which the registry does not have "
                    "(garbage-collected, or a mirror that did not copy it)"
                ) from e
        return decode_bundle(bundle, what)

    def _cached_head(self) -> dict | None:
        """``{"manifest", "config", "root", "files"}`` from ``head_dir/head.json``, if intact."""
        if self.head_dir is None:
            return None
        from edge.errors import FormatError
        from edge.format.io import load_json, read_bounded

        try:
            doc = load_json(read_bounded(self.head_dir / "head.json", 3 * _MAX_METADATA, what="cached TUF head"))
            root, files = _bundle_doc(doc.get("bundle"), "cached TUF head")
            digests = doc["manifest"], doc["config"]
        except (FormatError, ValueError, FleetSecurityError, KeyError, AttributeError):
            return None  # missing, torn or edited: read the head again
        if doc.get("format") != HEAD_CACHE_FORMAT or not all(isinstance(d, str) for d in digests):
            return None
        return {"manifest": digests[0], "config": digests[1], "root": root, "files": files}

    def _store_head(self, manifest: str, config: str, head: tuple[int, dict[str, bytes]]) -> None:
        if self.head_dir is None:
            return
        from edge.format.io import atomic_write_bytes

        bundle = {"format": BUNDLE_FORMAT, "root": head[0], "files": {n: b.decode() for n, b in head[1].items()}}
        doc = {"format": HEAD_CACHE_FORMAT, "manifest": manifest, "config": config, "bundle": bundle}
        self.head_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.head_dir / "head.json", json.dumps(doc, separators=(",", ":")).encode())

    def _layer(self, tag: str) -> str:
        """The digest of the metadata blob tagged ``tag`` (a file an earlier release published)."""
        manifest = self.client.manifest(tag)
        layers = manifest.get("layers")
        if not layers or not isinstance(layers[0], dict) or layers[0].get("mediaType") != MEDIA["tuf_metadata"]:
            raise FleetSecurityError(f"{self.client.repository}:{tag} is not a TUF metadata artifact")
        digest, size = layers[0].get("digest"), layers[0].get("size")
        if not _digest(digest) or type(size) is not int:
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
