"""Fleet benchmark: a real registry on 127.0.0.1, one release changing 1 of 100 adapters, then a fleet.

Measures, per adapter size, the sync time of one device after a release that changes one adapter
out of 100 and the bytes it moved (TUF metadata + manifests + blobs, HTTP bodies) against that
adapter's bytes; then ``devices`` simulated devices (threads, each with its own folder and cache)
syncing concurrently, with faults injected: the registry killed and restarted mid-fleet and one
tampered blob. Needs the registry binary (``scripts/install-registry.sh``), oras and tuf.
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


def _one_of_100(tmp: Path, h, adapter_bytes: int, n_adapters: int, repeats: int) -> dict:
    from edge.fleet import FleetConfig, init_release, push, sync

    LocalRegistry, make_model, make_adapter = h.LocalRegistry, h.make_model, h.make_adapter
    root = tmp / f"size-{adapter_bytes}"
    model = root / "model.onnx"
    root.mkdir()
    info = make_model(model, d_in=512, d_hid=512)
    files = [
        make_adapter(info, root / f"a{i:03d}.safetensors", f"a{i:03d}", adapter_bytes, i) for i in range(n_adapters)
    ]
    with LocalRegistry(root / "registry") as reg:
        init_release(reg.host, "edge/adapters", root / "tuf", root / "keys", insecure=True)
        push(reg.host, "edge/adapters", "stable", model, files, root / "tuf", root / "keys", insecure=True)
        cfg = FleetConfig(reg.host, "edge/adapters", "stable", root / "tuf" / "root.json", insecure=True)
        first = sync(cfg, root / "device", model=model)
        times, ratios, moved, meta = [], [], [], []
        for r in range(repeats):
            changed = make_adapter(info, files[r % n_adapters], f"a{r % n_adapters:03d}", adapter_bytes, 1000 + r)
            push(reg.host, "edge/adapters", "stable", model, [changed], root / "tuf", root / "keys", insecure=True)
            rep = sync(cfg, root / "device", model=model)
            assert rep.status == "updated" and len(rep.installed) == 1, rep.to_dict()
            size = rep.installed[0]["bytes"]
            times.append(rep.seconds)
            moved.append(rep.bytes_total)
            meta.append(rep.bytes_metadata)
            ratios.append(rep.bytes_total / size)
    return {
        "adapters": n_adapters,
        "adapter_bytes": size,
        "first_sync_s": first.seconds,
        "first_sync_bytes": first.bytes_total,
        "sync_s_p50": round(statistics.median(times), 4),
        "bytes_moved_p50": int(statistics.median(moved)),
        "metadata_bytes_p50": int(statistics.median(meta)),
        "ratio_p50": round(statistics.median(ratios), 4),
        "ratio_max": round(max(ratios), 4),
        "repeats": repeats,
    }


def _fleet(tmp: Path, h, devices: int, n_adapters: int, adapter_bytes: int, changed_bytes: int) -> dict:
    """``devices`` concurrent syncs of release 2 (one adapter changed); the registry is killed mid-way."""
    from edge.fleet import FleetConfig, init_release, push, sync

    LocalRegistry, make_model, make_adapter = h.LocalRegistry, h.make_model, h.make_adapter
    root = tmp / "fleet"
    root.mkdir()
    model = root / "model.onnx"
    info = make_model(model, d_in=512, d_hid=512)
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
        changed = make_adapter(info, files[0], "a000", changed_bytes, 999)  # MBs: the kill cuts transfers
        push(reg.host, "edge/adapters", "stable", model, [changed], root / "tuf", root / "keys", insecure=True)
        killed, lock, chunks = threading.Event(), threading.Lock(), [0]

        def hook(_n):  # the registry dies once the fleet has read `devices` chunks of the release
            with lock:
                chunks[0] += 1
                if chunks[0] == devices and not killed.is_set():
                    killed.set()
                    reg.stop(kill=True)

        load = [_load1m()]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(devices) as ex:
            second = list(ex.map(lambda d: sync(cfg, d, model=model, on_chunk=hook), dev))
        loadable = sum(_loadable(d, info.fingerprint) for d in dev)  # no device is left without a usable set
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
        "resumed_downloads": sum(r.resumed for r in third),
        "first_sync_ok": sum(r.status == "updated" for r in first),
        "loadavg_1m": load,
    }


def run(
    sizes=(24_000, 256_000), n_adapters: int = 100, repeats: int = 5, devices: int = 50, changed_bytes: int = 2_000_000
) -> dict:
    h = _helpers()
    with tempfile.TemporaryDirectory(prefix="edge-bench-fleet-") as tmp:
        tmp = Path(tmp)
        one = [_one_of_100(tmp, h, s, n_adapters, repeats) for s in sizes]
        fleet = _fleet(tmp, h, devices, n_adapters, sizes[0], changed_bytes)
    return {"one_of_100": one, "fleet": fleet, "cpus": os.cpu_count(), "loadavg_1m_end": _load1m()}


def markdown(result: dict) -> str:
    lines = [
        "Release changing 1 of N adapters, one device (bytes = HTTP bodies: TUF metadata, manifests, blobs):",
        "",
        "| adapters | adapter bytes | sync p50 (s) | bytes moved p50 | of which metadata | moved / adapter p50 | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["one_of_100"]:
        lines.append(
            f"| {r['adapters']} | {r['adapter_bytes']:,} | {r['sync_s_p50']:.3f} | {r['bytes_moved_p50']:,} | "
            f"{r['metadata_bytes_p50']:,} | {r['ratio_p50']:.3f} | {r['ratio_max']:.3f} |"
        )
    f = result["fleet"]
    lines += [
        "",
        f"Fleet: {f['devices']} devices on loopback, {f['adapters']} adapters of {f['adapter_bytes']:,} bytes each; "
        f"the release changes one to {f['changed_bytes']:,} bytes and the registry is SIGKILLed after the fleet read "
        f"{f['devices']} chunks of it, then restarted ({result['cpus']} CPUs, 1-min load average "
        f"{f['loadavg_1m'][0]} -> {f['loadavg_1m'][1]}):",
        "",
        "| devices | first sync wall (s) | release wall incl. kill + restart (s) | converged | after kill | "
        "loadable after kill | after restart | resumed downloads |",
        "|---|---|---|---|---|---|---|---|",
        f"| {f['devices']} | {f['first_sync_wall_s']:.2f} | {f['release_wall_s']:.2f} | "
        f"{f['converged']}/{f['devices']} | "
        f"{_counts(f['statuses_after_kill'])} | {f['loadable_after_kill']}/{f['devices']} | "
        f"{_counts(f['statuses_after_restart'])} | {f['resumed_downloads']} |",
    ]
    return "\n".join(lines) + "\n"


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def add_arguments(p) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=[24_000, 256_000], help="adapter sizes in bytes")
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--changed-bytes", type=int, default=2_000_000, help="size of the adapter the fleet release changes")


def cli(args) -> int:
    import json

    from edge.format.io import write_json
    from lab.benchmarks import write_section

    res = run(tuple(args.sizes), args.adapters, args.repeats, args.devices, args.changed_bytes)
    print(json.dumps(res, indent=1))
    if args.json:
        write_json(args.json, res)
    if args.md:
        write_section(args.md, "fleet", "Fleet: OCI registry and TUF sync", markdown(res))
    return 0


def _load1m() -> float | None:
    load = load_average()
    return load[0] if load else None
