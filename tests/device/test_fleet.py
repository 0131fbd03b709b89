"""Fleet distribution against a real OCI registry (CNCF distribution) on 127.0.0.1: push, TUF, sync, faults.

Every network connection goes to 127.0.0.1. The registry binary comes from the project's set-up
(``scripts/install-registry.sh``); without it these tests skip with that message.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest

pytest.importorskip("oras", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("filelock", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

import requests  # noqa: E402  (an oras dependency)
from _registry import SKIP_REASON, LocalRegistry, make_adapter, make_model, registry_binary  # noqa: E402

import edge  # noqa: E402
from edge.errors import AdapterMismatchError, ConfigError  # noqa: E402
from edge.fleet import Expiry, FleetConfig, FleetSecurityError, init_release, push, sync  # noqa: E402
from edge.fleet.oci import ANN, MEDIA, model_tag, release_tag  # noqa: E402

pytestmark = pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)
REPO = "edge/adapters"


_RELEASED: dict[int, Path] = {}


def _released(bits: int) -> Path:
    """A registry's storage, TUF folder and keys as ``init_release`` leaves them, made once a session per ``bits``
    and copied by every :class:`Fleet` (its keys and uploads took about a second a fleet, the copy milliseconds)."""
    if bits not in _RELEASED:
        root = Path(tempfile.mkdtemp(prefix="edge-fleet-release-"))
        atexit.register(shutil.rmtree, root, True)
        with LocalRegistry(root / "registry") as reg:
            init_release(reg.host, REPO, root / "tuf", root / "keys", bits=bits, insecure=True)
        _RELEASED[bits] = root
    return _RELEASED[bits]


class Fleet:
    """A registry, a host (keys, TUF folder, model, adapters) and helpers to push and to sync devices."""

    def __init__(self, tmp: Path, n: int = 6, nbytes: int = 24_000, d: int = 256, bits: int = 3):
        self.tmp = tmp
        self.model = tmp / "model.onnx"
        self.info = make_model(self.model, d_in=d, d_hid=d)
        self.nbytes = nbytes
        self.files = [self.adapter(i, seed=i) for i in range(n)]
        for part in ("registry", "tuf", "keys"):  # what init_release(bits=bits) leaves: 2**bits hash bins
            shutil.copytree(_released(bits) / part, tmp / part)
        self.reg = LocalRegistry(tmp / "registry").start()

    def adapter(self, i: int, seed: int, nbytes: int | None = None) -> Path:
        return make_adapter(self.info, self.tmp / f"a{i:02d}.safetensors", f"a{i:02d}", nbytes or self.nbytes, seed)

    def push(self, files=None, channel: str = "stable", **kw) -> dict:
        files = self.files if files is None else files
        return push(
            self.reg.host, REPO, channel, self.model, files, self.tmp / "tuf", self.tmp / "keys", insecure=True, **kw
        )

    def cfg(self, channel: str = "stable", host: str | None = None) -> FleetConfig:
        return FleetConfig(
            host or self.reg.host, REPO, channel, self.tmp / "tuf" / "root.json", insecure=True, timeout=5
        )

    def sync(self, device: str, channel: str = "stable", host: str | None = None, **kw):
        return sync(self.cfg(channel, host), self.tmp / device, model=self.model, **kw)

    def installed(self, device: str) -> dict[str, bytes]:
        return {p.stem: p.read_bytes() for p in sorted((self.tmp / device).glob("*.safetensors"))}

    def assert_loadable(self, device: str) -> None:
        """Every installed file loads into a Runtime of the device model (format, fingerprint, shapes)."""
        rt = edge.Runtime(str(self.model))
        for p in sorted((self.tmp / device).glob("*.safetensors")):
            rt.load_adapter(str(p))

    def close(self) -> None:
        self.reg.stop()


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.close()


def _get(host: str, path: str, accept: str = MEDIA["manifest"]):
    r = requests.get(f"http://{host}/v2/{path}", headers={"Accept": accept}, timeout=5)
    r.raise_for_status()
    return r


def test_push_layout_model_once_annotations_channels(fleet):
    res = fleet.push()
    fleet.push(fleet.files[:2], channel="canary")
    fp = fleet.info.fingerprint
    model = _get(fleet.reg.host, f"{REPO}/manifests/{model_tag(fp)}")
    m = model.json()
    assert m["artifactType"] == MEDIA["model_artifact"] and m["annotations"][ANN["fingerprint"]] == fp
    assert m["layers"][0]["mediaType"] == MEDIA["model_onnx"] and m["layers"][0]["size"] == fleet.model.stat().st_size
    assert model.headers["Docker-Content-Digest"] == res["model"]["digest"]
    model_digest = model.headers["Docker-Content-Digest"]
    for channel, n in (("stable", 6), ("canary", 2)):
        rel = _get(fleet.reg.host, f"{REPO}/manifests/{release_tag(channel, fp)}").json()
        assert rel["subject"]["digest"] == model_digest  # every release references the one model manifest
        assert rel["annotations"][ANN["channel"]] == channel and len(rel["layers"]) == n
        for layer in rel["layers"]:
            ann = layer["annotations"]
            assert layer["mediaType"] == MEDIA["adapter"] and ann[ANN["base"]] == fp and ann[ANN["method"]] == "shira"
            assert ann[ANN["adapter"]] + ".safetensors" == ann[ANN["title"]]
    blobs = list((fleet.reg.root / "data/docker/registry/v2/blobs").rglob("data"))
    assert sum(b.stat().st_size == fleet.model.stat().st_size for b in blobs) == 1  # the model blob is stored once
    again = fleet.push()  # nothing changed: no new release, no adapter bytes uploaded
    assert again["tuf_files"] == [] and not any(a["changed"] for a in again["adapters"])


def test_push_refuses_adapter_for_another_model(fleet, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    info2 = make_model(other / "m.onnx", d_in=256, d_hid=256, seed=5)
    bad = make_adapter(info2, other / "x.safetensors", "x", 1000, 0)
    with pytest.raises(AdapterMismatchError):
        fleet.push([*fleet.files, bad])


def test_sync_installs_only_what_changed_and_runtime_loads_it(fleet):
    fleet.push()
    first = fleet.sync("dev")
    assert first.status == "updated" and len(first.installed) == 6
    assert fleet.installed("dev") == {p.stem: p.read_bytes() for p in fleet.files}
    fleet.assert_loadable("dev")
    assert fleet.sync("dev").status == "current"
    changed = fleet.adapter(3, seed=100)
    fleet.push([changed])
    rep = fleet.sync("dev")
    assert rep.status == "updated" and [a["name"] for a in rep.installed] == ["a03"]
    assert rep.bytes_adapters == changed.stat().st_size  # only the changed blob moved
    assert len(rep.unchanged) == 5 and rep.release == first.release + 1
    assert fleet.installed("dev")["a03"] == changed.read_bytes()
    fleet.assert_loadable("dev")


def test_a_release_moves_the_changed_adapter_plus_one_small_head_and_a_poll_moves_no_body(fleet):
    fleet.push()
    fleet.sync("dev")
    changed = fleet.adapter(3, seed=101)
    res = fleet.push([changed])
    head = res["tuf_head"]
    assert head["inline"] == "delta" and head["delta_bytes"] <= 0.55 * head["bundle_bytes"], head
    rep = fleet.sync("dev")
    assert rep.status == "updated" and [a["name"] for a in rep.installed] == ["a03"]
    assert rep.requests == 2 and rep.head == "delta"  # the head manifest (the release inline as a delta), the adapter
    assert rep.bytes_metadata == head["manifest_bytes"] and rep.bytes_adapters == changed.stat().st_size
    assert rep.bytes_total + rep.bytes_headers <= 1.1 * changed.stat().st_size, rep.to_dict()
    new = fleet.sync("new")  # no cache, so no base for the delta: the bundle blob (then the files it does not hold)
    assert new.head == "blob" and fleet.installed("new") == fleet.installed("dev")
    poll = fleet.sync("dev")  # nothing published since: HTTP 304 on the head, no body at all
    assert poll.status == "current" and poll.requests == 1 and poll.bytes_total == 0 and poll.head == "not-modified"


def test_the_registry_serves_the_head_byte_for_byte_with_its_inline_data(fleet):
    """distribution 2.8 keeps a manifest's exact bytes, the OCI 1.1 descriptor ``data`` fields included."""
    from edge.fleet.tuf_oci import EMBED_MAX, decode_bundle, inline_data

    head = _get(fleet.reg.host, f"{REPO}/tuf/manifests/timestamp.json")  # release 1, straight after init
    body = head.content
    assert head.headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(body).hexdigest()
    m = head.json()
    assert body == json.dumps(m, separators=(",", ":"), sort_keys=True).encode()  # as published, compact
    bundle = inline_data(m["config"], "head")  # the first release has no delta: the bundle itself, under the cap
    assert bundle is not None and len(bundle) <= EMBED_MAX and m["layers"] == []
    assert fleet.reg.blob_file(m["config"]["digest"]).read_bytes() == bundle  # and the blob holds the same bytes
    root, files = decode_bundle(bundle)
    assert root == 1 and files["timestamp.json"] == (fleet.tmp / "tuf/timestamp.json").read_bytes()
    rep = fleet.sync("dev")  # nothing published yet: the whole release came inline
    assert rep.status == "current" and rep.head == "inline" and rep.requests == 1
    fleet.push()
    m = _get(fleet.reg.host, f"{REPO}/tuf/manifests/timestamp.json").json()
    (delta,) = m["layers"]
    assert delta["mediaType"] == MEDIA["tuf_delta"] and "data" not in m["config"]
    assert fleet.reg.blob_file(delta["digest"]).read_bytes() == inline_data(delta, "delta")
    assert delta["annotations"][ANN["delta_roles"]].split()[-1] == "timestamp.json"


def test_a_release_over_the_cap_is_a_blob_and_the_next_one_a_delta(tmp_path):
    """40 adapters into 32 hash bins at once: neither the bundle nor the delta fits in EMBED_MAX, so the
    head names only the blob; the next release, one adapter, is a delta again."""
    from edge.fleet.tuf_oci import EMBED_MAX

    fleet = Fleet(tmp_path, n=40, nbytes=2_000, bits=5)
    try:
        first = fleet.push()["tuf_head"]
        assert first["inline"] == "none" and min(first["bundle_bytes"], first["delta_bytes"]) > EMBED_MAX, first
        m = _get(fleet.reg.host, f"{REPO}/tuf/manifests/timestamp.json").json()
        assert "data" not in m["config"] and m["layers"] == []
        rep = fleet.sync("dev")
        assert rep.status == "updated" and rep.head == "blob" and len(rep.installed) == 40
        changed = fleet.adapter(7, seed=130)
        res = fleet.push([changed])["tuf_head"]
        assert res["inline"] == "delta" and res["delta_bytes"] <= EMBED_MAX
        rep = fleet.sync("dev")
        assert rep.status == "updated" and rep.head == "delta" and rep.requests == 2
        assert fleet.installed("dev")["a07"] == changed.read_bytes()
    finally:
        fleet.close()


def test_a_device_releases_behind_reads_older_files_by_their_tags(fleet):
    from edge.fleet.oci import target_path
    from edge.fleet.tufrepo import TufRepo

    fleet.push()
    fleet.sync("dev")
    bins = TufRepo.load(fleet.tmp / "tuf", fleet.tmp / "keys").bins
    role = {i: bins.get_role_for_target(target_path("stable", fleet.info.fingerprint, f"a{i:02d}")) for i in range(6)}
    i, j = next((i, j) for i in range(6) for j in range(6) if role[i] != role[j])
    first, second = fleet.adapter(i, seed=110), fleet.adapter(j, seed=111)
    fleet.push([first])
    fleet.push([second])  # the head now bundles only this release's bin, as a delta against the release before
    rep = fleet.sync("dev")
    assert rep.status == "updated" and sorted(a["name"] for a in rep.installed) == sorted([f"a{i:02d}", f"a{j:02d}"])
    assert rep.head == "blob"  # two releases behind: its cache is not the delta's base, so the whole bundle
    assert rep.requests == 6  # head + bundle, the older bin's manifest + blob, two adapters
    assert fleet.installed("dev")[f"a{i:02d}"] == first.read_bytes()
    fleet.assert_loadable("dev")


def test_a_torn_head_cache_is_read_again(fleet):
    fleet.push()
    fleet.sync("dev")
    cache = fleet.tmp / "dev/.edge-sync/head/head.json"
    cache.write_bytes(cache.read_bytes()[:100])  # torn
    rep = fleet.sync("dev")
    assert rep.status == "current" and rep.requests == 2 and rep.bytes_metadata > 0  # manifest and bundle again
    assert rep.head == "blob"  # this device's cache is the release's result, not the delta's base
    doc = json.loads(cache.read_bytes())
    doc["bundle"]["root"] = "1"  # edited
    cache.write_text(json.dumps(doc))
    rep = fleet.sync("dev")
    assert rep.status == "current" and rep.requests == 2  # read again, never trusted as it lay


def test_tampered_head_bundle_is_refused(fleet):
    fleet.push()
    fleet.sync("dev")
    before = fleet.installed("dev")
    fleet.push([fleet.adapter(1, seed=120)])
    head = _get(fleet.reg.host, f"{REPO}/tuf/manifests/timestamp.json").json()
    assert head["config"]["mediaType"] == MEDIA["tuf_bundle"] and head["layers"][0]["mediaType"] == MEDIA["tuf_delta"]
    blob = fleet.reg.blob_file(head["config"]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    rep = fleet.sync("new")  # a device with no base for the delta reads the blob
    assert rep.status == "rejected" and "digest" in rep.reason and not rep.installed and fleet.installed("new") == {}
    assert fleet.installed("dev") == before


def _put_head(fleet: Fleet, manifest: dict) -> None:
    url = f"http://{fleet.reg.host}/v2/{REPO}/tuf/manifests/timestamp.json"
    body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    r = requests.put(url, data=body, headers={"Content-Type": MEDIA["manifest"]}, timeout=5)
    assert r.status_code == 201, r.text


def test_tampered_head_delta_is_refused(fleet):
    """An attacker who controls the registry edits the delta: the inline bytes fail their digest, or, re-hashed,
    inflate to metadata that TUF refuses. Either way the device keeps what it has."""
    from edge.fleet.publish import Publisher
    from edge.fleet.tuf_oci import decode_delta, encode_delta

    fleet.push()
    fleet.sync("dev")
    before = fleet.installed("dev")
    fleet.push([fleet.adapter(1, seed=140)])
    head = _get(fleet.reg.host, f"{REPO}/tuf/manifests/timestamp.json").json()
    delta = head["layers"][0]
    data = bytearray(base64.b64decode(delta["data"]))
    data[len(data) // 2] ^= 0x01
    _put_head(fleet, head | {"layers": [delta | {"data": base64.b64encode(bytes(data)).decode()}]})
    rep = fleet.sync("dev")
    assert rep.status == "rejected" and "does not match" in rep.reason and fleet.installed("dev") == before

    roles = delta["annotations"][ANN["delta_roles"]].split()
    previous = {r: (fleet.tmp / "dev/.edge-sync/tuf" / r).read_bytes() for r in roles}
    root, files = decode_delta(base64.b64decode(delta["data"]), b"".join(previous[r] for r in roles))
    ts = json.loads(files["timestamp.json"])
    ts["signed"]["expires"] = "2099-01-01T00:00:00Z"  # a freeze: the attacker wants the release to live forever
    files["timestamp.json"] = json.dumps(ts, separators=(",", ":")).encode()
    forged, base, _ = encode_delta(list(files.items()), root, previous)
    pub = Publisher(fleet.reg.host, REPO, insecure=True)
    try:
        desc = pub.blob(f"{REPO}/tuf", forged, MEDIA["tuf_delta"], **delta["annotations"])
    finally:
        pub.close()
    assert desc["annotations"][ANN["delta_base"]] == base  # the device's own cache is the base: it decodes
    _put_head(fleet, head | {"layers": [desc | {"data": base64.b64encode(forged).decode()}]})
    rep = fleet.sync("dev")
    assert rep.status == "rejected" and "TUF verification failed" in rep.reason and not rep.installed
    assert "signed by 0/1" in rep.reason and fleet.installed("dev") == before
    _put_head(fleet, head | {"layers": []})  # the real bundle, no delta: the forged files are not reused for it
    rep = fleet.sync("dev")
    assert rep.status == "updated" and rep.head == "blob" and fleet.installed("dev")["a01"] != before["a01"]


@pytest.fixture
def big_fleet(tmp_path):
    f = Fleet(tmp_path, n=3, d=1024)  # fc1 has 1M entries: adapters up to 12 MB
    yield f
    f.close()


def test_withdrawn_adapters_are_pruned_only_when_asked(fleet):
    fleet.push()
    fleet.sync("dev")
    res = fleet.push(fleet.files[:4], replace=True)  # withdraw a04 and a05 from the channel
    assert res["withdrawn"] == [f"stable/{fleet.info.fingerprint[7:]}/a0{i}.safetensors" for i in (4, 5)]
    kept = fleet.sync("dev")
    assert kept.status == "current" and len(fleet.installed("dev")) == 6
    pruned = fleet.sync("dev", prune=True)
    assert pruned.status == "updated" and pruned.removed == ["a04", "a05"]
    assert sorted(fleet.installed("dev")) == ["a00", "a01", "a02", "a03"]


def test_registry_without_a_release_is_a_clear_error(fleet):
    from edge.fleet import FleetError

    cfg = FleetConfig(fleet.reg.host, "edge/nothing-here", "stable", fleet.tmp / "tuf" / "root.json", insecure=True)
    with pytest.raises(FleetError, match="edge release init"):
        sync(cfg, fleet.tmp / "dev", model=fleet.model)


def test_registry_killed_mid_download_resumes_and_keeps_a_loadable_set(big_fleet):
    fleet = big_fleet
    fleet.push()
    fleet.sync("dev")
    old = fleet.installed("dev")["a00"]
    big = fleet.adapter(0, seed=200, nbytes=8_000_000)  # more than loopback buffers hold in flight (~4 MB)
    fleet.push([big])
    seen = []

    def kill_after_first_chunk(n):
        seen.append(n)
        if len(seen) == 1:
            fleet.reg.stop(kill=True)

    cut = fleet.sync("dev", on_chunk=kill_after_first_chunk)
    assert cut.status == "partial" and cut.failed and not cut.installed
    assert fleet.installed("dev")["a00"] == old
    fleet.assert_loadable("dev")  # the old set is intact
    offline = fleet.sync("dev")  # registry down: works from its cache, installs nothing unverified
    assert offline.status == "offline" and not offline.installed
    fleet.reg.start()
    done = fleet.sync("dev")
    assert done.status == "updated" and done.resumed == 1 and done.bytes_resumed_from > 0
    assert done.bytes_adapters + done.bytes_resumed_from == big.stat().st_size  # exactly the missing tail moved
    assert fleet.installed("dev")["a00"] == big.read_bytes()
    fleet.assert_loadable("dev")


def test_offline_sync_completes_a_verified_plan_from_the_cache(fleet, monkeypatch):
    from edge.fleet import device

    fleet.push()
    real = device._Sync._install

    def power_cut(self, name, t, blob):
        raise KeyboardInterrupt("power cut after the download, before the install")

    monkeypatch.setattr(device._Sync, "_install", power_cut)
    with pytest.raises(KeyboardInterrupt):
        fleet.sync("dev")
    monkeypatch.setattr(device._Sync, "_install", real)
    assert fleet.installed("dev") == {}
    fleet.reg.stop()
    rep = fleet.sync("dev")
    assert rep.status == "offline" and [a["name"] for a in rep.installed] == ["a00"]
    fleet.assert_loadable("dev")


def test_a_registry_error_on_an_adapter_blob_is_a_failure_to_retry(fleet, monkeypatch):
    from edge.fleet import FleetError, oci

    fleet.push()
    real = oci.OciClient.blob_chunks

    def server_error(self, digest, *a, **kw):
        if self.repository == REPO:  # adapter blobs only; TUF metadata still reads
            raise FleetError(f"GET {digest} answered HTTP 503")
        return real(self, digest, *a, **kw)

    monkeypatch.setattr(oci.OciClient, "blob_chunks", server_error)
    rep = fleet.sync("dev")
    assert rep.status == "partial" and len(rep.failed) == 6 and not rep.installed and "503" in rep.failed[0]["reason"]
    monkeypatch.undo()
    assert fleet.sync("dev").status == "updated" and len(fleet.installed("dev")) == 6


def test_tampered_blob_is_refused_and_the_old_adapter_kept(fleet):
    fleet.push()
    fleet.sync("dev")
    old = fleet.installed("dev")["a02"]
    changed = fleet.adapter(2, seed=300)
    res = fleet.push([changed])
    digest = next(a["digest"] for a in res["adapters"] if a["name"] == "a02")
    blob = fleet.reg.blob_file(digest)
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF  # same length, other bytes: the registry does not notice, TUF does
    blob.write_bytes(bytes(data))
    rep = fleet.sync("dev")
    assert rep.status == "rejected" and [x["name"] for x in rep.refused] == ["a02"]
    assert "sha256" in rep.refused[0]["reason"]
    assert fleet.installed("dev")["a02"] == old
    fleet.assert_loadable("dev")


def test_replayed_older_release_is_refused(fleet):
    fleet.push()
    url = f"http://{fleet.reg.host}/v2/{REPO}/tuf/manifests/timestamp.json"
    old_ts = requests.get(url, headers={"Accept": MEDIA["manifest"]}, timeout=5).content
    fleet.push([fleet.adapter(1, seed=400)])
    fleet.sync("dev")
    newest = fleet.installed("dev")
    r = requests.put(url, data=old_ts, headers={"Content-Type": MEDIA["manifest"]}, timeout=5)  # the attacker
    assert r.status_code == 201
    rep = fleet.sync("dev")
    assert rep.status == "rejected" and "TUF" in rep.reason and not rep.installed
    assert fleet.installed("dev") == newest


def test_never_installs_an_older_adapter_version(fleet):
    fleet.push()  # stable: a00 at release 2
    fleet.push([fleet.adapter(0, seed=500)], channel="canary")  # canary: a newer a00
    assert fleet.sync("dev", channel="canary").status == "updated"
    newer = fleet.installed("dev")["a00"]
    rep = fleet.sync("dev", channel="stable")  # stable names the older a00
    assert rep.status == "rejected" and [x["name"] for x in rep.refused] == ["a00"]
    assert "older" in rep.refused[0]["reason"] and fleet.installed("dev")["a00"] == newer


def test_expired_metadata_is_refused(fleet):
    fleet.push()
    fleet.sync("dev")
    before = fleet.installed("dev")
    fleet.push([fleet.adapter(4, seed=600)], expiry=Expiry(timestamp=timedelta(minutes=-1)))
    for device in ("dev", "new"):
        rep = fleet.sync(device)
        assert rep.status == "rejected" and "Expired" in rep.reason and not rep.installed
    assert fleet.installed("dev") == before and fleet.installed("new") == {}


def test_stale_mirror_is_refused(fleet, tmp_path):
    fleet.push()
    mirror_root = fleet.reg.copy_storage(tmp_path / "mirror")  # the mirror stops syncing here
    fleet.push([fleet.adapter(5, seed=700)])
    assert fleet.sync("dev").status == "updated"
    newest = fleet.installed("dev")
    with LocalRegistry(mirror_root) as mirror:
        fresh = fleet.sync("new", host=mirror.host)  # a new device may take the mirror's older, valid release
        assert fresh.status == "updated" and fresh.release < fleet.sync("dev").release
        rep = fleet.sync("dev", host=mirror.host)  # the device that saw the newer release refuses it
    assert rep.status == "rejected" and "version" in rep.reason.lower()
    assert fleet.installed("dev") == newest


def test_signed_adapters_travel_with_their_signatures(fleet):
    from edge.errors import SignatureError
    from edge.format.signing import generate_key, sign_file

    pub = generate_key(fleet.tmp / "team.pem")
    for f in fleet.files[:3]:
        sign_file(f, fleet.tmp / "team.pem")
    res = fleet.push()
    assert [a["signed"] for a in res["adapters"]] == [True, True, True, False, False, False]
    rep = fleet.sync("dev", trusted_keys=[pub])  # a device whose runtime requires signatures
    assert sorted(a["name"] for a in rep.installed) == ["a00", "a01", "a02"]
    assert sorted(x["name"] for x in rep.refused) == ["a03", "a04", "a05"] and rep.status == "rejected"
    rt = edge.Runtime(str(fleet.model), trusted_keys=[str(pub)])
    for name in ("a00", "a01", "a02"):
        rt.load_adapter(str(fleet.tmp / "dev" / f"{name}.safetensors"))
    fleet.sync("plain")  # a device without keys takes all six, signatures beside the signed ones
    assert len(fleet.installed("plain")) == 6 and len(list((fleet.tmp / "plain").glob("*.sig"))) == 3
    with pytest.raises(SignatureError):
        rt.load_adapter(str(fleet.tmp / "plain" / "a03.safetensors"))


def _fleet_converges(fleet: Fleet, devices: int) -> None:
    fleet.push()
    names = [f"d{i:03d}" for i in range(devices)]
    with ThreadPoolExecutor(devices) as ex:
        assert all(r.status == "updated" for r in ex.map(fleet.sync, names))
    changed = fleet.adapter(2, seed=800, nbytes=400_000)
    fleet.push([changed])
    lock, chunks = threading.Lock(), []

    def kill_midway(n):
        with lock:
            chunks.append(n)
            if len(chunks) == devices:  # the fleet has moved some of the release, not all of it
                fleet.reg.stop(kill=True)

    with ThreadPoolExecutor(devices) as ex:
        cut = list(ex.map(lambda d: fleet.sync(d, on_chunk=kill_midway), names))
    assert fleet.reg.proc is None and {r.status for r in cut} <= {"updated", "partial", "offline"}
    for d in names[:: max(1, devices // 5)]:
        fleet.assert_loadable(d)  # nobody is left without a loadable set
    partial = sum(any(p.stat().st_size for p in (fleet.tmp / d / ".edge-sync/partial").glob("*.part")) for d in names)
    fleet.reg.start()
    with ThreadPoolExecutor(devices) as ex:
        final = list(ex.map(fleet.sync, names))
    assert all(r.status in ("updated", "current") for r in final)
    assert sum(r.resumed for r in final) == partial  # every download the crash cut continues where it stopped
    want = {p.stem: p.read_bytes() for p in fleet.files}
    assert all(fleet.installed(d) == want for d in names)


def test_fleet_of_10_converges_through_a_registry_crash(fleet):
    _fleet_converges(fleet, 10)


@pytest.mark.slow
def test_fleet_of_50_converges_through_a_registry_crash(fleet):
    _fleet_converges(fleet, 50)


def test_bounded_load(fleet):
    """At most 120 syncs in at most 15 s from 20 devices: every one answers, none fails."""
    fleet.push()
    names = [f"d{i:02d}" for i in range(20)]
    deadline, done, lock = time.monotonic() + 15.0, [], threading.Lock()

    def worker(name):
        while time.monotonic() < deadline:
            with lock:
                if len(done) >= 120:
                    return
            rep = fleet.sync(name)
            with lock:
                done.append(rep.status)

    with ThreadPoolExecutor(len(names)) as ex:
        list(ex.map(worker, names))
    assert len(done) >= len(names) and set(done) <= {"updated", "current"}
    assert done.count("updated") == len(names)


def test_concurrent_syncs_of_one_device_serialise(fleet):
    fleet.push()
    with ThreadPoolExecutor(4) as ex:
        reps = list(ex.map(lambda _: fleet.sync("dev"), range(4)))
    assert sorted(r.status for r in reps) == ["current", "current", "current", "updated"]
    fleet.assert_loadable("dev")


def test_cli_sync_json_and_exit_codes(fleet, capsys):
    from edge.commands import push as push_cmd
    from edge.commands import sync as sync_cmd

    parser = argparse.ArgumentParser(prog="edge")
    sub = parser.add_subparsers(dest="command", required=True)
    push_cmd.register(sub)
    sync_cmd.register(sub)
    ref = f"{fleet.reg.host}/{REPO}"
    common = ["--tuf-dir", str(fleet.tmp / "tuf"), "--keys", str(fleet.tmp / "keys"), "--insecure"]
    args = parser.parse_args(["push", ref, *map(str, fleet.files), "--model", str(fleet.model), *common])
    assert args.func(args) == 0
    argv = ["sync", ref, "--tuf-root", str(fleet.tmp / "tuf/root.json"), "--adapters", str(fleet.tmp / "cli")]
    argv += ["--model", str(fleet.model), "--insecure", "--json"]
    capsys.readouterr()
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "updated" and len(out["installed"]) == 6 and out["bytes_total"] > 0
    fleet.reg.stop()
    assert args.func(args) == 1  # offline: kept what it has
    assert json.loads(capsys.readouterr().out)["status"] == "offline"


def test_cli_rejected_release_is_an_edge_error(fleet):
    fleet.push(expiry=Expiry(timestamp=timedelta(seconds=-1)))
    from edge.commands import sync as sync_cmd

    parser = argparse.ArgumentParser(prog="edge")
    sync_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "sync",
            f"{fleet.reg.host}/{REPO}",
            "--tuf-root",
            str(fleet.tmp / "tuf/root.json"),
            "--adapters",
            str(fleet.tmp / "d"),
            "--fingerprint",
            fleet.info.fingerprint,
            "--insecure",
        ]
    )
    with pytest.raises(FleetSecurityError, match="expired|Expired"):
        args.func(args)


def test_device_sync_imports_no_torch(fleet):
    fleet.push()
    code = (
        "import sys; from edge.fleet import FleetConfig, sync; "
        f"r = sync(FleetConfig({fleet.reg.host!r}, {REPO!r}, 'stable', {str(fleet.tmp / 'tuf/root.json')!r}, "
        f"insecure=True), {str(fleet.tmp / 'sub')!r}, model={str(fleet.model)!r}); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'sklearn', 'onnxscript') if m in sys.modules); "
        "print(r.status, heavy)"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["updated", "[]"]


def test_cli_sync_takes_registry_channel_and_root_from_the_device_profile(fleet, capsys):
    import yaml

    from edge.commands import sync as sync_cmd

    fleet.push()
    profiles = fleet.tmp / "profiles"
    profiles.mkdir()
    shutil.copy(fleet.tmp / "tuf/root.json", profiles / "root.json")
    profile = {
        "name": "site-a",
        "architecture": "x86_64",
        "backends": [{"backend": "onnxruntime", "providers": ["CPUExecutionProvider"]}],
        "threads": 1,
        "budgets": {"memory_mb": 512, "load_ms": 1000, "latency_p95_ms": 10, "switch_p95_ms": 5},
        "tolerances": {"atol": 1e-5, "rtol": 1e-4},
        "fallback": "error",
        "registry": f"{fleet.reg.host}/{REPO}",
        "tuf_root": "root.json",
        "registry_insecure": True,
    }
    (profiles / "site-a.yaml").write_text(yaml.safe_dump(profile))
    parser = argparse.ArgumentParser(prog="edge")
    sync_cmd.register(parser.add_subparsers(dest="command", required=True))
    argv = ["sync", "--device", "site-a", "--devices-dir", str(profiles), "--adapters", str(fleet.tmp / "prof")]
    args = parser.parse_args([*argv, "--model", str(fleet.model), "--json"])
    capsys.readouterr()
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "updated" and len(out["installed"]) == len(fleet.files)
    bare = parser.parse_args(["sync", "--adapters", str(fleet.tmp / "x"), "--model", str(fleet.model)])
    with pytest.raises(ConfigError, match="REFERENCE and --tuf-root"):
        bare.func(bare)


def test_root_key_rotation_end_to_end_with_the_cli(fleet, tmp_path, capsys):
    """`edge release rotate`: devices shipped with root 1 follow to root 2; the retired keys sign nothing they take."""
    from edge.cli import main
    from edge.fleet import refresh_release

    ref = f"{fleet.reg.host}/{REPO}"
    host = ["--tuf-dir", str(fleet.tmp / "tuf"), "--keys", str(fleet.tmp / "keys"), "--insecure"]
    shipped = shutil.copy(fleet.tmp / "tuf/root.json", tmp_path / "shipped-root.json")  # in the device image
    device = ["--tuf-root", str(shipped), "--model", str(fleet.model), "--insecure", "--json"]

    def sync_cli(name: str) -> tuple[int, dict]:
        capsys.readouterr()
        code = main(["sync", ref, "--adapters", str(fleet.tmp / name), *device])
        return code, json.loads(capsys.readouterr().out)

    assert main(["push", ref, *map(str, fleet.files), "--model", str(fleet.model), *host]) == 0
    assert sync_cli("old")[1]["status"] == "updated"
    stolen_keys = shutil.copytree(fleet.tmp / "keys", tmp_path / "stolen-keys")  # what a thief of the old keys has
    stolen_tuf = shutil.copytree(fleet.tmp / "tuf", tmp_path / "stolen-tuf")
    capsys.readouterr()
    assert main(["release", "rotate", ref, *host, "--role", "root", "--role", "timestamp", "--json"]) == 0
    rotated = json.loads(capsys.readouterr().out)
    assert rotated["root_version"] == 2 and rotated["rotated"] == ["root", "timestamp"]
    assert (fleet.tmp / "keys/retired/root.root-1.pem").exists() and not (fleet.tmp / "keys/rotating/root.pem").exists()
    assert (stolen_keys / "root.pem").read_bytes() != (fleet.tmp / "keys/root.pem").read_bytes()
    changed = fleet.adapter(2, seed=900)
    assert main(["push", ref, str(changed), "--model", str(fleet.model), *host]) == 0
    code, out = sync_cli("old")  # trusts root 1, verifies root 2 with root 1's key and root 2's own, then the release
    assert code == 0 and out["status"] == "updated" and [a["name"] for a in out["installed"]] == ["a02"]
    assert json.loads((fleet.tmp / "old/.edge-sync/tuf/root.json").read_bytes())["signed"]["version"] == 2
    code, out = sync_cli("new")  # a device first booted after the rotation, with the same shipped root 1
    assert code == 0 and len(out["installed"]) == 6 and fleet.installed("new") == fleet.installed("old")
    for _ in range(4):  # the thief publishes newer timestamps signed with the retired timestamp key
        refresh_release(fleet.reg.host, REPO, stolen_tuf, stolen_keys, insecure=True)
    before = fleet.installed("old")
    capsys.readouterr()
    assert main(["sync", ref, "--adapters", str(fleet.tmp / "old"), *device]) == 2
    err = capsys.readouterr().err
    assert "TUF verification failed" in err and "signed by 0/1" in err, err
    assert fleet.installed("old") == before


def test_rotating_the_targets_and_snapshot_keys_re_signs_every_bin(fleet):
    from edge.fleet import rotate_keys

    fleet.push()
    fleet.sync("dev")
    res = rotate_keys(
        fleet.reg.host, REPO, fleet.tmp / "tuf", fleet.tmp / "keys", ["targets", "snapshot"], insecure=True
    )
    assert res["root_version"] == 2 and sum(f.endswith(".bins-0.json") for f in res["tuf_files"]) == 1
    assert len([f for f in res["tuf_files"] if ".bins-" in f]) == 8  # every bin, signed with the new targets key
    changed = fleet.adapter(4, seed=910)
    fleet.push([changed])
    rep = fleet.sync("dev")
    assert rep.status == "updated" and [a["name"] for a in rep.installed] == ["a04"]
    assert fleet.sync("fresh").status == "updated" and fleet.installed("fresh") == fleet.installed("dev")
    with pytest.raises(ConfigError, match="rotate which keys"):
        rotate_keys(fleet.reg.host, REPO, fleet.tmp / "tuf", fleet.tmp / "keys", ["admin"], insecure=True)
