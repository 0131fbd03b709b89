"""The TUF head bundle (edge.fleet.tuf_oci): round trip and hostile input, no registry needed."""

from __future__ import annotations

import gzip
import json

import pytest

pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

from edge.fleet import FleetSecurityError  # noqa: E402
from edge.fleet.tuf_oci import BUNDLE_FORMAT, decode_bundle, encode_bundle  # noqa: E402


def _gz(doc) -> bytes:
    return gzip.compress(json.dumps(doc).encode(), mtime=0)


def test_round_trip_keeps_every_byte_and_is_deterministic():
    files = [
        ("timestamp.json", b'{"signed":{"v":2}}'),
        ("2.snapshot.json", b'{"a":"\\u00e9"}'),
        ("2.bins-0.json", b"{}"),
    ]
    data = encode_bundle(files, 3)
    assert data == encode_bundle(files, 3) and data[:2] == b"\x1f\x8b"
    assert decode_bundle(data) == (3, dict(files))


@pytest.mark.parametrize(
    "data, match",
    [
        (b"not gzip", "not gzip"),
        (gzip.compress(b"x" * (9 << 20)), "inflates"),  # a bomb: stopped at the bound, never inflated whole
        (_gz([1, 2]), BUNDLE_FORMAT),
        (_gz({"format": "other/1", "root": 1, "files": {}}), BUNDLE_FORMAT),
        (_gz({"format": BUNDLE_FORMAT, "root": 0, "files": {}}), BUNDLE_FORMAT),
        (_gz({"format": BUNDLE_FORMAT, "root": True, "files": {}}), BUNDLE_FORMAT),
        (_gz({"format": BUNDLE_FORMAT, "root": 1, "files": {"../x.json": "{}"}}), "malformed entry"),
        (_gz({"format": BUNDLE_FORMAT, "root": 1, "files": {"1.root.json": 5}}), "malformed entry"),
        (gzip.compress(b"{not json"), "not JSON"),
    ],
    ids=["not-gzip", "bomb", "list", "format", "root-0", "root-bool", "name", "body", "json"],
)
def test_hostile_bundles_are_refused(data, match):
    with pytest.raises(FleetSecurityError, match=match):
        decode_bundle(data)


def test_encode_refuses_names_that_are_not_metadata_files():
    with pytest.raises(ValueError, match="not a TUF metadata file name"):
        encode_bundle([("targets/../../x", b"{}")], 1)
