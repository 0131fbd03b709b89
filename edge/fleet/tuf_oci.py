"""python-tuf's ngclient reading TUF metadata stored as OCI artifacts (device side, no server of our own).

ngclient asks its fetcher for URLs under ``metadata_base_url``; here that base is ``oci:tuf/`` and
the last path part (``timestamp.json``, ``7.snapshot.json``, ``3.bins-0a.json``) is the tag of a
one-layer artifact in ``<repository>/tuf``. The fetcher reads the manifest, checks the layer's
media type and reads the blob; ngclient then verifies signatures, versions, expiry and lengths as
usual. Targets (adapters) are not fetched through ngclient: :mod:`edge.fleet.sync` downloads them
by digest with resumable ranges and checks them with ``TargetFile.verify_length_and_hashes``.
"""

from __future__ import annotations

from collections.abc import Iterator

from edge.fleet.oci import ANN, MEDIA, FleetSecurityError, OciClient, RegistryUnreachableError

__all__ = ["OciMetadataFetcher", "METADATA_BASE_URL", "bin_probe_paths"]

METADATA_BASE_URL = "oci:tuf/"
_MAX_METADATA = 8 << 20


def _fetcher_base():
    from tuf.ngclient.fetcher import FetcherInterface

    return FetcherInterface


class OciMetadataFetcher(_fetcher_base()):  # type: ignore[misc]
    """A ``tuf.ngclient.FetcherInterface`` over an :class:`~edge.fleet.oci.OciClient`.

    ``unreachable`` is set when a request failed because the registry did not answer, so the
    caller can tell "offline" from "verification failed".
    """

    def __init__(self, client: OciClient):
        self.client = client
        self.unreachable: RegistryUnreachableError | None = None
        self.hints: dict[str, str] = {}

    def _fetch(self, url: str) -> Iterator[bytes]:
        from tuf.api.exceptions import DownloadHTTPError

        if not url.startswith(METADATA_BASE_URL):
            raise DownloadHTTPError(f"{url} is outside the fleet's TUF metadata", 404)
        tag = url[len(METADATA_BASE_URL) :]
        try:
            digest = self.hints.get(tag) or self._layer(tag)
            yield from self.client.blob_chunks(digest)
        except FileNotFoundError as e:
            raise DownloadHTTPError(str(e), 404) from e
        except RegistryUnreachableError as e:
            self.unreachable = e
            raise

    def _layer(self, tag: str) -> str:
        """The digest of the metadata blob tagged ``tag``.

        The timestamp's manifest lists the digests of the files published with it (snapshot,
        changed bins), so those are read by digest without fetching their manifests. The hints are
        not trusted: ngclient verifies whatever bytes they lead to.
        """
        manifest = self.client.manifest(tag)
        layers = manifest.get("layers") if isinstance(manifest, dict) else None
        if not layers or not isinstance(layers[0], dict) or layers[0].get("mediaType") != MEDIA["tuf_metadata"]:
            raise FleetSecurityError(f"{self.client.repository}:{tag} is not a TUF metadata artifact")
        digest, size = layers[0].get("digest"), layers[0].get("size")
        if not isinstance(digest, str) or not digest.startswith("sha256:") or not isinstance(size, int):
            raise FleetSecurityError(f"{self.client.repository}:{tag} has a malformed layer")
        if size > _MAX_METADATA:
            raise FleetSecurityError(
                f"{self.client.repository}:{tag} is {size} bytes, over the {_MAX_METADATA} allowed"
            )
        if tag == "timestamp.json":
            text = (manifest.get("annotations") or {}).get(ANN["tuf_blobs"], "")
            for item in text.split() if isinstance(text, str) else ():
                name, _, d = item.partition("=")
                if d.startswith("sha256:"):
                    self.hints[name] = d
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
