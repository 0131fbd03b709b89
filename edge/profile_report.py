"""`edge profile`'s reports: the Markdown summary and the PNG plot of a :func:`edge.profiling.profile_model` result."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edge.engines import format_engines

__all__ = ["format_markdown", "plot"]


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
    mem = result["memory"]
    if mem.get("room_mb") is not None:  # the memory budget, as load_adapter counts it: model + adapters held
        held = result["budgets"]["memory_mb"]["budget"] - mem["room_mb"]
        ok = "yes" if mem["room_mb"] >= 0 else "**no**"
        lines.append(
            f"| model ({'predicted' if mem['predicted_mb'] is not None else 'file size'}) + "
            f"{len(result['adapters'])} adapter(s) held (MB; adapters {_fmt(mem['adapters_mb'])}) | "
            f"{_fmt(held)} | {_fmt(result['budgets']['memory_mb']['budget'])} | {ok} |"
        )
    if result["adapters"]:
        lines += [
            "",
            "| adapter | size | held | load (ms) | switch p50 / p95 (ms) | first run after (ms) | settle p50 (ms) |",
            "|---|---|---|---|---|---|---|",
        ]
        for a in result["adapters"]:
            s = a["switch_ms"]
            lines.append(
                f"| {a['name']} | {a['bytes'] / 1024:.1f} KiB | {a['held_bytes'] / 1024:.1f} KiB | "
                f"{_fmt(a['load_ms'])} | {_fmt(s['p50'])} / "
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
