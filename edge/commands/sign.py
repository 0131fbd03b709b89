"""``edge keygen`` and ``edge sign``: Ed25519 keys and detached signatures for adapter files."""

from __future__ import annotations

import os
from pathlib import Path


def register(sub) -> None:
    k = sub.add_parser("keygen", help="create an Ed25519 signing key (PEM) and its public key (.pub)")
    k.add_argument("out", type=Path, help="private key path, e.g. keys/adapters.pem (refused if it or its .pub exists)")
    k.set_defaults(func=keygen)
    s = sub.add_parser("sign", help="sign adapter files (writes FILE.sig next to each)")
    s.add_argument("files", nargs="+", type=Path)
    s.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM) from `edge keygen`")
    s.set_defaults(func=sign)


def keygen(args) -> int:
    from edge.errors import ConfigError
    from edge.format.signing import generate_key

    pair = (args.out, args.out.with_suffix(".pub")) if args.out.name else (args.out,)  # no name: refused below
    taken = [p for p in pair if os.path.lexists(p) and not p.is_dir()]  # a folder: refused as one by the write
    if taken:  # a lost private key cannot be made again: every device trusting its .pub would refuse new signatures
        raise ConfigError(f"{taken[0]} exists; keygen never overwrites a key: remove it first, or give another path")
    pub = generate_key(args.out)
    print(f"private key {args.out} (keep it on the host), public key {pub}: {pub.read_text().strip()}")
    return 0


def sign(args) -> int:
    from edge.format.signing import sign_file

    for f in args.files:
        print(f"signed {f} -> {sign_file(f, args.key)}")
    return 0
