"""The TUF head bundle and delta (edge.fleet.tuf_oci): round trips and hostile input, no registry needed."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import zlib

import pytest

pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

from edge.fleet import FleetSecurityError  # noqa: E402
from edge.fleet.tuf_oci import (  # noqa: E402
    BUNDLE_FORMAT,
    DELTA_FORMAT,
    DICT_MAX,
    decode_bundle,
    decode_delta,
    encode_bundle,
    encode_delta,
    inline_data,
)


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


# -- the delta a head carries inline (encode_delta / decode_delta) and descriptor data (inline_data) -------------

_PREV = {
    "bins-0a.json": b'{"signed":{"_type":"targets","targets":{"a/x.safetensors":{"length":24448}},"version":2}}',
    "snapshot.json": b'{"signed":{"_type":"snapshot","meta":{"bins-0a.json":{"version":2}},"version":7}}',
    "timestamp.json": b'{"signed":{"_type":"timestamp","snapshot":7,"version":7}}',
}
_NEW = [
    ("3.bins-0a.json", b'{"signed":{"_type":"targets","targets":{"a/x.safetensors":{"length":24449}},"version":3}}'),
    ("8.snapshot.json", b'{"signed":{"_type":"snapshot","meta":{"bins-0a.json":{"version":3}},"version":8}}'),
    ("timestamp.json", b'{"signed":{"_type":"timestamp","snapshot":8,"version":8}}'),
]


def _base() -> bytes:
    return b"".join(_PREV[r] for r in ("bins-0a.json", "snapshot.json", "timestamp.json"))


def _raw_delta(payload: bytes, base: bytes = b"") -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=base) if base else zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(payload) + c.flush()


def test_delta_round_trip_names_its_base_and_is_smaller_than_the_bundle():
    data, base, roles = encode_delta(_NEW, 2, _PREV)
    assert roles == ["bins-0a.json", "snapshot.json", "timestamp.json"]
    assert base == "sha256:" + hashlib.sha256(_base()).hexdigest()
    assert decode_delta(data, _base()) == (2, dict(_NEW))
    assert len(data) < len(encode_bundle(_NEW, 2)) / 2  # what the previous versions already say is not sent again


def test_no_delta_without_every_previous_file_or_with_a_base_over_the_window():
    assert encode_delta(_NEW, 1, {k: v for k, v in _PREV.items() if k != "snapshot.json"}) is None
    assert encode_delta([], 1, _PREV) is None
    big = dict(_PREV, **{"snapshot.json": b" " * DICT_MAX})
    assert encode_delta(_NEW, 1, big) is None


def _header(files, root=1, fmt=DELTA_FORMAT) -> bytes:
    return json.dumps({"format": fmt, "root": root, "files": files}).encode() + b"\n"


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\xff\xff\xff", "not deflate"),
        (_raw_delta(b"\x00" * (9 << 20)), "inflates"),  # a bomb: stopped at the bound
        (_raw_delta(_header([["timestamp.json", 2]]) + b"{}")[:-2], "truncated"),
        (_raw_delta(_header([["timestamp.json", 2]]) + b"{}") + b"junk", "padded"),
        (_raw_delta(b"no header line"), "JSON header"),
        (_raw_delta(_header([], fmt="other/1")), DELTA_FORMAT),
        (_raw_delta(_header([["timestamp.json", 5]]) + b"{}"), "malformed entry"),
        (_raw_delta(_header([["timestamp.json", 1], ["timestamp.json", 1]]) + b"{}"), "malformed entry"),
        (_raw_delta(_header([["timestamp.json", 2]]) + b"{}extra"), "follow the files"),
        (_raw_delta(_header([["../x.json", 2]]) + b"{}"), "malformed entry"),
        (_raw_delta(_header([["timestamp.json", 2]]) + b"\xff\xfe"), "not UTF-8"),
        (_raw_delta(_header([["timestamp.json", 2]], root=0) + b"{}"), BUNDLE_FORMAT),
    ],
    ids=[
        "not-deflate",
        "bomb",
        "truncated",
        "padded",
        "no-header",
        "format",
        "overrun",
        "duplicate",
        "extra",
        "name",
        "utf8",
        "root",
    ],
)
def test_hostile_deltas_are_refused(data, match):
    with pytest.raises(FleetSecurityError, match=match):
        decode_delta(data, b"")


def test_inline_data_is_checked_against_size_and_digest():
    blob = encode_bundle(_NEW, 1)
    desc = {"mediaType": "x", "size": len(blob), "digest": "sha256:" + hashlib.sha256(blob).hexdigest()}
    assert inline_data(desc, "d") is None  # no data: the caller reads the blob
    assert inline_data(desc | {"data": base64.b64encode(blob).decode()}, "d") == blob
    other = base64.b64encode(blob[:-1] + bytes([blob[-1] ^ 1])).decode()
    for bad, match in [
        (desc | {"data": other}, "does not match"),
        (desc | {"data": base64.b64encode(blob).decode(), "size": len(blob) + 1}, "does not match"),
        (desc | {"data": "not base64!"}, "not base64"),
        (desc | {"data": 5}, "malformed"),
    ]:
        with pytest.raises(FleetSecurityError, match=match):
            inline_data(bad, "d")
