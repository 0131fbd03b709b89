"""Names shared by host and device: media types, annotations, tags, TUF target paths, errors, config.

Layout of one fleet repository ``REPO`` on a registry (all content-addressed, sha256):

* ``REPO:model-<fp>`` — the base model, stored once: config = its ``ModelInfo`` JSON, one layer = the
  model file, annotation ``dev.edge.model.fingerprint``.
* ``REPO:<channel>-<fp>`` — a release of the adapters for one model on one channel (``stable``,
  ``canary``, ``site-berlin``...): one layer per adapter, each with its metadata in annotations;
  ``subject`` points at the model manifest, so every release references the one model blob.
* ``REPO/tuf:<N>.<role>.json`` — TUF metadata, one small artifact each (consistent snapshots: every
  version is immutable).
* ``REPO/tuf:timestamp.json`` — the one mutable tag, the *head*: a manifest whose config is a gzip'd
  bundle of ``timestamp.json`` and every file published with it (snapshot, changed hash bins, a new
  root) and the current root version. Inline in it (OCI descriptor ``data``, base64, at most
  ``EMBED_MAX`` bytes) is that release as a delta against the files it replaces (a layer, for
  devices one release behind) or, with no delta, the bundle itself. A device reads one manifest
  per release (304 Not Modified when unchanged), plus the bundle blob only when it cannot use the
  delta; files older releases published are read by their own tags (:mod:`edge.fleet.tuf_oci`).

``<fp>`` is the hex part of the model fingerprint (``sha256:<32 hex>``). A TUF target path is
``<channel>/<fp>/<adapter name>.safetensors``; its length and sha256 equal the OCI blob's size and
digest, so a device downloads targets by digest.

The device side of this module needs ``requests`` (an ``oras`` dependency) only, imported lazily.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edge.errors import ConfigError, EdgeError
from edge.format.names import check_host, check_name, check_repository, split_reference

__all__ = [
    "FleetConfig",
    "FleetError",
    "FleetSecurityError",
    "RegistryUnreachableError",
    "OciClient",
    "MAX_MANIFEST",
    "DEFAULT_DEADLINE",
    "parse_manifest",
    "MEDIA",
    "ANN",
    "target_path",
    "model_tag",
    "release_tag",
    "check_name",
    "require_fleet",
]

MEDIA = {
    "model_config": "application/vnd.edge.model.config.v1+json",
    "model_onnx": "application/vnd.edge.model.v1+onnx",
    "model_tflite": "application/vnd.edge.model.v1+tflite",
    "model_artifact": "application/vnd.edge.model.v1",
    "release_config": "application/vnd.edge.release.config.v1+json",
    "release_artifact": "application/vnd.edge.release.v1",
    "adapter": "application/vnd.edge.adapter.v1+safetensors",
    "signature": "application/vnd.edge.adapter.signature.v1+json",
    "tuf_artifact": "application/vnd.edge.tuf.v1",
    "tuf_metadata": "application/vnd.edge.tuf.metadata.v1+json",
    "tuf_bundle": "application/vnd.edge.tuf.bundle.v1+json+gzip",
    "tuf_delta": "application/vnd.edge.tuf.delta.v1+deflate",
    "empty": "application/vnd.oci.empty.v1+json",
    "manifest": "application/vnd.oci.image.manifest.v1+json",
}
ANN = {
    "title": "org.opencontainers.image.title",
    "created": "org.opencontainers.image.created",
    "fingerprint": "dev.edge.model.fingerprint",
    "model_name": "dev.edge.model.name",
    "channel": "dev.edge.channel",
    "adapter": "dev.edge.adapter.name",
    "method": "dev.edge.adapter.method",
    "version": "dev.edge.adapter.version",
    "format": "dev.edge.adapter.format",
    "base": "dev.edge.adapter.base-fingerprint",
    "delta_base": "dev.edge.tuf.delta.base",
    "delta_roles": "dev.edge.tuf.delta.roles",
}
_FP = re.compile(r"^sha256:[0-9a-f]{16,64}$")


class FleetError(EdgeError, RuntimeError):
    """Publishing or syncing adapters through a registry failed."""


class RegistryUnreachableError(FleetError, ConnectionError):
    """The registry did not answer (refused, timed out, cut mid-transfer)."""


class FleetSecurityError(FleetError, PermissionError):
    """TUF metadata or an artifact failed verification (signature, expiry, rollback, hash, base model)."""


def require_fleet(host: bool = False) -> None:
    """Raise one :class:`ConfigError` naming the extra when a fleet dependency is missing (the one check)."""
    import importlib.util

    wanted = ["requests", "tuf", "filelock"] + (["oras", "securesystemslib", "cryptography"] if host else [])
    missing = [m for m in wanted if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"fleet {'publishing' if host else 'sync'} needs {', '.join(missing)}: "
            f"pip install 'edge-adapt[{'fleet' if host else 'fleet-device'}]'"  # a device needs no oras
        )


def fp_hex(fingerprint: str) -> str:
    if not isinstance(fingerprint, str) or not _FP.match(fingerprint):
        raise ConfigError(f"model fingerprint {fingerprint!r} is not of the form 'sha256:<hex>' (see `edge inspect`)")
    return fingerprint.split(":", 1)[1]


def target_path(channel: str, fingerprint: str, adapter: str) -> str:
    return f"{check_name('channel', channel)}/{fp_hex(fingerprint)}/{check_name('adapter name', adapter)}.safetensors"


def model_tag(fingerprint: str) -> str:
    return f"model-{fp_hex(fingerprint)}"


def release_tag(channel: str, fingerprint: str) -> str:
    return f"{check_name('channel', channel)}-{fp_hex(fingerprint)}"


#: seconds one ``edge sync`` may take in all (``--deadline``, :mod:`edge.fleet.deadline`): a few minutes, as a cron
#: job on a device can spare. Not scaled by size: a download the deadline cuts is kept and resumed (HTTP Range) by
#: the next sync, so a slow link still converges, a few minutes' worth of bytes per run.
DEFAULT_DEADLINE = 300.0


@dataclass(frozen=True)
class FleetConfig:
    """Where a device syncs from: ``registry`` (``host:port``), ``repository`` in it, ``channel``, TUF root.

    ``tuf_root`` is the path of the ``root.json`` the device trusts first (shipped with the device
    image; later roots are fetched and verified against it). ``insecure`` uses plain HTTP (loopback
    tests, lab networks); ``timeout`` bounds every connect and read, in seconds; ``deadline`` a whole sync.
    """

    registry: str
    repository: str
    channel: str = "stable"
    tuf_root: Path | None = None
    insecure: bool = False
    timeout: float = 10.0
    deadline: float = DEFAULT_DEADLINE

    def __post_init__(self) -> None:
        check_host(self.registry or "")
        check_repository(self.repository or "")
        check_name("channel", self.channel)
        if self.tuf_root is not None:
            object.__setattr__(self, "tuf_root", Path(self.tuf_root))
        for key in ("timeout", "deadline"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
                raise ConfigError(f"{key} must be a number of seconds > 0, got {value!r}")

    @classmethod
    def from_reference(cls, reference: str, channel: str = "stable", tuf_root=None, **kw) -> FleetConfig:
        """From ``HOST[:PORT]/REPOSITORY`` (the device profile's ``registry`` value)."""
        registry, repository = split_reference(reference)
        return cls(registry, repository, channel, tuf_root, **kw)

    @property
    def tuf_repository(self) -> str:
        return f"{self.repository}/tuf"

    @property
    def base_url(self) -> str:
        return f"{'http' if self.insecure else 'https'}://{self.registry}"


class OciClient:
    """Minimal, bounded reader of the OCI distribution API: manifests by tag, blobs by digest with Range.

    oras-py's ``Registry.do_request`` retries failed connections five times with sleeps of up to 83 s
    and offers no ``Range`` header, both wrong for a device that must give up fast and resume, so
    reads go through one ``requests.Session`` with explicit timeouts. Every body byte read is
    counted in ``bytes_in`` (what the device moved over the network), response status lines and
    headers in ``header_bytes_in`` (approximate: as HTTP/1.1 would send them), requests in
    ``requests_made``.
    """

    def __init__(self, base_url: str, repository: str, timeout: float = 10.0, deadline=None):
        import requests

        self._requests = requests
        self.base_url = base_url.rstrip("/")
        self.repository = repository
        self.timeout = timeout
        self.deadline = deadline  # an edge.fleet.deadline.Deadline (see its client()): every request ends by it
        self.session = requests.Session()
        self.bytes_in = 0
        self.header_bytes_in = 0
        self.requests_made = 0

    def close(self) -> None:
        self.session.close()

    def _get(self, url: str, headers: dict, stream: bool = False):
        timeout, doing = self.timeout, f"asking {self.base_url} for {url.rsplit('/', 1)[-1][:80]}"
        if self.deadline is not None:
            self.deadline.check(doing)
            timeout = min(timeout, max(self.deadline.remaining(), 0.01))
        self.requests_made += 1
        try:
            r = self.session.get(url, headers=headers, stream=stream, timeout=(min(3.0, timeout), timeout))
        except self._requests.Timeout as e:
            self._past_deadline(doing, e)
            raise RegistryUnreachableError(
                f"registry {self.base_url} is unreachable: no answer within {self.timeout:g} s (--timeout): {e}"
            ) from e
        except self._requests.RequestException as e:
            self._past_deadline(doing, e)
            why = getattr(self.deadline, "refused", "") or e  # a connection the deadline would not start, and why
            raise RegistryUnreachableError(f"registry {self.base_url} is unreachable: {why}") from e
        self.header_bytes_in += len(f"HTTP/1.1 {r.status_code} {r.reason}\r\n\r\n") + sum(
            len(k) + len(v) + 4 for k, v in r.headers.items()
        )
        return r

    def _body(self, r, what: str, max_length: int) -> bytes:
        """The response body, at most ``max_length`` bytes (streamed: a hostile server cannot make it bigger)."""
        out = bytearray()
        try:
            for data in r.iter_content(1 << 16):
                self.bytes_in += len(data)
                out += data
                if len(out) > max_length:
                    raise FleetSecurityError(f"{what} is longer than the {max_length} bytes allowed")
                self._past_deadline(f"reading {what}")
        except self._requests.RequestException as e:
            self._past_deadline(f"reading {what} ({len(out)} bytes in)", e)
            raise RegistryUnreachableError(f"reading {what} from {self.base_url} was cut: {e}") from e
        self._past_deadline(f"reading {what} ({len(out)} bytes in)")  # a cut can look like a short, whole answer
        return bytes(out)

    def _past_deadline(self, doing: str, cause: Exception | None = None) -> None:
        """Raise the deadline's error once it has passed (a read it cut shows up as a dropped connection)."""
        if self.deadline is not None and self.deadline.expired:
            raise self.deadline.error(doing) from cause

    def manifest_bytes(self, reference: str, etag: str | None = None) -> tuple[bytes, str] | None:
        """The raw manifest tagged ``reference`` and its digest; ``None`` (HTTP 304) when it still has digest ``etag``.

        Raises ``FileNotFoundError`` if the tag is absent. Bodies are bounded by :data:`MAX_MANIFEST`.
        """
        import hashlib

        url = f"{self.base_url}/v2/{self.repository}/manifests/{reference}"
        headers = {"Accept": MEDIA["manifest"]} | ({"If-None-Match": f'"{etag}"'} if etag else {})
        with self._get(url, headers, stream=True) as r:
            body = self._body(r, f"manifest {self.repository}:{reference}", MAX_MANIFEST)
        if r.status_code == 304 and etag:
            return None
        if r.status_code == 404:
            raise FileNotFoundError(f"{self.repository}:{reference} is not in registry {self.base_url}")
        if r.status_code != 200:
            raise _http_error(r.status_code, f"GET {url} answered HTTP {r.status_code}: {body[:200]!r}")
        return body, "sha256:" + hashlib.sha256(body).hexdigest()

    def manifest(self, reference: str) -> dict:
        """The manifest tagged ``reference`` (raises ``FileNotFoundError`` if absent)."""
        body, _ = self.manifest_bytes(reference)
        return parse_manifest(body, f"{self.repository}:{reference}")

    def blob_chunks(
        self,
        digest: str,
        start: int = 0,
        chunk: int = 1 << 16,
        on_chunk: Callable[[int], None] | None = None,
        length: int | None = None,
    ) -> Iterator[bytes]:
        """Yield the blob's bytes from offset ``start`` (HTTP Range); raises if the server ignores the range, or if
        the whole blob's size it announces (Content-Length, or Content-Range's total) is not ``length``."""
        url = f"{self.base_url}/v2/{self.repository}/blobs/{digest}"
        headers = {"Range": f"bytes={start}-"} if start else {}
        r = self._get(url, headers, stream=True)
        with r:
            if r.status_code == 404:
                raise FileNotFoundError(f"blob {digest} is not in {self.repository} on {self.base_url}")
            if r.status_code == 416:
                return
            if r.status_code not in (200, 206) or (start and r.status_code != 206):
                raise _http_error(r.status_code, f"GET {url} (from byte {start}) answered HTTP {r.status_code}")
            total = _announced(r.headers, r.status_code == 206)
            if length is not None and total is not None and total != length:
                raise FleetSecurityError(f"the registry's blob {digest} is {total} bytes, {length} were signed")
            got = start
            try:
                for data in _pieces(r, chunk):  # as they arrive: a cut mid-chunk keeps what came
                    self.bytes_in += len(data)
                    got += len(data)
                    if on_chunk is not None:
                        on_chunk(len(data))
                    yield data
                    self._past_deadline(f"downloading {digest[:19]}... (at byte {got})")
            except self._requests.RequestException as e:
                self._past_deadline(f"downloading {digest[:19]}... (at byte {got})", e)
                raise RegistryUnreachableError(f"download of {digest} from {self.base_url} was cut: {e}") from e
            self._past_deadline(f"downloading {digest[:19]}... (at byte {got})")

    def blob_bytes(self, digest: str, max_length: int) -> bytes:
        """The whole blob, at most ``max_length`` bytes, checked against its digest (sha256)."""
        import hashlib

        out = bytearray()
        for data in self.blob_chunks(digest):
            out += data
            if len(out) > max_length:
                raise FleetSecurityError(f"blob {digest} is longer than the {max_length} bytes allowed")
        if "sha256:" + hashlib.sha256(out).hexdigest() != digest:
            raise FleetSecurityError(f"blob {digest} from {self.base_url} does not match its digest")
        return bytes(out)


def _pieces(r, chunk: int) -> Iterator[bytes]:
    """The body of the streamed response ``r`` in pieces of at most ``chunk`` bytes, each yielded as soon as the
    socket gives it (urllib3's ``read1``: one receive). ``iter_content(chunk)`` waits for a whole chunk, so a
    download cut by the deadline lost up to 64 KiB, and a link slower than a chunk per ``--deadline`` never
    finished. Errors come as ``requests`` exceptions, as from ``iter_content``."""
    import requests
    from urllib3.exceptions import HTTPError

    while True:
        try:
            data = r.raw.read1(chunk, decode_content=True)
        except (HTTPError, OSError) as e:  # a shut or reset socket, a broken chunked body
            raise requests.ConnectionError(str(e)) from e
        if not data:
            return
        yield data


def _http_error(status: int, message: str) -> FleetError:
    """HTTP 5xx or 429 (a registry restarting, overloaded or behind a failing proxy) is the registry being
    unavailable, as a refused connection is: sync keeps what it has and exits 1 (try again later)."""
    if status >= 500 or status == 429:
        return RegistryUnreachableError(f"{message} (the registry is unavailable; try again later)")
    return FleetError(message)


def _announced(headers, partial: bool) -> int | None:
    """The whole blob's size a response announces: Content-Range's total (206) or Content-Length (200); None when
    it announces none, or sends the bytes encoded (a compressed length is not the blob's)."""
    if headers.get("Content-Encoding", "identity").lower() not in ("", "identity"):
        return None
    try:
        if partial:
            total = headers.get("Content-Range", "").rpartition("/")[2]
            return int(total) if total.isdigit() else None
        size = headers.get("Content-Length", "")
        return int(size) if size.isdigit() else None
    except ValueError:
        return None


MAX_MANIFEST = 4 << 20  # the distribution registry's own limit on manifest bodies


def parse_manifest(body: bytes, what: str) -> dict:
    from edge.errors import FormatError
    from edge.format.io import load_json

    try:  # bounded depth, no duplicated keys: a registry's bytes never reach a bare RecursionError
        manifest = load_json(body, source=what)
    except FormatError as e:
        raise FleetSecurityError(f"{what} is not a JSON manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise FleetSecurityError(f"{what} is not a JSON object")
    return manifest
