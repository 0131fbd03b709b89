"""The TUF head and the sync lock (helper H, session 21, mending review E21 findings 5, 6 and 7).

Before: a head bundle holding a lone surrogate (JSON ``"\\ud800"``) was blamed on the device's disk ("cannot read
the TUF metadata cache") and raised out of ``sync`` instead of a rejected release; a head naming a bundle blob the
registry does not have said "has the host run `edge release init`?" on a device that had synced before; a config
digest of another form than ``sha256:`` + 64 hex went into a URL path; a sync that waited for another sync's lock
until its deadline exited 2 although the README says a sync cut by ``--deadline`` (waiting included) exits 1.
"""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import json

import pytest

pytest.importorskip("oras", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("tuf", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")
pytest.importorskip("filelock", reason="fleet tests need the fleet extra: pip install 'edge-adapt[fleet]'")

import requests  # noqa: E402
from _registry import SKIP_REASON, registry_binary  # noqa: E402
from test_fleet import REPO, Fleet  # noqa: E402

from edge.fleet import FleetError, FleetSecurityError, sync  # noqa: E402
from edge.fleet.oci import MEDIA, OciClient  # noqa: E402
from edge.fleet.tuf_oci import HEAD_TAG, decode_bundle  # noqa: E402

pytestmark = pytest.mark.skipif(registry_binary() is None, reason=SKIP_REASON)
MANIFEST = MEDIA["manifest"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("fleetmend_head"), n=2, nbytes=6_000)
    f.push()
    assert f.sync("dev").status == "updated"  # a device that has synced before
    url = f"http://{f.reg.host}/v2/{REPO}/tuf/manifests/{HEAD_TAG}"
    f.head = requests.get(url, headers={"Accept": MANIFEST}, timeout=5).content
    yield f
    f.close()


@pytest.fixture
def head(monkeypatch):
    """Serve a head manifest (a dict) as a hostile mirror would (the registry itself refuses to store one whose
    config blob it lacks); every other request goes to the registry."""
    real = OciClient.manifest_bytes

    def put(manifest: dict) -> None:
        body = json.dumps(manifest).encode()

        def served(self, reference, etag=None):
            if reference != HEAD_TAG or not self.repository.endswith("/tuf"):
                return real(self, reference, etag)
            self.requests_made += 1
            return body, "sha256:" + hashlib.sha256(body).hexdigest()

        monkeypatch.setattr(OciClient, "manifest_bytes", served)

    return put


def _inline(manifest: dict, doc_bytes: bytes) -> dict:
    bundle = gzip.compress(doc_bytes)
    out = copy.deepcopy(manifest)
    out["layers"] = []
    out["config"] = {
        "mediaType": manifest["config"]["mediaType"],
        "digest": "sha256:" + hashlib.sha256(bundle).hexdigest(),
        "size": len(bundle),
        "data": base64.b64encode(bundle).decode(),
    }
    return out


SURROGATE = b'{"format": "edge.tuf-bundle/1", "root": 1, "files": {"timestamp.json": "\\ud800"}}'


def test_a_lone_surrogate_in_the_bundle_is_a_rejected_release_not_the_devices_disk(fleet, head, tmp_path):
    with pytest.raises(FleetSecurityError, match="timestamp.json holds text that is not UTF-8"):
        decode_bundle(gzip.compress(SURROGATE), "head")
    head(_inline(json.loads(fleet.head), SURROGATE))
    before = fleet.installed("dev")
    for device in ("dev", "new"):
        rep = fleet.sync(device)  # before: FleetError "cannot read the TUF metadata cache in ..."
        assert rep.status == "rejected" and "not UTF-8" in rep.reason and "cache" not in rep.reason, rep
    assert fleet.installed("dev") == before and fleet.installed("new") == {}


def test_a_head_naming_a_bundle_the_registry_lacks_says_so(fleet, head):
    manifest = json.loads(fleet.head)
    manifest["config"]["digest"] = "sha256:" + "0" * 64
    manifest["layers"] = []  # no delta: the device reads the bundle blob
    head(manifest)
    with pytest.raises(FleetError) as e:
        fleet.sync("dev")
    msg = str(e.value)  # before: "no TUF metadata in ...; has the host run `edge release init` and `edge push`?"
    assert "incomplete" in msg and "names the bundle blob sha256:" + "0" * 64 in msg and "release init" not in msg, msg


@pytest.mark.parametrize("digest", ["sha256:../../../x", "sha256:" + "A" * 64, "sha512:" + "0" * 128])
def test_a_config_digest_of_another_form_never_becomes_a_url(fleet, head, digest):
    manifest = json.loads(fleet.head)
    manifest["config"]["digest"] = digest
    head(manifest)
    rep = fleet.sync("dev")  # before (../): GET /v2/edge/adapters/tuf/x
    assert rep.status == "rejected" and "malformed" in rep.reason and "descriptor" in rep.reason, rep
    assert rep.requests == 1, rep  # the head only


def test_a_sync_waiting_for_another_until_its_deadline_is_offline_exit_1(fleet, capsys):
    import dataclasses

    from filelock import FileLock

    from edge.cli import main

    cfg = dataclasses.replace(fleet.cfg(), deadline=0.5)
    with FileLock(str(fleet.tmp / "dev" / ".edge-sync.lock")):
        rep = sync(cfg, fleet.tmp / "dev", model=fleet.model)  # before: FleetError
        assert rep.status == "offline" and "another sync is running" in rep.reason and "try again later" in rep.reason
        args = ["sync", f"{fleet.reg.host}/{REPO}", "--insecure", "--tuf-root", str(fleet.tmp / "tuf" / "root.json")]
        code = main([*args, "--adapters", str(fleet.tmp / "dev"), "--model", str(fleet.model), "--deadline", "0.5"])
    out = capsys.readouterr()
    assert code == 1 and out.out.startswith("offline:") and not out.err, out  # before: exit 2
    assert "another sync is running" in out.out.splitlines()[1]
