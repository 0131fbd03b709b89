"""Ed25519 signatures for adapter files (``cryptography`` does the cryptography).

A signature is a detached file next to the adapter, ``NAME.safetensors.sig``, JSON:
``{"format": "edge.signature", "version": 1, "alg": "ed25519", "key": KEY_ID,
"signature": BASE64}`` over the adapter file's exact bytes. ``KEY_ID`` is the first 16
hex digits of SHA-256 of the raw 32-byte public key.

The host signs (:func:`sign_file`); the device verifies the bytes it is about to parse
(:func:`verify_bytes`), so nothing unverified is ever parsed or applied.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from edge.errors import ConfigError, SignatureError
from edge.format.io import atomic_write_bytes

__all__ = ["generate_key", "load_public_key", "key_id", "sign_file", "verify_bytes", "signature_path"]

SIG_FORMAT = "edge.signature"
SIG_VERSION = 1
MAX_SIG_BYTES = 4096


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
    """Write a new Ed25519 private key (PEM, mode 0600) and its public key (``.pub``, raw hex)."""
    serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    private_path = Path(private_path)
    atomic_write_bytes(private_path, pem)
    os.chmod(private_path, 0o600)
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pub_path = private_path.with_suffix(".pub")
    atomic_write_bytes(pub_path, (pub.hex() + "\n").encode())
    return pub_path


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def load_public_key(spec: str | os.PathLike | bytes) -> bytes:
    """Raw 32-byte public key from hex text, a ``.pub`` file of hex, or raw bytes."""
    if isinstance(spec, bytes) and len(spec) == 32:
        return spec
    text = str(spec)
    if Path(text).is_file():  # a path first: a path can be 64 characters long too
        text = Path(text).read_text().strip()
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"public key {str(spec)[:80]!r} is not 64 hex digits (an Ed25519 key) or a file of them")
    return raw


def sign_file(adapter_path: str | os.PathLike, private_key_path: str | os.PathLike) -> Path:
    """Sign an adapter file's bytes; writes ``ADAPTER.sig`` atomically and returns its path."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(private_key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot read an Ed25519 private key from {private_key_path}: {e}") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{private_key_path} is not an Ed25519 private key")
    data = Path(adapter_path).read_bytes()
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

    Returns the signing key's id; raises :class:`SignatureError` otherwise.
    """
    _, ed25519 = _crypto()
    if signature is None:
        raise SignatureError(f"{source} is unsigned, and this runtime requires signatures from trusted keys")
    if len(signature) > MAX_SIG_BYTES:
        raise SignatureError(f"{source}: signature file is {len(signature)} bytes, larger than any valid one")
    try:
        sig = json.loads(signature)
        if sig.get("format") != SIG_FORMAT or sig.get("version") != SIG_VERSION or sig.get("alg") != "ed25519":
            raise ValueError(f"format {sig.get('format')!r} v{sig.get('version')!r} alg {sig.get('alg')!r}")
        raw_sig = base64.b64decode(sig["signature"], validate=True)
        kid = str(sig["key"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SignatureError(f"{source}: malformed signature file ({e})") from e
    keys = {key_id(k): k for k in trusted}
    if kid not in keys:
        raise SignatureError(f"{source} is signed by key {kid}, which is not trusted (trusted: {sorted(keys)})")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(keys[kid]).verify(raw_sig, data)
    except Exception as e:  # cryptography raises InvalidSignature
        raise SignatureError(f"{source}: signature does not match the file's bytes (tampered or re-saved)") from e
    return kid
