"""``edge push`` and ``edge release``: publish adapters to an OCI registry, signed with TUF (host side)."""

from __future__ import annotations

import json
from pathlib import Path


def _common(p) -> None:
    p.add_argument("reference", help="registry and repository, e.g. 127.0.0.1:5000/edge/adapters")
    p.add_argument("--tuf-dir", type=Path, required=True, help="the host's TUF metadata folder")
    p.add_argument(
        "--keys", type=Path, required=True, help="folder of Ed25519 role keys (root/targets/snapshot/timestamp.pem)"
    )
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the registry (loopback and lab networks)")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds for each connect and read; no retries (default 30)"
    )
    p.add_argument(
        "--deadline",
        type=float,
        help="seconds the whole command may take, however slowly the registry answers (default 1800, "
        "edge.fleet.publish.DEADLINE); devices keep the previous release, run it again",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def register(sub) -> None:
    p = sub.add_parser("push", help="publish a model and its adapters to an OCI registry as a signed (TUF) release")
    _common(p)
    p.add_argument("adapters", nargs="+", type=Path, help="adapter files (.safetensors)")
    p.add_argument("--model", type=Path, required=True, help="the base model (.onnx/.tflite), stored once")
    p.add_argument("--channel", default="stable", help="stable, canary, site-NAME... (default stable)")
    p.add_argument("--replace", action="store_true", help="withdraw this channel's adapters for the model not listed")
    p.set_defaults(func=push)

    r = sub.add_parser("release", help="create (init) or re-sign (refresh) the fleet's TUF repository")
    rs = r.add_subparsers(dest="release_command", required=True)
    i = rs.add_parser("init", help="create missing role keys and TUF metadata version 1, and publish it")
    _common(i)
    i.add_argument("--bits", type=int, default=5, help="2**BITS hash bins for the targets (default 5: 32 bins)")
    i.set_defaults(func=init)
    f = rs.add_parser("refresh", help="re-sign snapshot and timestamp with new expiry dates (run before 7 days pass)")
    _common(f)
    f.set_defaults(func=refresh)
    k = rs.add_parser(
        "rotate",
        help="new keys for roles and a root signed by the old and the new root key (devices follow the chain)",
    )
    _common(k)
    k.add_argument(
        "--role",
        action="append",
        dest="roles",
        choices=["root", "targets", "snapshot", "timestamp"],
        help="role whose key to replace, repeatable (default: root)",
    )
    k.set_defaults(func=rotate)


def _net(args) -> dict:
    """insecure, timeout and (when given) deadline: how each command talks to the registry."""
    given = {} if args.deadline is None else {"deadline": args.deadline}
    return {"insecure": args.insecure, "timeout": args.timeout} | given


def _out(args, result: dict, line: str) -> int:
    print(json.dumps(result, indent=1, sort_keys=True) if args.json else line)
    return 0


def push(args) -> int:
    from edge.commands.sync import split_reference
    from edge.fleet import push as do_push

    registry, repository = split_reference(args.reference)
    res = do_push(
        registry,
        repository,
        args.channel,
        args.model,
        args.adapters,
        args.tuf_dir,
        args.keys,
        replace=args.replace,
        **_net(args),
    )
    changed = [a["name"] for a in res["adapters"] if a["changed"]]
    return _out(
        args,
        res,
        f"release {res['release']['number']} of {args.reference}:{res['release']['tag']}: "
        f"{len(res['adapters'])} adapters, changed {changed or 'none'}, withdrawn {res['withdrawn'] or 'none'}, "
        f"{res['bytes_uploaded']} bytes uploaded",
    )


def init(args) -> int:
    from edge.commands.sync import split_reference
    from edge.fleet import init_release

    registry, repository = split_reference(args.reference)
    res = init_release(registry, repository, args.tuf_dir, args.keys, bits=args.bits, **_net(args))
    return _out(
        args, res, f"TUF repository published to {res['repository']}; give devices {res['tuf_root']} as tuf_root"
    )


def refresh(args) -> int:
    from edge.commands.sync import split_reference
    from edge.fleet import refresh_release

    registry, repository = split_reference(args.reference)
    res = refresh_release(registry, repository, args.tuf_dir, args.keys, **_net(args))
    return _out(args, res, f"release {res['release']} re-signed, timestamp expires {res['expires']}")


def rotate(args) -> int:
    from edge.commands.sync import split_reference
    from edge.fleet import rotate_keys

    registry, repository = split_reference(args.reference)
    res = rotate_keys(
        registry,
        repository,
        args.tuf_dir,
        args.keys,
        args.roles or ["root"],
        **_net(args),
    )
    return _out(
        args,
        res,
        f"root version {res['root_version']} published: new {', '.join(res['rotated'])} keys in {args.keys}, "
        f"old ones in {args.keys / 'retired'}; devices keep their tuf_root and follow the chain",
    )
