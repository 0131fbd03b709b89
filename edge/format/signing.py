"""Ed25519 signatures for adapter files (``cryptography`` does the cryptography).

A signature is a detached file next to the adapter, ``NAME.safetensors.sig``, JSON:
``{"format": "edge.signature", "version": 1, "alg": "ed25519", "key": KEY_ID,
"signature": BASE64}`` over the adapter file's exact bytes. ``KEY_ID`` is the first 16
hex digits of SHA-256 of the raw 32-byte public key. While ``edge sync`` replaces a signed
adapter, the file may also carry the signature of the adapter it replaces (``"previous":
{"key", "signature"}``, :func:`with_previous`), so that at every instant, and after a crash
between the two renames, the adapter file on disk verifies; either signature must be by a
trusted key and over the file's exact bytes.

The host signs (:func:`sign_file`); the device reads an adapter through one
:class:`SignaturePolicy` (every entry point builds it the same way, from explicit keys
or the device profile's ``trusted_keys``), which verifies the bytes it is about to parse,
so nothing unverified is ever parsed or applied. Trusted keys are checked when the
policy is built: a key must be a canonical encoding of a curve point of large order
(a small-order key would accept signatures nobody wrote, e.g. ``R = identity, s = 0``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from edge.errors import ConfigError, FormatError, SignatureError
from edge.format.io import atomic_write_bytes, load_json, read_bounded

__all__ = [
    "ReadFile",
    "SignaturePolicy",
    "check_public_key",
    "generate_key",
    "key_id",
    "load_public_key",
    "sign_file",
    "signature_path",
    "verify_bytes",
    "with_previous",
]

SIG_FORMAT = "edge.signature"
SIG_VERSION = 1
MAX_SIG_BYTES = 4096
MAX_KEY_FILE_BYTES = 4096
MAX_PRIVATE_KEY_BYTES = 64 * 1024
MAX_SIGNED_BYTES = 1 << 31


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise ConfigError("adapter signatures need the 'cryptography' package: pip install cryptography") from e
    return serialization, ed25519


def signature_path(adapter_path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(adapter_path)}.sig")


def generate_key(private_path: str | os.PathLike) -> Path:
    """Write a new Ed25519 private key (PEM, mode 0600 from its first byte) and its public key (``.pub``, raw hex)."""
    private_path = Path(private_path)
    if not private_path.name:
        raise ConfigError(f"{os.fspath(private_path)!r} names no file; give the private key's path, e.g. keys/k.pem")
    pub_path = private_path.with_suffix(".pub")
    if pub_path == private_path:
        raise ConfigError(f"{private_path}: the public key would overwrite the private key; name it KEY.pem")
    serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_write_bytes(private_path, pem, mode=0o600)
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    atomic_write_bytes(pub_path, (pub.hex() + "\n").encode())
    return pub_path


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


# -- Ed25519 point checks (RFC 8032 section 5.1.3 decoding, then [8]P != identity) ----------------------------------
_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _decode_point(raw: bytes) -> tuple[int, int] | None:
    """(x, y) of a canonical point encoding, or None (y >= p, no square root, or -0)."""
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    sign = raw[31] >> 7
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if (v * x * x - u) % _P:
        x = x * _SQRT_M1 % _P
        if (v * x * x - u) % _P:
            return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y


def _double(pt: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Point doubling in extended coordinates (RFC 8032 5.1.4)."""
    x, y, z, _ = pt
    a, b, c = x * x % _P, y * y % _P, 2 * z * z % _P
    h = (a + b) % _P
    e = (h - (x + y) * (x + y)) % _P
    g = (a - b) % _P
    f = (c + g) % _P
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def check_public_key(raw: bytes, *, source: str = "public key") -> bytes:
    """``raw`` if it is a usable Ed25519 public key; :class:`ConfigError` for a non-canonical
    encoding, a value that is not a curve point, or a point of small order (``[8]P`` = identity)."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != 32:
        raise ConfigError(f"{source}: an Ed25519 public key is 32 bytes")
    raw = bytes(raw)
    xy = _decode_point(raw)
    if xy is None:
        raise ConfigError(f"{source} {raw.hex()[:16]}...: not a canonical encoding of an Ed25519 curve point")
    pt = (xy[0], xy[1], 1, xy[0] * xy[1] % _P)
    for _ in range(3):
        pt = _double(pt)
    if pt[0] % _P == 0 and (pt[1] - pt[2]) % _P == 0:
        raise ConfigError(
            f"{source} {raw.hex()[:16]}...: a point of small order, with which signatures nobody wrote verify; "
            "refused (generate a key with `edge keygen`)"
        )
    return raw


def load_public_key(spec: str | os.PathLike | bytes) -> bytes:
    """Raw 32-byte public key from hex text, a ``.pub`` file of hex, or raw bytes.

    Checked with :func:`check_public_key`: small-order and non-canonical keys raise :class:`ConfigError`.
    """
    if isinstance(spec, (bytes, bytearray)) and len(spec) == 32:
        return check_public_key(bytes(spec))
    if isinstance(spec, (bytes, bytearray)):
        try:
            spec = bytes(spec).decode("ascii")
        except UnicodeDecodeError:
            raise ConfigError("a public key given as bytes must be 32 raw bytes or hex text") from None
    text = os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec)
    shown = text[:80]
    if "\0" not in text and len(text) < 4096 and Path(text).is_file():  # a path first: a path can be 64 chars too
        try:
            data = read_bounded(text, MAX_KEY_FILE_BYTES, what="public key file")
        except FormatError as e:  # a key is configuration: refused as such
            raise ConfigError(str(e)) from e
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise ConfigError(f"public key file {shown!r} is not hex text (64 hex digits from `edge keygen`)") from None
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"public key {shown!r} is not 64 hex digits (an Ed25519 key) or a file of them")
    return check_public_key(raw, source=f"public key {shown!r}")


def sign_file(adapter_path: str | os.PathLike, private_key_path: str | os.PathLike) -> Path:
    """Sign an adapter file's bytes; writes ``ADAPTER.sig`` atomically and returns its path."""
    serialization, ed25519 = _crypto()
    pem = read_bounded(private_key_path, MAX_PRIVATE_KEY_BYTES, what="private key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cannot read an Ed25519 private key from {private_key_path}: {e}") from e
    except Exception as e:  # cryptography's UnsupportedAlgorithm for exotic PEM
        raise ConfigError(f"cannot read an Ed25519 private key from {private_key_path}: {e}") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{private_key_path} is not an Ed25519 private key")
    data = read_bounded(adapter_path, MAX_SIGNED_BYTES, what="file to sign")
    import base64  # here and in _verify_one: a runtime's load (SignaturePolicy.resolve) never needs it

    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig = {
        "format": SIG_FORMAT,
        "version": SIG_VERSION,
        "alg": "ed25519",
        "key": key_id(pub),
        "signature": base64.b64encode(key.sign(data)).decode(),
    }
    return atomic_write_bytes(signature_path(adapter_path), (json.dumps(sig) + "\n").encode())


def verify_bytes(data: bytes, signature: bytes | None, trusted: list[bytes], *, source: str = "adapter") -> str:
    """Check ``signature`` (the ``.sig`` file's bytes) over ``data`` against the trusted raw keys.

    Returns the signing key's id; raises :class:`SignatureError` otherwise. A ``previous`` signature
    (:func:`with_previous`) is tried when the main one does not verify ``data``.
    """
    if signature is None:
        raise SignatureError(f"{source} is unsigned, and this runtime requires signatures from trusted keys")
    sig = _parse(signature, source)
    try:
        return _verify_one(data, sig, trusted, source)
    except SignatureError as first:
        if "previous" not in sig:
            raise
        try:
            return _verify_one(data, sig["previous"], trusted, source)
        except SignatureError:
            raise first from None


def with_previous(new: bytes, old: bytes | None) -> bytes:
    """The signature file ``new`` carrying ``old``'s signature as ``previous`` (``new`` as is if ``old`` is not a
    signature file): what ``edge sync`` writes before it replaces the adapter ``old`` signed."""
    try:
        doc = _parse(new, "new signature")
        prev = _parse(old, "old signature") if old is not None else None
    except SignatureError:  # a torn or foreign file: nothing to carry over (a reader judges the new one as it is)
        return new
    if prev is None:
        return new
    doc = {k: v for k, v in doc.items() if k != "previous"}
    return (json.dumps(doc | {"previous": {"key": prev["key"], "signature": prev["signature"]}}) + "\n").encode()


def _parse(signature: bytes, source: str) -> dict:
    """The signature file's JSON, checked for its fields (not yet verified)."""
    if len(signature) > MAX_SIG_BYTES:
        raise SignatureError(f"{source}: signature file is {len(signature)} bytes, larger than any valid one")
    try:
        sig = load_json(signature, source="signature file", max_depth=2)
        if not isinstance(sig, dict):
            raise ValueError(f"expected a JSON object, got {type(sig).__name__}")
        unknown = sorted(set(sig) - {"format", "version", "alg", "key", "signature", "previous"})
        if unknown:
            raise ValueError(f"unknown keys {unknown[:5]}")
        version = sig.get("version")
        if sig.get("format") != SIG_FORMAT or type(version) is not int or version != SIG_VERSION:
            raise ValueError(f"format {sig.get('format')!r} v{version!r}")
        if (
            sig.get("alg") != "ed25519"
            or not isinstance(sig.get("key"), str)
            or not isinstance(sig.get("signature"), str)
        ):
            raise ValueError(f"alg {sig.get('alg')!r}, key and signature must be strings")
        prev = sig.get("previous", {"key": "", "signature": ""})
        if not (
            isinstance(prev, dict)
            and set(prev) == {"key", "signature"}
            and all(isinstance(v, str) for v in prev.values())
        ):
            raise ValueError("previous must be an object of two strings, key and signature")
    except (ValueError, KeyError, TypeError) as e:  # FormatError is a ValueError
        raise SignatureError(f"{source}: malformed signature file ({e})") from e
    return sig


def _verify_one(data: bytes, sig: dict, trusted: list[bytes], source: str) -> str:
    import base64

    _, ed25519 = _crypto()
    try:
        raw_sig = base64.b64decode(sig["signature"], validate=True)
    except ValueError as e:
        raise SignatureError(f"{source}: malformed signature file ({e})") from e
    kid = sig["key"]
    if len(raw_sig) != 64:
        raise SignatureError(f"{source}: an Ed25519 signature is 64 bytes, got {len(raw_sig)}")
    keys = {key_id(k): k for k in trusted}
    if kid not in keys:
        raise SignatureError(f"{source} is signed by key {kid[:40]!r}, which is not trusted (trusted: {sorted(keys)})")
    try:
        check_public_key(keys[kid])
    except ConfigError as e:
        raise SignatureError(f"{source}: trusted key {kid} is unusable: {e}") from e
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(keys[kid]).verify(raw_sig, data)
    except Exception as e:  # cryptography raises InvalidSignature
        raise SignatureError(f"{source}: signature does not match the file's bytes (tampered or re-saved)") from e
    return kid


@dataclass(frozen=True)
class SignaturePolicy:
    """Which adapter files an entry point accepts: any (``keys is None``) or only those signed by one of ``keys``.

    Build it with :meth:`resolve` everywhere (runtime, profiler, importer), so every entry point
    applies the same rule: explicit keys win, else the device profile's ``trusted_keys``, else none.
    """

    keys: tuple[bytes, ...] | None = None

    def __post_init__(self) -> None:
        if self.keys is not None:
            object.__setattr__(self, "keys", tuple(check_public_key(k) for k in self.keys))

    @classmethod
    def resolve(cls, trusted_keys: Iterable[str | bytes] | None = None, device=None) -> SignaturePolicy:
        """The policy for explicit ``trusted_keys`` (an empty list refuses everything), else ``device``'s keys."""
        if trusted_keys is None and device is not None and getattr(device, "trusted_keys", None):
            trusted_keys = device.trusted_keys
        if trusted_keys is None:
            return cls(None)
        if isinstance(trusted_keys, (str, bytes, os.PathLike)):
            trusted_keys = [trusted_keys]
        return cls(tuple(load_public_key(k) for k in trusted_keys))

    @property
    def required(self) -> bool:
        return self.keys is not None

    def read(self, path: str | os.PathLike, limit: int, *, what: str = "adapter file") -> bytes:
        """The bytes of ``path`` (bounded read), verified against the policy before anyone parses them. A
        :class:`ReadFile` this very policy read (:meth:`read_file`; identity, not an equal policy) gives its bytes,
        not read again, but verified again (its kept signature, one Ed25519 check in memory): a ReadFile anyone
        built or altered never passes bytes the keys did not sign. Any other ReadFile is read anew from its path."""
        if isinstance(path, ReadFile) and path.policy is self:
            data, sig = path.data, path.signature  # taken once: what is checked is what is returned
            if type(data) is bytes and (sig is None or type(sig) is bytes) and len(data) <= limit:
                if self.keys is not None:
                    verify_bytes(data, sig, list(self.keys), source=path.path)
                return data
        return self._read(path, limit, what)[0]

    def _read(self, path: str | os.PathLike, limit: int, what: str) -> tuple[bytes, bytes | None]:
        """``path``'s bytes (bounded) and, when the policy requires signatures, its signature file's, verified."""
        data, sig = read_bounded(path, limit, what=what), None
        if self.keys is not None:
            sig_path = signature_path(path)
            try:
                sig = (
                    read_bounded(sig_path, MAX_SIG_BYTES, what="signature file") if os.path.lexists(sig_path) else None
                )
            except FormatError as e:  # a FIFO, a device, a folder or a huge file where the signature should be
                raise SignatureError(str(e)) from e
            verify_bytes(data, sig, list(self.keys), source=os.fspath(path))
        return data, sig

    def read_file(self, path: str | os.PathLike, limit: int, *, what: str = "adapter file") -> ReadFile:
        """``path`` read once and verified (:meth:`read`), as a path that gives those bytes to whatever reads it
        through this same policy object next (``rt.load_adapter(held)`` of the runtime whose ``rt.policy`` made it):
        its name and its load come from one read. It keeps the signature, which :meth:`read` checks again."""
        data, sig = self._read(path, limit, what)
        return ReadFile(os.fspath(path), data, self, sig)

    def check_in_memory(self, name: str) -> None:
        """Refuse an in-memory adapter (it cannot be verified) when signatures are required."""
        if self.keys is not None:
            raise SignatureError(
                f"this runtime requires signed adapter files; an in-memory Adapter ({name!r}) "
                "cannot be verified: save and sign it, then load the file"
            )


@dataclass(frozen=True, eq=False)
class ReadFile(os.PathLike):
    """An adapter file's path with the bytes ``policy`` read from it and verified (:meth:`SignaturePolicy.read_file`),
    and the signature they were verified with. Read through that same policy object (a runtime's ``load_adapter``),
    it gives those bytes, verified again against the signature kept (in memory, no second read of the file), instead
    of reading the path again: a file swapped after the first read is never paired with what was taken from it. Any
    other policy, an equal one too, reads the path anew. Anyone can build one: it is trusted for nothing, since
    the bytes it carries pass only with a signature by a key the policy trusts."""

    path: str
    data: bytes = field(repr=False)
    policy: SignaturePolicy = field(repr=False)
    signature: bytes | None = field(default=None, repr=False)  # the .sig file's bytes (None: the policy needs none)

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path
