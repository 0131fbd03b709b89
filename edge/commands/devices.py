"""``edge devices``: the device profiles, and which of their backends and providers this machine has."""

from __future__ import annotations

import json
import logging
from pathlib import Path

__all__ = ["register", "run", "rows"]


def register(sub) -> None:
    d = sub.add_parser("devices", help="list device profiles and which backends/providers are available here")
    devices_dir_flag(d)
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.set_defaults(func=run)


def devices_dir_flag(parser) -> None:
    """``--devices-dir DIR`` (repeatable): extra profile folders, searched before $EDGE_DEVICES and the shipped ones."""
    parser.add_argument(
        "--devices-dir",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="folder of extra NAME.yaml profiles, searched first (repeatable; also $EDGE_DEVICES)",
    )


def rows(search=()) -> tuple[dict, list[dict]]:
    """This machine's backends, and one row per profile saying whether and how it runs here."""
    from edge.devices import available_providers, backend_status, list_profiles, this_machine
    from runtimes import backend_names

    here = {"architecture": this_machine(), "backends": {}}
    for backend in backend_names():
        status = backend_status(backend)
        here["backends"][backend] = {
            "status": status,
            "providers": available_providers(backend) if status == "installed" else [],
        }
    out = []
    logging.getLogger("edge.devices").disabled = True  # fallback warnings become the "here" column instead
    try:
        for p in list_profiles(search):
            row = {
                "name": p.name,
                "architecture": p.architecture,
                "description": p.description,
                "fallback": p.fallback,
                "source": str(p.source),
                "backends": [],
            }
            for pref in p.backends:
                h = here["backends"][pref.backend]
                avail = set(h["providers"])
                row["backends"].append(
                    {
                        "backend": pref.backend,
                        "providers": {s.name: s.name in avail for s in pref.providers},
                        "here": _here(p, pref, h),
                    }
                )
            if p.architecture != here["architecture"]:
                row["note"] = f"profile is for {p.architecture}, this machine is {here['architecture']}"
            out.append(row)
    finally:
        logging.getLogger("edge.devices").disabled = False
    return here, out


def run(args) -> int:
    here, table = rows(args.devices_dir)
    if args.json:
        print(json.dumps({"machine": here, "profiles": table}, indent=1))
        return 0
    print(f"this machine: {here['architecture']}")
    for backend, h in here["backends"].items():
        print(f"  {backend}: " + (", ".join(h["providers"]) if h["status"] == "installed" else h["status"]))
    lines = [("profile", "arch", "backend", "providers (+ here, - missing)", "fallback", "runs here?")]
    for r in table:
        for i, b in enumerate(r["backends"]):
            provs = " ".join(("+" if ok else "-") + _short(n) for n, ok in b["providers"].items())
            here_col = b["here"]
            first = i == 0
            lines.append(
                (
                    r["name"] if first else "",
                    r["architecture"] if first else "",
                    b["backend"],
                    provs,
                    r["fallback"],
                    here_col,
                )
            )
    widths = [max(len(line[c]) for line in lines) for c in range(5)]
    print()
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line[:5], widths)) + "  " + line[5])
    from edge.devices import search_path

    print("\nprofiles from (first match wins): " + ", ".join(str(d) for d in search_path(args.devices_dir)))
    print("add one: drop NAME.yaml into a folder given by --devices-dir or $EDGE_DEVICES")
    return 0


def _here(profile, pref, machine_backend: dict) -> str:
    """One phrase: does this profile's backend entry run here, on what, and why not."""
    from edge.devices import resolve_providers
    from edge.errors import EdgeError

    if machine_backend["status"] != "installed":
        return f"no: {machine_backend['status']}"
    missing = [_short(s.name) for s in pref.providers if s.name not in machine_backend["providers"]]
    try:
        chosen, warning = resolve_providers(profile, pref.backend, machine_backend["providers"])
    except EdgeError:
        return f"no: missing {', '.join(missing)} (fallback: {profile.fallback})"
    on = ", ".join(_short(s.name) for s in chosen)
    return f"yes, falls back to {on} (missing {', '.join(missing)})" if warning else f"yes, on {on}"


def _short(provider: str) -> str:
    return provider.removesuffix("ExecutionProvider")
