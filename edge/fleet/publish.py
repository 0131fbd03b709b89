"""Publish a model and its adapters to an OCI registry with oras, and sign the release with TUF (host side).

``push`` uploads the model once (``REPO:model-<fp>``), the adapter blobs (skipped when the registry has them), a
release manifest per channel and model (``REPO:<channel>-<fp>``, its ``subject`` the model manifest), then the new
TUF metadata, timestamp last: devices see a release only once everything it names is in the registry. The
``edge release`` commands (:mod:`edge.fleet.release`) publish through :class:`Publisher` too. Each takes
``inline``: what the TUF head may carry in its manifest (a delta against the last release, or the bundle; see
:meth:`Publisher.tuf_files`), ``timeout`` (each connect and read) and ``deadline`` (the whole command, however
slowly a registry answers: :mod:`edge.fleet.deadline`).
Needs ``oras`` and ``tuf`` (no torch). See :mod:`edge.fleet.oci` for the layout.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

from edge.errors import AdapterMismatchError, ConfigError
from edge.fleet.deadline import Deadline, DeadlineExceededError, bound_session
from edge.fleet.oci import (
    ANN,
    MEDIA,
    FleetError,
    RegistryUnreachableError,
    check_name,
    fp_hex,
    model_tag,
    release_tag,
    require_fleet,
    target_path,
)
from edge.fleet.tufrepo import Expiry, TufRepo

__all__ = ["DEADLINE", "INLINE", "TIMEOUT", "Publisher", "push"]

_EMPTY = b"{}"
TIMEOUT = 30.0  # seconds for each connect and read of a host-side request (a large upload reads only at its end)
#: seconds a whole push or release may take (``--deadline``): a CI job's budget, long enough for a large model on
#: a slow uplink (it is uploaded once); a push it cuts is run again, skipping the blobs already uploaded
DEADLINE = 1800.0
_THEN = (
    "devices still see what was published before (the TUF head moves last) and the host committed nothing: run it "
    "again (blobs already uploaded are skipped), or give it more time with --deadline"
)
_HEAD_CUT = (
    "the cut came while the registry was taking the new TUF head, so the release may or may not be live: run the "
    "same command again, which publishes it either way"
)
INLINE = ("delta", "bundle")  # what a head may carry inline, in order of preference (see Publisher.tuf_files)


def _oras_registry(hostname: str, insecure: bool, timeout: float, deadline: Deadline):
    """oras-py's ``Registry``, one attempt per request, each connect and read bounded by ``timeout`` seconds, all
    of them (name lookups, every byte up and down) by ``deadline`` (:func:`edge.fleet.deadline.bound_session`).

    oras-py sends requests without a timeout (a registry that accepts and never answers hangs a push
    forever) and retries every failed one five times, sleeping 3, 5, 11, 29 and 83 s (its
    ``decorator.retry``): 134 s before an unreachable registry is reported. A failed push is simply run
    again (blobs already uploaded are skipped, the host's TUF state is committed only after the head).
    """
    import oras.provider

    class _Registry(oras.provider.Registry):
        # without the retry decorator (a release of oras-py without one has nothing to unwrap)
        do_request = getattr(oras.provider.Registry.do_request, "__wrapped__", oras.provider.Registry.do_request)

    reg = _Registry(hostname=hostname, insecure=insecure)
    bound_session(reg.session, timeout, deadline)
    return reg


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Publisher:
    """Writes artifacts to ``registry``/``repository`` through oras-py's ``Registry`` provider."""

    def __init__(
        self,
        registry: str,
        repository: str,
        insecure: bool = False,
        inline: tuple[str, ...] = INLINE,
        timeout: float = TIMEOUT,
        deadline: float = DEADLINE,
        action: str = "push",
    ):
        require_fleet(host=True)
        if not isinstance(inline, (tuple, list)) or set(inline) - set(INLINE):
            raise ConfigError(f"inline={inline!r}: give a subset of {INLINE} (() for a registry that refuses `data`)")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ConfigError(f"timeout must be > 0 seconds, got {timeout!r}")
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 < deadline < 1e9:
            raise ConfigError(f"deadline must be a number of seconds > 0, got {deadline!r}")
        self.registry, self.repository, self.inline, self.timeout = registry, repository, tuple(inline), timeout
        self.deadline = Deadline(deadline, action=action, then=_THEN)  # from now: the command's network part
        self.oras = _oras_registry(registry, insecure, timeout, self.deadline)
        self.bytes_out = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="edge-push-")

    def close(self) -> None:
        self.deadline.close()
        self._tmp.cleanup()

    def _container(self, repo: str, tag: str):
        return self.oras.get_container(f"{self.registry}/{repo}:{tag}")

    def blob(self, repo: str, data: bytes | None, media_type: str, path: Path | None = None, **annotations) -> dict:
        """Upload bytes (or a file) unless the registry already has them; return the OCI descriptor."""
        if data is None:
            from edge.format.io import read_bounded
            from edge.runtime import MAX_MODEL_BYTES

            data = read_bounded(path, MAX_MODEL_BYTES, what="model file")  # read_model_info read it bounded too
        desc = {"mediaType": media_type, "size": len(data), "digest": _digest(data)}
        if annotations:
            desc["annotations"] = {k: str(v) for k, v in annotations.items()}
        container = self._container(repo, "latest")
        try:
            if self.oras.blob_exists(desc, container):
                return desc
            fd, tmp = tempfile.mkstemp(dir=self._tmp.name)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            r = self.oras.upload_blob(tmp, container, desc)
            os.unlink(tmp)
        except FleetError:
            raise
        except Exception as e:  # requests / oras raise many kinds; one error that names the registry
            raise self._error(f"uploading a blob to {self.registry}/{repo}", e) from e
        if r.status_code not in (200, 201, 202):
            raise FleetError(
                f"registry {self.registry} refused blob {desc['digest']}: HTTP {r.status_code} {r.text[:200]}"
            )
        self.bytes_out += len(data)
        return desc

    def manifest(self, repo: str, tag: str, manifest: dict) -> dict:
        """Upload a manifest under ``tag`` as compact JSON (devices read these bytes); return its descriptor."""
        import jsonschema
        import oras.schemas

        body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
        container = self._container(repo, tag)
        try:
            jsonschema.validate(manifest, schema=oras.schemas.manifest)
            r = self.oras.do_request(
                f"{self.oras.prefix}://{container.manifest_url()}",
                "PUT",
                headers={"Content-Type": MEDIA["manifest"]},
                data=body,
            )
        except Exception as e:
            raise self._error(f"uploading manifest {repo}:{tag} to {self.registry}", e) from e
        if r.status_code not in (200, 201):
            raise FleetError(
                f"registry {self.registry} refused manifest {repo}:{tag}: HTTP {r.status_code} {r.text[:300]}"
            )
        self.bytes_out += len(body)
        return {"mediaType": MEDIA["manifest"], "digest": _digest(body), "size": len(body)}

    def _error(self, doing: str, e: Exception) -> FleetError:
        """A typed error: :class:`DeadlineExceededError` once the deadline passed (a cut shows up as a dropped
        connection), :class:`RegistryUnreachableError` (naming the timeout) when the registry did not answer."""
        import requests

        if isinstance(e, DeadlineExceededError) or self.deadline.expired:
            return self.deadline.error(doing)
        what = f"cannot {doing.replace('uploading', 'upload', 1)}"
        if isinstance(e, requests.Timeout):
            return RegistryUnreachableError(f"{what}: no answer within {self.timeout:g} s (--timeout): {e}")
        if isinstance(e, requests.ConnectionError):
            return RegistryUnreachableError(f"{what}: the registry is unreachable: {e}")
        return FleetError(f"{what}: {e}")

    def artifact(self, repo: str, tag: str, artifact_type: str, config: dict, layers: list[dict], **kw) -> dict:
        return self.manifest(
            repo,
            tag,
            {"schemaVersion": 2, "mediaType": MEDIA["manifest"], "artifactType": artifact_type, "config": config}
            | {"layers": layers}
            | kw,
        )

    def tuf_files(
        self, files: list[tuple[str, bytes]], root_version: int, previous: Mapping[str, bytes] | None = None
    ) -> dict:
        """Publish TUF metadata to ``<repository>/tuf``: each versioned file as a one-layer artifact tagged by
        its name, then the head (tag ``timestamp.json``): a manifest whose config is the bundle of every
        file given (:func:`edge.fleet.tuf_oci.encode_bundle`). Inline in the head (descriptor ``data``):
        the delta against ``previous`` (role -> the bytes devices hold from the last release) when it
        fits in ``EMBED_MAX``, else the bundle when that fits, else nothing (devices fetch the blob);
        ``inline`` (given to the constructor) may turn either off, e.g. for a registry that refuses
        the OCI 1.1 descriptor ``data`` field.
        The head goes last: devices see the release only once everything it names is in the registry.
        Returns the sizes and which of the three the head carries.
        """
        from edge.fleet.tuf_oci import EMBED_MAX, HEAD_TAG, encode_bundle, encode_delta

        repo = f"{self.repository}/tuf"
        config = self.blob(repo, _EMPTY, MEDIA["empty"])
        for filename, data in files:
            if filename != HEAD_TAG:  # devices a release behind read older files by these tags
                layer = self.blob(repo, data, MEDIA["tuf_metadata"])
                self.artifact(repo, filename, MEDIA["tuf_artifact"], config, [layer])
        bundle = encode_bundle(files, root_version)
        head = self.blob(repo, bundle, MEDIA["tuf_bundle"])
        delta = encode_delta(files, root_version, previous or {})
        layers, inline = [], "none"
        if "delta" in self.inline and delta is not None and len(delta[0]) <= EMBED_MAX:
            data, base, roles = delta  # the registry must hold every blob a manifest names, so upload it too
            desc = self.blob(
                repo, data, MEDIA["tuf_delta"], **{ANN["delta_base"]: base, ANN["delta_roles"]: " ".join(roles)}
            )
            layers, inline = [desc | {"data": base64.b64encode(data).decode()}], "delta"
        elif "bundle" in self.inline and len(bundle) <= EMBED_MAX:
            head, inline = head | {"data": base64.b64encode(bundle).decode()}, "bundle"
        self.deadline.check(f"about to publish the TUF head {repo}:{HEAD_TAG}")  # nothing live yet
        try:
            body = self.manifest(
                repo, HEAD_TAG, {"schemaVersion": 2, "mediaType": MEDIA["manifest"], "config": head, "layers": layers}
            )
        except DeadlineExceededError as e:
            raise self.deadline.error(f"publishing the TUF head {repo}:{HEAD_TAG}", then=_HEAD_CUT) from e
        return {
            "inline": inline,
            "bundle_bytes": len(bundle),
            "delta_bytes": len(delta[0]) if delta else None,
            "manifest_bytes": body["size"],
        }


def push(
    registry: str,
    repository: str,
    channel: str,
    model: str | Path,
    adapters: list[str | Path],
    tuf_dir: str | Path,
    keys_dir: str | Path,
    *,
    replace: bool = False,
    insecure: bool = False,
    expiry: Expiry | None = None,
    inline: tuple[str, ...] = INLINE,
    timeout: float = TIMEOUT,
    deadline: float = DEADLINE,
) -> dict:
    """Publish ``adapters`` for ``model`` on ``channel`` and sign the release (see the module doc).

    Every adapter is checked first (format, base fingerprint, shapes); nothing is uploaded if one
    fails. With ``replace``, adapters of this channel and model not given here are withdrawn.
    """
    from edge.fleet.model import model_media_type
    from edge.format.adapter import MAX_FILE_BYTES, load_adapter
    from edge.format.io import read_bounded
    from edge.format.signing import MAX_SIG_BYTES
    from runtimes import read_model_info

    check_name("channel", channel)
    info = read_model_info(model)
    fp = info.fingerprint
    checked: dict[str, tuple[Path, object]] = {}
    sigs: dict[str, bytes] = {}  # a detached signature (`edge sign`) travels with its adapter: read before any upload
    for p in map(Path, adapters):
        a = load_adapter(p)
        if a.base_fingerprint != fp:
            raise AdapterMismatchError(f"{p}: adapter {a.name!r} is for base {a.base_fingerprint}, the model is {fp}")
        a.check_against(info)
        name = check_name("adapter name", a.name)
        if name in checked:
            raise ConfigError(f"two adapters are named {name!r} ({checked[name][0]} and {p}); names must be unique")
        checked[name] = (p, a)
        if (sig := p.with_name(p.name + ".sig")).exists():
            sigs[name] = read_bounded(sig, MAX_SIG_BYTES, what="adapter signature")
    tuf = TufRepo.load(tuf_dir, keys_dir, expiry)
    pub = Publisher(registry, repository, insecure, inline, timeout, deadline)
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        model_desc = _push_model(pub, Path(model), info, model_media_type(model))
        add = {}
        for name, (p, a) in checked.items():
            data = read_bounded(p, MAX_FILE_BYTES, what="adapter")  # load_adapter read it bounded too
            desc = pub.blob(repository, data, MEDIA["adapter"])
            custom = {"method": a.method}  # name, model and digest are in the path and hashes already
            add[target_path(channel, fp, name)] = (len(data), desc["digest"].split(":", 1)[1], custom)
            if (sdata := sigs.get(name)) is not None:
                sdesc = pub.blob(repository, sdata, MEDIA["signature"])
                add[target_path(channel, fp, name) + ".sig"] = (len(sdata), sdesc["digest"].split(":", 1)[1], {})
        prefix = f"{channel}/{fp_hex(fp)}/"
        remove = [t for t in tuf.targets(prefix) if t not in add] if replace else []
        remove += [f"{t}.sig" for t in add if not t.endswith(".sig") and f"{t}.sig" not in add]  # unsigned now
        withdrawn = set(tuf.targets(prefix))
        files = tuf.stage_targets(add, remove)
        withdrawn -= set(tuf.targets(prefix))
        current = tuf.targets(prefix)
        release = _push_release(pub, channel, fp, info.name, current, model_desc, created)
        head = None
        if files:  # timestamp.json is the last file: the release becomes visible here
            head = pub.tuf_files(files, tuf.root_version, tuf.published(files))
            tuf.commit(files)
    finally:
        pub.close()
    changed = {t for t in add if files and current[t].custom.get("version") == tuf.release}
    return {
        "registry": registry,
        "repository": repository,
        "channel": channel,
        "fingerprint": fp,
        "model": {"tag": model_tag(fp), "digest": model_desc["digest"]},
        "release": {"tag": release_tag(channel, fp), "digest": release["digest"], "number": tuf.release},
        "adapters": [
            {
                "name": _name(path),
                "version": tf.custom["version"],
                "bytes": tf.length,
                "digest": "sha256:" + tf.hashes["sha256"],
                "changed": path in changed,
                "signed": path + ".sig" in current,
            }
            for path, tf in current.items()
            if not path.endswith(".sig")
        ],
        "withdrawn": sorted(withdrawn),
        "tuf_files": [f for f, _ in files],
        "tuf_head": head,
        "bytes_uploaded": pub.bytes_out,
    }


def _name(target: str) -> str:
    return target.rsplit("/", 1)[1].removesuffix(".sig").removesuffix(".safetensors")


def _push_model(pub: Publisher, path: Path, info, media_type: str) -> dict:
    repo = pub.repository
    config = pub.blob(repo, info.to_json().encode(), MEDIA["model_config"])
    layer = pub.blob(
        repo, None, media_type, path=path, **{ANN["title"]: path.name, ANN["fingerprint"]: info.fingerprint}
    )
    ann = {ANN["fingerprint"]: info.fingerprint, ANN["model_name"]: info.name}  # no date: same bytes, same digest
    return pub.artifact(repo, model_tag(info.fingerprint), MEDIA["model_artifact"], config, [layer], annotations=ann)


def _push_release(pub: Publisher, channel: str, fp: str, model_name: str, current: dict, model_desc: dict, created):
    """The channel's adapter set for one model as one manifest: layers = adapters, subject = the model."""
    layers, index = [], {}
    for path, tf in current.items():
        c, digest, is_sig = tf.custom, "sha256:" + tf.hashes["sha256"], path.endswith(".sig")
        ann = {ANN["title"]: path.rsplit("/", 1)[1], ANN["adapter"]: _name(path), ANN["version"]: c["version"]}
        if not is_sig:
            ann |= {ANN["method"]: c.get("method", ""), ANN["base"]: fp, ANN["format"]: "edge.adapter/1"}
            index[_name(path)] = {"version": c["version"], "digest": digest, "target": path}
        else:
            index.setdefault(_name(path), {})["signature"] = digest
        ann = {k: str(v) for k, v in ann.items()}  # OCI annotations are strings
        media = MEDIA["signature"] if is_sig else MEDIA["adapter"]
        layers.append({"mediaType": media, "size": tf.length, "digest": digest, "annotations": ann})
    cfg = json.dumps({"channel": channel, "fingerprint": fp, "adapters": index}, sort_keys=True).encode()
    config = pub.blob(pub.repository, cfg, MEDIA["release_config"])
    ann = {ANN["channel"]: channel, ANN["fingerprint"]: fp, ANN["model_name"]: model_name, ANN["created"]: created}
    return pub.artifact(
        pub.repository,
        release_tag(channel, fp),
        MEDIA["release_artifact"],
        config,
        layers,
        subject=model_desc,
        annotations=ann,
    )
