"""Profile a model on the machine this runs on, under a device profile's options and budgets.

    result = profile_model("encoder.onnx", "rpi5", adapters=["shira-rotate.safetensors"])
    print(format_markdown(result))
    plot(result, "profile.png")                 # False (and no file) without matplotlib

Measures model load time, first-inference time, inference latency (p50/p95/p99 over
``runs`` timed runs after ``warmup``), per adapter the switch time, the first run after
a switch and the time until the backend settles, peak resident memory, file sizes and
the providers that actually ran, and checks each against the profile's budgets. The model's files
for the profile's other backends (``M.onnx`` beside ``M.tflite``) are compared too (:mod:`edge.engines`).
Device side only: numpy, the backend, and matplotlib only if a plot is asked for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.engines import format_engines, runtime_version
from edge.errors import AdapterMismatchError, ConfigError
from edge.format.adapter import inspect_adapter
from edge.format.feeds import generate_inputs
from edge.format.samples import read_npz
from edge.machine import load_average, machine, peak_rss_mb, status_mb
from edge.progress import bar

__all__ = [
    "PROFILE_FORMAT",
    "PROFILE_VERSION",
    "ProfileConfig",
    "format_markdown",
    "generate_inputs",
    "plot",
    "profile_model",
]

PROFILE_FORMAT = "edge.profiling"
PROFILE_VERSION = 1


@dataclass(frozen=True)
class ProfileConfig:
    """How much to measure."""

    runs: int = 200  # timed inference runs
    warmup: int = 20  # untimed runs before them
    switches: int = 20  # timed switches per adapter
    batch: int = 1  # size given to symbolic dimensions of generated inputs
    seed: int = 0  # generated inputs
    progress: bool = True  # progress bar on stderr (tqdm, if installed)
    engine_rounds: int = 5  # engines found beside the model: interleaved rounds of `engine_runs` runs each
    engine_runs: int = 10  # (0: no engine comparison)
    clip: bool = False  # an int8 base: clip adapter entries past the integer range (counted) instead of refusing


def profile_model(
    model: str | os.PathLike,
    device,
    *,
    adapters: Sequence[str | os.PathLike] = (),
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    backend: str | None = None,
    config: ProfileConfig = ProfileConfig(),
    devices_dir: Sequence[str | os.PathLike] = (),
) -> dict:
    """Measure ``model`` under ``device`` (profile name, YAML path or DeviceProfile); returns a JSON-able dict.

    ``backend="auto"``: what ``Runtime(model, device=device)`` runs, the engine :func:`~edge.engine_cache.cached_engine`
    chose (measured before the timed load on generated inputs, kept for the device; ``inputs`` and
    ``config.engine_rounds`` do not change it) with its twins' adapters; an adapter that fits neither raises before
    any timing. A backend named (default: the file's suffix) runs alone and the engines beside it are compared
    (``result["engines"]``, ``engine_report``).
    """
    from edge.devices import check_fits, load_profile
    from edge.engine_cache import cached_engine
    from edge.engines import EngineFile, engine_report, feeds_for
    from edge.runtime import Runtime

    model = Path(model)
    if not model.is_file():
        raise ConfigError(f"model file {model} {'is not a regular file' if model.exists() else 'does not exist'}")
    adapters = [Path(a) for a in adapters]
    missing = [str(a) for a in adapters if not a.is_file()]
    if missing:
        raise ConfigError(f"adapter file(s) {missing} do not exist or are not regular files")
    profile = load_profile(device, search=devices_dir)
    check_fits(model, profile)  # as Runtime(model, device=...) does: a file over the memory budget is never read
    chosen = None
    if backend == "auto":  # measured here before the timed load; Runtime below reads the choice back as a device does
        cached_engine(model, device=profile)
    else:
        backend = backend or _backend_for(model)  # Runtime applies the profile's fallback policy to it

    rss_before = status_mb("VmRSS")
    t0 = time.perf_counter()
    rt = Runtime(model, backend=backend, device=profile)  # options, fallback, keys, budget: as on the device itself
    load_ms = _ms(t0)
    asked = model  # inputs are generated from the file asked for (an .onnx beside a chosen .tflite)
    if backend == "auto":  # the engine Runtime chose, and its file: adapters for its twins load on it
        chosen, model, backend = rt.engine_choice, rt.engine_choice.path, rt.engine_choice.backend
    try:
        options = profile.backend_options(backend, quiet=True)  # what the report says ran (Runtime logged it)
        own = getattr(rt.backend, "input_specs", None) if model == asked else None  # read with the graph at load
        feeds, input_source = _feeds(asked, rt.info.inputs, inputs, config, own)
        feeds = feeds_for(EngineFile(backend, model), feeds) if chosen else feeds  # e.g. int32 ids for LiteRT
        fits = rt.info.fits
        if chosen and (stray := [str(a) for a in adapters if inspect_adapter(a)["base_fingerprint"] not in fits]):
            hint = f"--backend {_backend_for(asked)} profiles {asked.name} itself"
            raise AdapterMismatchError(f"adapter(s) {stray} do not fit {model.name}, chosen by auto: {hint}")
        t0 = time.perf_counter()
        reference = rt.run(feeds)
        first_ms = _ms(t0)

        total = config.warmup + config.runs + len(adapters) * config.switches
        with bar(
            total=total, desc=f"profile {model.name} ({profile.name})", unit="call", disable=not config.progress
        ) as pb:
            for _ in range(config.warmup):
                rt.run(feeds)
                pb.update()
            latency = []
            for _ in range(config.runs):
                t0 = time.perf_counter()
                rt.run(feeds)
                latency.append(_ms(t0))
                pb.update()
            per_adapter, switch_all = [], []
            for path in adapters:
                figures, switches = _profile_adapter(rt, path, feeds, config, pb)
                per_adapter.append(figures)
                switch_all += switches
        peak = max(peak_rss_mb(), rss_before or 0.0)  # the kernel's counters lag: never under a level seen
        providers = list(rt.providers)
        strategy = rt.strategy
        fingerprint = rt.info.fingerprint
    finally:
        rt.close()

    accuracy = _check_against_cpu(model, backend, providers, profile, feeds, reference)
    engines = engine_report(model, profile, feeds, options.threads, config.engine_rounds, config.engine_runs, chosen)
    result = {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "model": {"path": str(model), "name": model.stem, "bytes": model.stat().st_size, "fingerprint": fingerprint},
        "device": {
            "name": profile.name,
            "description": profile.description,
            "architecture": profile.architecture,
            "source": str(profile.source),
            "fallback": profile.fallback,
            "fallback_warning": options.fallback_warning,
        },
        "machine": machine(),
        "load_avg": load_average(),
        "backend": backend,
        "runtime": runtime_version(backend),
        "strategy": strategy,
        "threads": options.threads,
        "providers_requested": list(options.providers),
        "providers": providers,
        "inputs": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype), "source": input_source} for k, v in feeds.items()
        },
        "load_ms": load_ms,
        "first_inference_ms": first_ms,
        "latency_ms": _stats(latency, config.warmup),
        "adapters": per_adapter,
        "switch_p95_ms": _pct(switch_all, 95) if switch_all else None,
        "memory": {
            "rss_before_load_mb": rss_before,
            "peak_rss_mb": peak,
        },
        "accuracy": accuracy,
        "engines": engines,  # with backend="auto": its choice["reason"] says why this backend ran
    }
    result["budgets"] = _budgets(profile.budgets, result)
    return result


def _profile_adapter(rt, path: Path, feeds, config: ProfileConfig, pb) -> tuple[dict, list[float]]:
    """Load one adapter, then ``switches`` times: switch to it, run once, wait until settled, switch back.

    Returns its figures and the raw switch times (for the percentile over all adapters).
    """
    t0 = time.perf_counter()
    name = rt.load_adapter(path, clip=config.clip)
    load_ms = _ms(t0)
    switch, first_run, settle, back = [], [], [], []
    for _ in range(config.switches):
        t0 = time.perf_counter()
        rt.switch(name)
        switch.append(_ms(t0))
        clipped = rt.clipped  # entries of an int8 base clipped to its range (load_adapter(clip=True))
        t0 = time.perf_counter()
        rt.run(feeds)
        first_run.append(_ms(t0))
        t0 = time.perf_counter()
        rt.wait_settled(60)
        settle.append(_ms(t0))
        t0 = time.perf_counter()
        rt.switch(None)
        back.append(_ms(t0))
        rt.wait_settled(60)
        pb.update()
    held = rt.adapter_bytes[name]  # the bytes the runtime keeps for it (positions, values, base values, writes)
    rt.unload_adapter(name)
    figures = {
        "name": name,
        "path": str(path),
        "bytes": path.stat().st_size,
        "held_bytes": held,
        "load_ms": load_ms,
        "clipped": clipped,
        "switch_ms": _stats(switch),
        "first_run_after_switch_ms": _stats(first_run),
        "settle_ms": _stats(settle),
        "switch_back_ms": _stats(back),
    }
    return figures, switch


# -- inputs -------------------------------------------------------------------------------------
def _backend_for(model: Path) -> str:
    from runtimes import backend_for_path

    try:
        return backend_for_path(model)
    except ConfigError as e:
        raise ConfigError(f"{e}; pass --backend") from None


def _feeds(model: Path, names: Sequence[str], inputs, config: ProfileConfig, specs=None) -> tuple[dict, str]:
    if inputs is None:
        return generate_inputs(model, names, batch=config.batch, seed=config.seed, specs=specs), "generated"
    if isinstance(inputs, Mapping):
        feeds, source = {k: np.asarray(v) for k, v in inputs.items()}, "given"
    else:
        feeds, source = read_npz(inputs), str(inputs)
    missing = [n for n in names if n not in feeds]
    extra = [n for n in feeds if n not in names]
    if missing or extra:
        raise ConfigError(
            f"inputs {source}: missing {missing}, unknown {extra}; the model takes {list(names)} "
            "(save one array per input with np.savez)"
        )
    return feeds, source


# -- checks ------------------------------------------------------------------------------------
def _check_against_cpu(model, backend, providers, profile, feeds, outputs) -> dict | None:
    """Outputs of the providers that ran vs the same model on the backend's CPU provider (skipped if CPU ran)."""
    from edge.runtime import Runtime
    from runtimes import get_backend

    cpu = get_backend(backend).CPU_PROVIDER
    if cpu is None or providers == [cpu]:
        return None
    with Runtime(model, backend=backend, providers=[cpu]) as ref:
        expected = ref.run(feeds)
    checks = {k: profile.tolerances.check(outputs[k], expected[k]) for k in expected}
    return {
        "reference": cpu,
        "atol": profile.tolerances.atol,
        "rtol": profile.tolerances.rtol,
        "max_abs_diff": {k: d for k, (d, _) in checks.items()},
        "ok": all(ok for _, ok in checks.values()),
    }


def _budgets(budgets, result: dict) -> dict:
    measured = {
        "memory_mb": result["memory"]["peak_rss_mb"],
        "load_ms": result["load_ms"],
        "latency_p95_ms": result["latency_ms"]["p95"],
        "switch_p95_ms": result["switch_p95_ms"],
    }
    out = {}
    for key, value in measured.items():
        limit = getattr(budgets, key)
        out[key] = {"budget": limit, "measured": value, "ok": None if value is None else bool(value <= limit)}
    return out


# -- numbers ------------------------------------------------------------------------------------
def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _pct(xs, q: float) -> float:
    return float(np.percentile(np.asarray(xs, np.float64), q))


def _stats(xs: Sequence[float], warmup: int | None = None) -> dict:
    a = np.asarray(xs, np.float64)
    out = {
        "n": int(a.size),
        "p50": _pct(a, 50),
        "p95": _pct(a, 95),
        "p99": _pct(a, 99),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
        "samples": [round(float(x), 5) for x in a],
    }
    if warmup is not None:
        out["warmup"] = warmup
    return out


# -- output -------------------------------------------------------------------------------------
def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    return f"{x:.3g}{unit}" if abs(x) < 100 else f"{x:.0f}{unit}"


def format_markdown(result: dict) -> str:
    """A short Markdown report: headline figures against the budgets, then one row per adapter."""
    m, d, lat = result["machine"], result["device"], result["latency_ms"]
    load = result.get("load_avg")
    lines = [
        f"## {result['model']['name']} on device profile `{d['name']}`",
        "",
        f"Measured on {m['arch']}, {m['cpu'] or 'unknown CPU'}, {m['cores']} cores, Python {m['python']}, "
        f"{result['runtime']}"
        + (f", load average {load[0]:.2f}" if load else "")
        + f". Strategy `{result['strategy']}`, threads {result['threads'] or 'default'}, "
        f"providers that ran: {', '.join(result['providers'])}.",
    ]
    if d["fallback_warning"]:
        lines += ["", f"**Fallback:** {d['fallback_warning']}"]
    if d["architecture"] != m["arch"]:
        lines += ["", f"Note: the profile is for {d['architecture']}; these figures are from {m['arch']}."]
    if (result["threads"] or 0) > (m.get("cores") or 256):  # oversubscribed: latency here is pessimistic
        lines += ["", f"Note: the profile runs {result['threads']} threads on {m['cores']} cores here."]
    lines += ["", "| figure | measured | budget | within |", "|---|---|---|---|"]
    names = {
        "load_ms": "model load (ms)",
        "latency_p95_ms": "inference p95 (ms)",
        "switch_p95_ms": "adapter switch p95 (ms)",
        "memory_mb": "peak resident memory (MB)",
    }
    for key, label in names.items():
        b = result["budgets"][key]
        ok = {True: "yes", False: "**no**", None: "-"}[b["ok"]]
        lines.append(f"| {label} | {_fmt(b['measured'])} | {_fmt(b['budget'])} | {ok} |")
    lines += [
        f"| first inference (ms) | {_fmt(result['first_inference_ms'])} | | |",
        f"| inference p50 / p99 (ms), {lat['n']} runs after {lat['warmup']} warm-up | "
        f"{_fmt(lat['p50'])} / {_fmt(lat['p99'])} | | |",
        f"| model file | {result['model']['bytes'] / 1024:.1f} KiB | | |",
    ]
    if result["adapters"]:
        lines += [
            "",
            "| adapter | size | load (ms) | switch p50 / p95 (ms) | first run after (ms) | settle p50 (ms) |",
            "|---|---|---|---|---|---|",
        ]
        for a in result["adapters"]:
            s = a["switch_ms"]
            lines.append(
                f"| {a['name']} | {a['bytes'] / 1024:.1f} KiB | {_fmt(a['load_ms'])} | {_fmt(s['p50'])} / "
                f"{_fmt(s['p95'])} | {_fmt(a['first_run_after_switch_ms']['p50'])} | {_fmt(a['settle_ms']['p50'])} |"
            )
    acc = result.get("accuracy")
    if acc:
        worst = max(acc["max_abs_diff"].values(), default=0.0)
        lines += [
            "",
            f"Outputs vs {acc['reference']}: max |diff| {worst:.3g} "
            f"(atol {acc['atol']:g}, rtol {acc['rtol']:g}): {'within' if acc['ok'] else '**outside**'} tolerance.",
        ]
    if result.get("engines"):
        lines += ["", *format_engines(result["engines"])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | os.PathLike) -> bool:
    """Plot latency (histogram + CDF, p50/p95/p99 marked) and per-adapter switch times; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lat = result["latency_ms"]
    samples = np.asarray(lat["samples"])
    adapters = result["adapters"]
    fig, axes = plt.subplots(1, 2 if adapters else 1, figsize=(13 if adapters else 7, 4.8), squeeze=False)
    ax = axes[0][0]
    lo, hi = max(samples.min(), 1e-4), max(samples.max(), samples.min() * 1.01, 1e-4)
    log_x = hi / lo > 20  # a long tail (or a noisy machine): log bins keep the bulk and the tail readable
    bins = np.geomspace(lo, hi, 60) if log_x else min(50, max(10, samples.size // 5))
    ax.hist(samples, bins=bins, color="#4c78a8", alpha=0.85)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("inference latency (ms)" + (", log scale" if log_x else ""))
    ax.set_ylabel("runs")
    cdf = ax.twinx()
    xs = np.sort(samples)
    cdf.plot(xs, np.arange(1, xs.size + 1) / xs.size, color="#333333", lw=1.2, label="CDF")
    cdf.set_ylim(0, 1.02)
    cdf.set_ylabel("fraction of runs (CDF)")
    for q, color in (("p50", "#2ca02c"), ("p95", "#ff7f0e"), ("p99", "#d62728")):
        ax.axvline(lat[q], color=color, ls="--", lw=1.4, label=f"{q} {lat[q]:.3g} ms")
    budget = result["budgets"]["latency_p95_ms"]["budget"]
    if budget <= hi * 3:
        ax.axvline(budget, color="black", lw=1.6, label=f"p95 budget {budget:g} ms")
    ax.legend(loc="center right", fontsize=8, framealpha=0.9)
    ax.set_title(f"inference latency, {lat['n']} runs after {lat['warmup']} warm-up", fontsize=10)
    if adapters:
        ax2 = axes[0][1]
        names = [a["name"] for a in adapters]
        x = np.arange(len(names))
        w = 0.27
        series = (
            ("switch_ms", "switch call", "#4c78a8"),
            ("first_run_after_switch_ms", "first run after it", "#72b7b2"),
            ("settle_ms", "settle (background rebuild)", "#bab0ac"),
        )
        for i, (key, label, color) in enumerate(series):
            p50 = np.array([a[key]["p50"] for a in adapters])
            p95 = np.array([a[key]["p95"] for a in adapters])
            ax2.bar(x + (i - 1) * w, p50, w, color=color, label=label)
            ax2.errorbar(x + (i - 1) * w, p50, yerr=[np.zeros_like(p50), p95 - p50], fmt="none", ecolor="#333333")
        ax2.set_yscale("log")  # a switch is ~100x shorter than a rebuild: log keeps both visible
        top = max(max(a[k]["p95"] for a in adapters) for k, _, _ in series)
        ax2.set_ylim(top=max(top, result["budgets"]["switch_p95_ms"]["budget"]) * 30)  # room for the legend
        sb = result["budgets"]["switch_p95_ms"]["budget"]
        ax2.axhline(sb, color="black", lw=1.6, label=f"switch p95 budget {sb:g} ms")
        ax2.set_xticks(x, names, rotation=20 if len(names) > 4 else 0)
        ax2.set_ylabel("ms, log scale (bar p50, whisker to p95)")
        ax2.legend(fontsize=8, loc="upper left", framealpha=0.9)
        ax2.set_title(f"per adapter, {adapters[0]['switch_ms']['n']} switches each", fontsize=10)
    m = result["machine"]
    fig.suptitle(
        f"{Path(result['model']['path']).name} ({result['model']['bytes'] / 1024:.0f} KiB) under device profile "
        f"'{result['device']['name']}' "
        f"({result['backend']}, {', '.join(p.removesuffix('ExecutionProvider') for p in result['providers'])}, "
        f"strategy {result['strategy']})\nmeasured on {m['arch']} {m['cpu']}, {m['cores']} cores"
        + (f", load average {result['load_avg'][0]:.2f}" if result.get("load_avg") else ""),
        fontsize=10,
    )
    fig.tight_layout()
    from io import BytesIO

    from edge.format.io import atomic_write_bytes

    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True
