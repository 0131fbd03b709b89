"""Fleet benchmark: a real registry on 127.0.0.1, one release changing 1 of 100 adapters, then a fleet.

Measures, per adapter size and per way the TUF head carries a release (:data:`MODES`, paired within
rounds), the sync time of one device after a release that changes one adapter out of 100 and the
bytes it moved (TUF metadata + manifests + blobs, HTTP bodies; response headers apart, then added)
against that adapter's bytes, and what a poll with nothing new costs; then ``devices``
simulated devices (threads, each with its own folder and cache) syncing concurrently while the
registry is SIGKILLed with downloads in flight and restarted, counting the downloads resumed.
Needs the registry binary (``scripts/install-registry.sh``), oras and tuf.
All traffic stays on 127.0.0.1. ``run()`` returns JSON-able figures, ``markdown()`` a table.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edge.machine import load_average

__all__ = ["run", "markdown", "add_arguments", "cli"]


def _helpers():
    """The registry runner and tiny model/adapter makers shared with the tests (tests/device/_registry.py)."""
    tests = Path(__file__).resolve().parents[1] / "tests"
    dirs = [str(tests / "device"), str(tests)]  # _registry builds its model with tests/_tiny.py
    sys.path[:0] = dirs
    try:
        import _registry
    finally:
        for d in dirs:
            sys.path.remove(d)
    if _registry.registry_binary() is None:
        raise RuntimeError("no registry binary: run scripts/install-registry.sh (apt-get install docker-registry)")
    return _registry


def _loadable(folder: Path, fingerprint: str) -> bool:
    from edge.format.adapter import load_adapter

    files = sorted(folder.glob("*.safetensors"))
    return bool(files) and all(load_adapter(p).base_fingerprint == fingerprint for p in files)


# How the TUF head carries a release (the ``inline`` argument of push): the bundle as a blob only (a
# third request), the bundle inline in the head manifest, or a delta against the last release inline
# (the default; a device further behind reads the blob).
MODES = {"blob": (), "bundle": ("bundle",), "delta": ("delta", "bundle")}


def _one_of_100(tmp: Path, h, adapter_bytes: int, n_adapters: int, repeats: int, modes=tuple(MODES)) -> list[dict]:
    """Each mode publishes to its own repository on one registry; every round pushes the same changed adapter
    to each (in a rotated order) and syncs that mode's device, so the modes are compared paired, round by round.
    """
    from edge.fleet import FleetConfig, init_release, push, sync

    LocalRegistry, make_model, make_adapter = h.LocalRegistry, h.make_model, h.make_adapter
    root = tmp / f"size-{adapter_bytes}"
    model = root / "model.onnx"
    root.mkdir()
    info = make_model(model, d_in=512, d_hid=512)
    files = [
        make_adapter(info, root / f"a{i:03d}.safetensors", f"a{i:03d}", adapter_bytes, i) for i in range(n_adapters)
    ]
    lanes: dict[str, dict] = {}
    with LocalRegistry(root / "registry") as reg:
        for mode in modes:
            repo, tuf, keys = f"edge/{mode}", root / f"tuf-{mode}", root / f"keys-{mode}"
            init_release(reg.host, repo, tuf, keys, insecure=True, inline=MODES[mode])
            push(reg.host, repo, "stable", model, files, tuf, keys, insecure=True, inline=MODES[mode])
            cfg = FleetConfig(reg.host, repo, "stable", tuf / "root.json", insecure=True)
            first = sync(cfg, root / f"device-{mode}", model=model)
            lanes[mode] = {"cfg": cfg, "tuf": tuf, "keys": keys, "first": first, "reps": []}
        load = [_load1m()]
        for r in range(repeats):
            changed = make_adapter(info, files[r % n_adapters], f"a{r % n_adapters:03d}", adapter_bytes, 1000 + r)
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:  # no mode always goes first
                lane = lanes[mode]
                res = push(
                    reg.host,
                    lane["cfg"].repository,
                    "stable",
                    model,
                    [changed],
                    lane["tuf"],
                    lane["keys"],
                    insecure=True,
                    inline=MODES[mode],
                )
                rep = sync(lane["cfg"], root / f"device-{mode}", model=model)
                if rep.status != "updated" or len(rep.installed) != 1:
                    raise RuntimeError(f"{mode}: release {r + 1} did not install exactly one adapter: {rep.to_dict()}")
                lane["reps"].append(rep)
                lane.setdefault("heads", []).append(res["tuf_head"])
        load.append(_load1m())
        for mode in modes:  # nothing new: what a device pays to ask
            lanes[mode]["poll"] = sync(lanes[mode]["cfg"], root / f"device-{mode}", model=model)
    out = []
    for mode in modes:
        reps, lane = lanes[mode]["reps"], lanes[mode]
        size = reps[0].installed[0]["bytes"]
        wire = [(x.bytes_total + x.bytes_headers) / size for x in reps]
        base = [x.bytes_total + x.bytes_headers for x in lanes[modes[0]]["reps"]]  # the same round, first mode
        out.append(
            {
                "mode": mode,
                "inline": list(MODES[mode]),
                "heads": sorted({x.head for x in reps}),
                "adapters": n_adapters,
                "adapter_bytes": size,
                "first_sync_s": lane["first"].seconds,
                "first_sync_bytes": lane["first"].bytes_total,
                "sync_s_p50": round(statistics.median(x.seconds for x in reps), 4),
                "bytes_moved_p50": int(statistics.median(x.bytes_total for x in reps)),
                "metadata_bytes_p50": int(statistics.median(x.bytes_metadata for x in reps)),
                "ratio_p50": round(statistics.median(x.bytes_total / size for x in reps), 4),
                "ratio_max": round(max(x.bytes_total / size for x in reps), 4),
                "requests_p50": int(statistics.median(x.requests for x in reps)),
                "header_bytes_p50": int(statistics.median(x.bytes_headers for x in reps)),
                "ratio_with_headers_p50": round(statistics.median(wire), 4),
                "ratio_with_headers_max": round(max(wire), 4),
                "paired_with": modes[0],  # wire bytes over the first mode's in the same round (same adapter, load)
                "wire_vs_paired_p50": round(statistics.median(w * size / b for w, b in zip(wire, base)), 4),
                "wire_vs_paired_max": round(max(w * size / b for w, b in zip(wire, base)), 4),
                "bundle_bytes_p50": int(statistics.median(x["bundle_bytes"] for x in lane["heads"])),
                "delta_bytes_p50": int(statistics.median(x["delta_bytes"] or 0 for x in lane["heads"])),
                "head_manifest_bytes_p50": int(statistics.median(x["manifest_bytes"] for x in lane["heads"])),
                "poll_status": lane["poll"].status,
                "poll_body_bytes": lane["poll"].bytes_total,
                "poll_header_bytes": lane["poll"].bytes_headers,
                "poll_requests": lane["poll"].requests,
                "repeats": repeats,
                "loadavg_1m": load,
            }
        )
    return out


def _fleet(tmp: Path, h, devices: int, n_adapters: int, adapter_bytes: int, changed_bytes: int, kill_at: int) -> dict:
    """``devices`` concurrent syncs of release 2 (one adapter changed); the registry is killed mid-way.

    The crash comes once ``kill_at`` devices are downloading the changed adapter: each of them holds
    its first chunk until then (a slow link), so the crash cuts real transfers, which the next
    sync must resume from the partial file.
    """
    from edge.fleet import FleetConfig, init_release, push, sync

    LocalRegistry, make_model, make_adapter = h.LocalRegistry, h.make_model, h.make_adapter
    root = tmp / "fleet"
    root.mkdir()
    model = root / "model.onnx"
    info = make_model(model, d_in=1024, d_hid=1024)  # room for adapters of up to 12 MB
    files = [
        make_adapter(info, root / f"a{i:03d}.safetensors", f"a{i:03d}", adapter_bytes, i) for i in range(n_adapters)
    ]
    reg = LocalRegistry(root / "registry").start()
    try:
        init_release(reg.host, "edge/adapters", root / "tuf", root / "keys", insecure=True)
        push(reg.host, "edge/adapters", "stable", model, files, root / "tuf", root / "keys", insecure=True)
        cfg = FleetConfig(reg.host, "edge/adapters", "stable", root / "tuf" / "root.json", insecure=True, timeout=5)
        dev = [root / f"dev{i:03d}" for i in range(devices)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(devices) as ex:
            first = list(ex.map(lambda d: sync(cfg, d, model=model), dev))
        t_first = time.perf_counter() - t0
        changed = make_adapter(info, files[0], "a000", changed_bytes, 999)  # over the ~4 MB loopback keeps in flight
        push(reg.host, "edge/adapters", "stable", model, [changed], root / "tuf", root / "keys", insecure=True)
        killed, lock, started = threading.Event(), threading.Lock(), set()

        def hook_for(device: Path):
            def hook(_n):
                with lock:
                    if killed.is_set() or device in started:
                        return
                    started.add(device)
                    crash = len(started) == kill_at
                if crash:
                    reg.stop(kill=True)
                    killed.set()
                else:
                    killed.wait(timeout=60)  # hold the first chunk until the crash (bounded: never hangs)

            return hook

        load = [_load1m()]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(devices) as ex:
            second = list(ex.map(lambda d: sync(cfg, d, model=model, on_chunk=hook_for(d)), dev))
        loadable = sum(_loadable(d, info.fingerprint) for d in dev)  # no device is left without a usable set
        partial = sum(any(p.stat().st_size for p in (d / ".edge-sync/partial").glob("*.part")) for d in dev)
        reg.start()
        with ThreadPoolExecutor(devices) as ex:
            third = list(ex.map(lambda d: sync(cfg, d, model=model), dev))
        t_release = time.perf_counter() - t0
        load.append(_load1m())
        want = {p.name: p.read_bytes() for p in files}
        converged = sum(all((d / n).read_bytes() == b for n, b in want.items()) for d in dev)
    finally:
        reg.stop()
    return {
        "devices": devices,
        "adapters": n_adapters,
        "adapter_bytes": len(want["a001.safetensors"]),
        "changed_bytes": len(want["a000.safetensors"]),
        "first_sync_wall_s": round(t_first, 3),
        "release_wall_s": round(t_release, 3),
        "converged": converged,
        "registry_killed": killed.is_set(),
        "failures_injected": ["registry SIGKILL mid-release, then restart on the same storage"],
        "loadable_after_kill": loadable,
        "statuses_after_kill": dict(
            sorted({s: [r.status for r in second].count(s) for s in {r.status for r in second}}.items())
        ),
        "statuses_after_restart": dict(
            sorted({s: [r.status for r in third].count(s) for s in {r.status for r in third}}.items())
        ),
        "kill_at_devices_downloading": kill_at,
        "partial_files_after_kill": partial,
        "resumed_downloads": sum(r.resumed for r in third),
        "resumed_bytes_not_moved_again": sum(r.bytes_resumed_from for r in third),
        "release_adapter_bytes_after_restart": sum(r.bytes_adapters for r in third),
        "first_sync_ok": sum(r.status == "updated" for r in first),
        "loadavg_1m": load,
    }


def run(
    sizes=(24_000, 256_000),
    n_adapters: int = 100,
    repeats: int = 5,
    devices: int = 50,
    changed_bytes: int = 8_000_000,
    kill_at: int | None = None,
) -> dict:
    h = _helpers()
    with tempfile.TemporaryDirectory(prefix="edge-bench-fleet-") as tmp:
        tmp = Path(tmp)
        one = [row for s in sizes for row in _one_of_100(tmp, h, s, n_adapters, repeats)]
        fleet = _fleet(tmp, h, devices, n_adapters, sizes[0], changed_bytes, kill_at or max(1, devices // 2))
    return {"one_of_100": one, "fleet": fleet, "cpus": os.cpu_count(), "loadavg_1m_end": _load1m()}


def markdown(result: dict) -> str:
    rows = result["one_of_100"]
    lines = [
        "Release changing 1 of N adapters, one device, for each way the TUF head can carry the release: `blob` "
        "(the head manifest names the gzip'd bundle, read as a third request), `bundle` (the bundle inline in "
        "the manifest, OCI descriptor `data`), `delta` (the default: the release deflated against the metadata "
        "the device holds from the last release, inline; a device further behind reads the blob). Each has its "
        "own repository on one registry; every round pushes the same changed adapter to each, in a rotated "
        "order, and syncs its device, so the ratio to `blob` is paired within rounds. Bytes are HTTP bodies; "
        "response status lines and headers are counted apart, then added (incl. headers):",
        "",
        "| adapters | adapter bytes | head | requests | sync p50 (s) | bytes moved p50 | of which metadata | "
        "moved / adapter p50 | max | incl. headers p50 | incl. headers max | wire bytes vs blob, same round p50 | "
        "poll with nothing new | 1-min load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['adapters']} | {r['adapter_bytes']:,} | {r['mode']} (read: {'/'.join(r['heads'])}) | "
            f"{r['requests_p50']} | {r['sync_s_p50']:.3f} | "
            f"{r['bytes_moved_p50']:,} | {r['metadata_bytes_p50']:,} | {r['ratio_p50']:.3f} | {r['ratio_max']:.3f} | "
            f"{r['ratio_with_headers_p50']:.3f} | {r['ratio_with_headers_max']:.3f} | {r['wire_vs_paired_p50']:.3f} | "
            f"{r['poll_status']}: {r['poll_requests']} request, {r['poll_body_bytes']} body bytes, "
            f"{r['poll_header_bytes']} header bytes | {r['loadavg_1m'][0]} -> {r['loadavg_1m'][1]} |"
        )
    default = [r for r in rows if r["mode"] == "delta"]
    if default:
        worst = max(default, key=lambda r: r["ratio_with_headers_max"])
        met = "met" if worst["ratio_with_headers_max"] <= 1.1 else "NOT met"
        lines += [
            "",
            f"Goal, a release moves at most 1.1x the changed adapter's bytes: with the default head the worst "
            f"release moved {worst['ratio_with_headers_max']:.3f}x, headers included ({worst['adapter_bytes']:,}-byte "
            f"adapter, {worst['repeats']} releases): {met}. Per release the delta is {worst['delta_bytes_p50']:,} "
            f"bytes (p50) where the gzip'd bundle is {worst['bundle_bytes_p50']:,}; the head manifest carrying it "
            f"is {worst['head_manifest_bytes_p50']:,} bytes.",
        ]
    f = result["fleet"]
    lines += [
        "",
        f"Fleet: {f['devices']} devices on loopback, {f['adapters']} adapters of {f['adapter_bytes']:,} bytes each; "
        f"the release changes one to {f['changed_bytes']:,} bytes and the registry is SIGKILLed once "
        f"{f['kill_at_devices_downloading']} devices are downloading it (each holds its first 64 KiB chunk until "
        f"then, as on a slow link), then restarted on the same storage ({result['cpus']} CPUs, 1-min load average "
        f"{f['loadavg_1m'][0]} -> {f['loadavg_1m'][1]}):",
        "",
        "| devices | first sync wall (s) | release wall incl. kill + restart (s) | converged | after kill | "
        "loadable after kill | partial files after kill | after restart | resumed downloads | "
        "bytes not moved again |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {f['devices']} | {f['first_sync_wall_s']:.2f} | {f['release_wall_s']:.2f} | "
        f"{f['converged']}/{f['devices']} | "
        f"{_counts(f['statuses_after_kill'])} | {f['loadable_after_kill']}/{f['devices']} | "
        f"{f['partial_files_after_kill']} | {_counts(f['statuses_after_restart'])} | {f['resumed_downloads']} | "
        f"{f['resumed_bytes_not_moved_again']:,} |",
        "",
        "Resumed: the next sync asked for the rest with an HTTP Range from the partial file's size and installed "
        "the adapter only after the whole file matched the sha256 signed in the TUF targets.",
    ]
    return "\n".join(lines) + "\n"


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def add_arguments(p) -> None:
    p.add_argument("--sizes", type=_count, nargs="+", default=[24_000, 256_000], help="adapter sizes in bytes")
    p.add_argument("--adapters", type=_count, default=100, help="adapters in the registry (>= 1, default 100)")
    p.add_argument("--repeats", type=_count, default=5, help="releases measured per size (>= 1, default 5)")
    p.add_argument("--devices", type=_count, default=50, help="devices syncing at once (>= 1, default 50)")
    p.add_argument(
        "--changed-bytes", type=_count, default=8_000_000, help="size of the adapter the fleet release changes"
    )
    p.add_argument("--kill-at", type=_count, help="kill the registry once this many devices download (default: half)")


def _count(text: str) -> int:
    """An int >= 1 (argparse turns the error into exit 2 and one line: 0 adapters divided by zero, -1 devices hung)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def cli(args) -> int:
    import json

    from edge.format.io import write_json
    from lab.benchmarks import write_section

    res = run(tuple(args.sizes), args.adapters, args.repeats, args.devices, args.changed_bytes, args.kill_at)
    print(json.dumps(res, indent=1))
    if args.json:
        write_json(args.json, res)
    if args.md:
        write_section(args.md, "fleet", "Fleet: OCI registry and TUF sync", markdown(res))
    return 0


def _load1m() -> float | None:
    load = load_average()
    return load[0] if load else None
