"""``edge sync``: fetch, verify and install the adapters a device's channel names (device side)."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "sync",
        help="install the adapters of a registry channel for this device's model (TUF-verified, resumable)",
        description="Exit status: 0 updated or current, 1 offline or partial (retry later), 2 rejected or error.",
    )
    p.add_argument(
        "reference", nargs="?", help="registry and repository, e.g. 127.0.0.1:5000/edge/adapters (default: --device's)"
    )
    p.add_argument(
        "--device",
        help="device profile naming registry, channel, tuf_root and trusted_keys (explicit flags win over it)",
    )
    p.add_argument("--devices-dir", action="append", default=[], help="extra folder of NAME.yaml profiles")
    p.add_argument("--channel", help="release channel: stable, canary, site-NAME (default: the profile's, or stable)")
    p.add_argument("--tuf-root", type=Path, help="root.json the device trusts (from `edge release init`)")
    p.add_argument("--adapters", type=Path, required=True, help="the device's adapter folder (installed into)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", type=Path, help="the device's model (.onnx/.tflite): fingerprint and tensor checks")
    g.add_argument("--fingerprint", help="the device model's fingerprint (sha256:...) when the file is elsewhere")
    p.add_argument("--cache", type=Path, help="download cache and TUF state (default: ADAPTERS/.edge-sync)")
    p.add_argument(
        "--trusted-key",
        action="append",
        dest="trusted_keys",
        help="Ed25519 public key (file or hex), repeatable: install only adapters signed by one (as Runtime does)",
    )
    p.add_argument(
        "--create-parents",
        action="store_true",
        help="create missing parents of --adapters and --cache (refused by default: is the card or disk mounted?)",
    )
    p.add_argument("--prune", action="store_true", help="delete adapters this tool installed that the release dropped")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the registry (loopback and lab networks)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds for each connect and read (default 10)")
    p.add_argument(
        "--deadline",
        type=float,
        help="seconds the whole sync may take, waiting for another sync included (default 300, "
        "edge.fleet.DEFAULT_DEADLINE); a download it cuts resumes next time",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def split_reference(reference: str) -> tuple[str, str]:
    from edge.fleet import FleetConfig

    cfg = FleetConfig.from_reference(reference)
    return cfg.registry, cfg.repository


def _settings(args) -> tuple[str, str, Path, bool, list[str] | None]:
    """Reference, channel, TUF root, insecure and trusted keys: the flags, else the device profile's."""
    from edge.errors import ConfigError

    fleet, keys = None, None
    if args.device:
        from edge.devices import load_profile

        profile = load_profile(args.device, search=args.devices_dir)
        fleet, keys = profile.fleet, list(profile.trusted_keys) or None
        if fleet is None and not (args.reference and args.tuf_root):
            raise ConfigError(
                f"device profile {profile.name!r} names no registry; add registry and tuf_root to "
                f"{profile.source or 'the profile'}, or pass REFERENCE and --tuf-root"
            )
    reference = args.reference or (fleet.registry if fleet else None)
    tuf_root = args.tuf_root or (fleet.tuf_root if fleet else None)
    if not reference or not tuf_root:
        raise ConfigError("edge sync needs REFERENCE and --tuf-root, or --device NAME whose profile names them")
    channel = args.channel or (fleet.channel if fleet else "stable")
    insecure = args.insecure or bool(fleet and fleet.insecure)
    return reference, channel, Path(tuf_root), insecure, args.trusted_keys or keys


def run(args) -> int:
    from edge.fleet import FleetConfig, FleetSecurityError, sync

    reference, channel, tuf_root, insecure, trusted_keys = _settings(args)
    registry, repository = split_reference(reference)
    deadline = {} if args.deadline is None else {"deadline": args.deadline}
    cfg = FleetConfig(registry, repository, channel, tuf_root, insecure=insecure, timeout=args.timeout, **deadline)
    args.trusted_keys = trusted_keys
    rep = sync(
        cfg,
        args.adapters,
        fingerprint=args.fingerprint,
        model=args.model,
        cache_dir=args.cache,
        prune=args.prune,
        trusted_keys=args.trusted_keys,
        create_parents=args.create_parents,
    )
    if args.json:
        print(json.dumps(rep.to_dict(), indent=1, sort_keys=True))
    else:
        print(
            f"{rep.status}: {'no verified release' if rep.release is None else f'release {rep.release}'}, "
            f"{len(rep.installed)} installed, {len(rep.unchanged)} unchanged, "
            f"{len(rep.removed)} removed, {len(rep.refused)} refused, {len(rep.failed)} failed; "
            f"{rep.bytes_total} bytes in {rep.seconds:.2f} s"
        )
        if rep.status == "offline":  # why, and what was kept (exit 1: try again later)
            print(f"  {rep.reason}")
        for x in rep.refused + rep.failed:
            print(f"  {x['name']}: {x['reason']}")
        if rep.stale:
            print(f"  kept {len(rep.stale)} adapter(s) of another model {rep.stale[:5]}: pass --prune to remove them")
    if rep.status == "rejected":
        raise FleetSecurityError(f"sync refused the release: {rep.reason}; the installed adapters were kept")
    return 1 if rep.status in ("offline", "partial") else 0
