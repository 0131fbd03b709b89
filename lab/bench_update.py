"""On-device updates from 100 labelled samples per domain vs a host SHiRA fine-tune (``edge bench update``).

For each demo target domain: draw ``samples`` labelled images from the domain's
train split (fixed seed), update from the base model with every registered method
(numpy only, BLAS and the runtime limited to ``threads``), and measure accuracy on
the domain's test split before and after, the update's wall time (encoder forward
included) and its peak extra memory. The reference ``host_shira_acc`` is the mean
test accuracy of a host-side SHiRA fine-tune (torch, :mod:`exporters.shira`, the
demo's mask, density, targets and learning rate, as many optimiser steps as the
demo's adapters take) on the same samples. Then each method learns the domains
one after another in one state, and the accuracy on every domain seen so far shows
what later domains make it forget.

Then (:mod:`lab.bench_trainers`, unless ``--no-host``) the growth trainers: on the demo ViT
and the demo CNN, the numpy device trainer (torch blocked) and the torch host trainer grow
the same graph-found tail from the same samples with the same recipe, and the device
trainer's accuracy gain is compared with the host trainer's.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from edge.machine import p50

__all__ = ["GOALS", "add_arguments", "bench_update", "cli", "draw_samples", "markdown"]

GOALS = {"seconds_per_100": 1.0, "peak_extra_mb": 64.0, "gain_ratio": 0.9}


def draw_samples(domain, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled training images of ``domain``, drawn without replacement by a seed and the domain's name."""
    rng = np.random.default_rng([seed, zlib.crc32(domain.name.encode())])
    idx = np.sort(rng.choice(len(domain.x_train), min(n, len(domain.x_train)), replace=False))
    return domain.x_train[idx], domain.y_train[idx]


def bench_update(
    model_path: str | Path,
    domains: Mapping[str, object],
    *,
    methods: Sequence[str] | None = None,
    samples: int = 100,
    seed: int = 0,
    threads: int | None = 1,
    memory_mb: float = 64.0,
    repeats: int = 3,
    host_reference: Callable[[str, np.ndarray, np.ndarray], float] | None = None,
    options: Mapping[str, Mapping[str, object]] | None = None,
) -> dict:
    """Rows per (method, domain), the host reference, goals and the domain-incremental run."""
    from edge.learn.update import METHODS, Updater, limit_blas_threads
    from edge.runtime import Runtime

    methods = list(methods or METHODS.names())
    options = dict(options or {})
    targets = [k for k in domains if k != "clean"]
    draws = {k: draw_samples(domains[k], samples, seed) for k in targets}
    rows, host = [], {}
    with limit_blas_threads(threads) as blas, Runtime(model_path, threads=threads) as rt:

        def accuracy(pred: np.ndarray, d) -> float:
            return float((pred == d.y_test).mean())

        base = {k: accuracy(rt.run({"pixels": domains[k].x_test})["logits"].argmax(1), domains[k]) for k in targets}
        for k in targets:
            x, y = draws[k]
            for m in methods:
                times, reports = [], []
                for _ in range(max(1, repeats)):  # fresh state each time: every repeat is the same update
                    up = Updater(rt, m, memory_mb=memory_mb, **options.get(m, {}))
                    reports.append(up.partial_fit(x, y))
                    times.append(reports[-1].seconds)
                row = {
                    "method": m,
                    "domain": k,
                    "samples": len(y),
                    "seconds": p50(times),
                    "encoder_seconds": p50([r.encoder_seconds for r in reports]),
                    "peak_extra_mb": max(r.peak_extra_mb for r in reports),
                    "acc_before": base[k],
                    "acc_after": accuracy(up.predict(domains[k].x_test), domains[k]),
                }
                if m == "shira-head":  # the learned entries as an adapter, fused into the runtime
                    rt.load_adapter(up.to_adapter(f"bench-{k}"))
                    rt.switch(f"bench-{k}")
                    row["acc_fused"] = accuracy(rt.run({"pixels": domains[k].x_test})["logits"].argmax(1), domains[k])
                    rt.switch(None)
                    rt.unload_adapter(f"bench-{k}")
                rows.append(row)
            if host_reference is not None:
                host[k] = host_reference(k, x, y)
        incremental = _incremental(rt, methods, targets, draws, domains, memory_mb, options)

    result = {
        "rows": rows,
        "host_shira_acc": float(np.mean(list(host.values()))) if host else None,
        "host_shira_acc_per_domain": host,
        "base_acc": float(np.mean(list(base.values()))),
        "samples": samples,
        "seed": seed,
        "threads": threads,
        "blas_threads": blas,
        "memory_mb": memory_mb,
        "incremental": incremental,
    }
    result["summary"], result["goals"] = _summary(result, methods)
    return result


def _incremental(rt, methods, targets, draws, domains, memory_mb, options) -> dict:
    """Each method learns the domains in order in one state; accuracy on all seen domains after each.

    With the domain named at each update (per-domain prototypes), and pooled (no domain given).
    """
    from edge.learn.update import Updater

    def run(m: str, named: bool) -> dict:
        up = Updater(rt, m, memory_mb=memory_mb, **options.get(m, {}))
        steps, own = [], {}
        for i, k in enumerate(targets):
            up.partial_fit(*draws[k], domain=k if named else None)
            accs = {j: float((up.predict(domains[j].x_test) == domains[j].y_test).mean()) for j in targets[: i + 1]}
            own[k] = accs[k]
            steps.append({"after": k, "acc": accs})
        final = steps[-1]["acc"]
        earlier = targets[:-1]
        return {
            "steps": steps,
            "final_mean_acc": float(np.mean(list(final.values()))),
            "forgetting": float(np.mean([own[k] - final[k] for k in earlier])) if earlier else 0.0,
        }

    out = {}
    for m in methods:
        out[m] = run(m, named=True)
        pooled = run(m, named=False)
        out[m]["pooled"] = {k: pooled[k] for k in ("final_mean_acc", "forgetting")}
    return out


def _summary(result: dict, methods: Sequence[str]) -> tuple[dict, dict]:
    base, host = result["base_acc"], result["host_shira_acc"]
    summary = {}
    for m in methods:
        rows = [r for r in result["rows"] if r["method"] == m]
        acc = float(np.mean([r["acc_after"] for r in rows]))
        summary[m] = {
            "acc_after": acc,
            "seconds_per_100": max(r["seconds"] * 100.0 / r["samples"] for r in rows),
            "peak_extra_mb": max(r["peak_extra_mb"] for r in rows),
            "gain_ratio": (acc - base) / (host - base) if host is not None and host != base else None,
        }
    best = max(methods, key=lambda m: summary[m]["acc_after"])
    b = summary[best]
    met = (
        b["seconds_per_100"] <= GOALS["seconds_per_100"]
        and b["peak_extra_mb"] <= GOALS["peak_extra_mb"]
        and b["gain_ratio"] is not None
        and b["gain_ratio"] >= GOALS["gain_ratio"]
    )
    return summary, {"best_method": best, **b, "targets": GOALS, "met": met}


def markdown(r: dict) -> str:
    host = r["host_shira_acc"]
    host_txt = f"{host:.1%}" if host is not None else "not run"
    lines = [
        f"{r['samples']} labelled samples per domain (seed {r['seed']}), update from the base model; "
        f"runtime and BLAS threads: {r['threads']} ({r['blas_threads']}); memory budget {r['memory_mb']:g} MB. "
        f"Base accuracy (mean over domains) {r['base_acc']:.1%}; host SHiRA fine-tune on the same samples "
        f"{host_txt}.",
        "",
        "| method | domain | seconds | of which encoder | peak extra MB | acc before | acc after |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        fused = f" (fused {row['acc_fused']:.1%})" if "acc_fused" in row else ""
        lines.append(
            f"| {row['method']} | {row['domain']} | {row['seconds']:.3f} | {row['encoder_seconds']:.3f} | "
            f"{row['peak_extra_mb']:.2f} | {row['acc_before']:.1%} | {row['acc_after']:.1%}{fused} |"
        )
    lines += [
        "",
        "| method | mean acc after | share of the host gain | worst s per 100 samples | worst peak MB | "
        "domain-incremental: final mean acc | forgetting | same, domains not named: final | forgetting |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, s in r["summary"].items():
        inc = r["incremental"][m]
        ratio = f"{s['gain_ratio']:.0%}" if s["gain_ratio"] is not None else "-"
        lines.append(
            f"| {m} | {s['acc_after']:.1%} | {ratio} | {s['seconds_per_100']:.3f} | {s['peak_extra_mb']:.2f} | "
            f"{inc['final_mean_acc']:.1%} | {inc['forgetting']:+.1%} | "
            f"{inc['pooled']['final_mean_acc']:.1%} | {inc['pooled']['forgetting']:+.1%} |"
        )
    g = r["goals"]
    ratio = f"{g['gain_ratio']:.0%}" if g["gain_ratio"] is not None else "n/a"
    order = " -> ".join(step["after"] for step in r["incremental"][g["best_method"]]["steps"])
    lines += [
        "",
        f"Best on-device method `{g['best_method']}`: {g['seconds_per_100']:.3f} s per 100 samples "
        f"(goal <= {GOALS['seconds_per_100']:g} s), {g['peak_extra_mb']:.2f} MB peak extra "
        f"(goal <= {GOALS['peak_extra_mb']:g} MB), {ratio} of the host fine-tune's accuracy gain "
        f"(goal >= {GOALS['gain_ratio']:.0%}): **{'met' if g['met'] else 'not met'}**. "
        "Domain-incremental: one state learns the domains in order "
        f"({order}), each update naming its domain (`partial_fit(x, y, domain=...)`: per-domain prototypes for "
        "ncm, slda and ranpac; one head with a replay buffer for shira-head), or not; forgetting = accuracy on a "
        "domain right after learning it minus at the end (mean over the earlier domains).",
        "",
    ]
    return "\n".join(lines)


def add_arguments(sp) -> None:
    sp.add_argument("--methods", help="comma-separated update methods (default: every registered one)")
    sp.add_argument("--samples", type=int, default=100, help="labelled samples per domain (default 100)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--memory-mb", type=float, default=64.0, help="update memory budget (default 64)")
    sp.add_argument("--repeats", type=int, default=3, help="timed repeats of each update (median reported)")
    sp.add_argument(
        "--no-host",
        action="store_true",
        help="skip the host SHiRA reference and the trainer comparison (no torch needed)",
    )
    sp.add_argument("--model-file", help="an exported digits .onnx to use instead of the demo's (device side)")
    sp.add_argument(
        "--no-trainers", action="store_true", help="skip the device-vs-host trainer comparison (lab.bench_trainers)"
    )
    sp.add_argument(
        "--trainer-runs",
        default="0.1:256,0.5:256,0.5:32",
        help="density:minibatch pairs of the trainer comparison (default 0.1:256,0.5:256,0.5:32)",
    )
    sp.add_argument(
        "--trainer-seeds",
        type=int,
        default=3,
        help="seeds (from --seed on) of the trainer comparison's minibatch runs (default 3)",
    )


def cli(args) -> int:
    import json

    from edge.commands import host_needed
    from edge.errors import ConfigError
    from edge.format.io import write_json
    from edge.machine import machine
    from lab.benchmarks import write_section
    from lab.datasets import load_domains

    threads = 1 if args.threads is None else args.threads  # "one core" unless asked otherwise
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    cfg = None
    if args.model_file:
        model = Path(args.model_file)
    else:
        host_needed("edge bench update (without --model-file)")
        from lab.pipeline import DemoConfig, prepare_demo

        cfg = DemoConfig()
        model = prepare_demo(args.cache, cfg, progress=not args.quiet).model
    domains = load_domains(("rotate", "noise", "invert", "blur") if cfg is None else cfg.domains)
    host = None
    if not args.no_host:
        host_needed("the host SHiRA reference of edge bench update (or pass --no-host)")
        from lab.pipeline import DemoConfig

        checkpoint = model.with_name("encoder.safetensors")
        if not checkpoint.exists():
            raise ConfigError(f"no host checkpoint {checkpoint} next to the model for the reference; pass --no-host")
        from lab.pipeline import host_shira_reference

        host = host_shira_reference(checkpoint, domains, cfg or DemoConfig(), threads)
    result = bench_update(
        model,
        domains,
        methods=methods,
        samples=args.samples,
        seed=args.seed,
        threads=threads,
        memory_mb=args.memory_mb,
        repeats=args.repeats,
        host_reference=host,
    )
    if not args.no_host and not args.no_trainers:
        result["trainers"] = _trainers(args, model, cfg, domains, threads)
    result["machine"] = machine()
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)
    if args.md:
        body = markdown(result)
        if "trainers" in result:
            from lab.bench_trainers import markdown as trainers_markdown

            body += "\n" + trainers_markdown(result["trainers"])
        write_section(args.md, "update", "On-device updates (numpy only) vs a host SHiRA fine-tune", body)
    return 0


def _trainers(args, model: Path, cfg, domains, threads: int) -> dict:
    """The device-vs-host trainer comparison on the demo ViT and CNN (or on ``--model-file`` alone)."""
    from edge.errors import ConfigError
    from lab.bench_trainers import Encoder, TrainerConfig, compare_trainers

    try:
        runs = tuple((float(d), int(b)) for d, b in (r.split(":") for r in args.trainer_runs.split(",")))
    except ValueError as e:
        raise ConfigError(
            f"--trainer-runs takes density:minibatch pairs like 0.1:256,0.5:32, got {args.trainer_runs!r}"
        ) from e
    encoders = {(cfg.model if cfg is not None else "model"): Encoder(model, model.with_name("encoder.safetensors"))}
    if cfg is not None:
        from dataclasses import replace

        from lab.pipeline import prepare_demo

        other = replace(cfg, model="cnn" if cfg.model == "vit" else "vit", density=None, targets=None)
        path = prepare_demo(args.cache, other, progress=not args.quiet).model
        encoders[other.model] = Encoder(path, path.with_name("encoder.safetensors"))
    targets = [k for k in domains if k != "clean"]
    draws = {k: draw_samples(domains[k], args.samples, args.seed) for k in targets}
    tests = {k: (domains[k].x_test, domains[k].y_test) for k in targets}
    return compare_trainers(
        encoders,
        draws,
        tests,
        TrainerConfig(runs=runs, seeds=tuple(args.seed + i for i in range(args.trainer_seeds))),
        threads=threads,
    )
