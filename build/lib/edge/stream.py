"""``edge demo --stream``: detection, growth and routing on a drifting stream of digits.

The stream visits D0 -> D1 -> D2 -> D1 -> D3 (default: clean -> rotate -> noise ->
rotate -> invert) in batches. The device starts with the base model (serving clean
digits) and pre-trained adapters for the *known* shifts (rotate, noise, blur); D3 has
no adapter, so the router must notice it (persistent OOD), fall back to the base model,
buffer its inputs, and grow a new adaptor (architecture picked under the budget by the
zero-shot proxy, trained on the host, registered with its own prototypes), then route
to it. Labels travel with the stream: they feed prototype updates and the growth
buffer, never routing or predictions.

Accuracy is reported per segment and overall next to two references over the same
inputs: the base model only, and an oracle that always applies the right pre-trained
adapter (for D3, one trained offline on its full training split). At the end every
seen domain's held-out test inputs (minus those used for growth) are routed again,
unlabelled.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge.errors import ConfigError

__all__ = ["StreamConfig", "cli", "format_stream", "run_stream"]


@dataclass(frozen=True)
class StreamConfig:
    """The drifting stream and the growth budget of ``edge demo --stream``."""

    sequence: tuple[str, ...] = ("clean", "rotate", "noise", "rotate", "invert")
    known: tuple[str, ...] = ("rotate", "noise", "blur")  # adapters loaded at start; clean = base model
    segment: int = 400  # inputs per segment; the last (novel) segment takes all its test inputs
    batch: int = 16
    seed: int = 0
    grow_epochs: int = 60
    memory_mb: float = 0.25  # the grown adapter's resident memory budget
    latency_ms: float = 5.0  # first inference after switching to it


def run_stream(
    model: Path,
    adapters: dict[str, Path],
    checkpoint: Path,
    domains: dict,
    cfg: StreamConfig = StreamConfig(),
    *,
    backend: str = "onnxruntime",
    strategy: str = "auto",
    threads: int | None = None,
    budget=None,
    router_config=None,
    progress: bool = True,
) -> dict:
    """Run the stream on the device side (growth trains on the host via ``checkpoint``); returns a JSON-able dict."""
    from edge.adapters import load_adapter
    from edge.growth import Budget, HostTrainer, grow, measure_device
    from edge.router import Reconfigurator, RouterConfig
    from edge.runtime import Runtime
    from edge.taps import tap_model

    if backend != "onnxruntime":
        raise ConfigError(
            f"feature taps edit ONNX graphs; backend {backend!r} is not supported here, use --backend onnxruntime"
        )
    missing = [d for d in {*cfg.sequence, *cfg.known} if d not in domains]
    if missing or cfg.sequence[0] != "clean":
        raise ConfigError(f"stream domains {missing} are not loaded, or the stream does not start at 'clean'")
    novel = [d for d in cfg.sequence if d != "clean" and d not in cfg.known]
    if not novel:
        raise ConfigError(f"the stream {cfg.sequence} has no domain outside the known {cfg.known}: nothing to grow")
    tapped = tap_model(model, model.with_name(model.stem + ".tapped.onnx"))
    rt = Runtime(tapped.path, backend=backend, strategy=strategy, threads=threads)
    loaded = {k: load_adapter(adapters[k]) for k in cfg.known}
    for k, a in loaded.items():
        rt.load_adapter(a, name=k)
    router = Reconfigurator(rt, tapped, router_config or RouterConfig(seed=cfg.seed))
    router.add_domain("clean", None, domains["clean"].x_train, domains["clean"].y_train)
    for k in cfg.known:
        router.add_domain(k, k, domains[k].x_train, domains[k].y_train)
    router.fit()
    device = measure_device(rt, domains["clean"].x_test, {k: a.nnz for k, a in loaded.items()})
    budget = budget or Budget(cfg.memory_mb, cfg.latency_ms)
    trainer = HostTrainer(checkpoint, rt.info, epochs=cfg.grow_epochs, seed=cfg.seed)
    refs = _References(model, adapters, backend, threads)

    rng = np.random.default_rng(cfg.seed)
    segments, timeline, growth, used = [], [], [], {}
    pos = 0
    for si, name in enumerate(cfg.sequence):
        d = domains[name]
        order = rng.permutation(len(d.x_test))
        if name not in novel:
            order = order[: cfg.segment]
        x, y = d.x_test[order], d.y_test[order]
        served, correct = [], []
        ood = 0
        for s in range(0, len(x), cfg.batch):
            xb, yb = x[s : s + cfg.batch], y[s : s + cfg.batch]
            step = router.process(xb, yb)
            served += [step.served_by] * len(xb)
            correct += list(step.logits.argmax(1) == yb)
            ood += int(step.ood.sum())
            if step.event:
                timeline.append({"at": pos + s + len(xb), "segment": si, "truth": name, "event": step.event})
            if router.growth_ready:
                bx, by = router.take_buffer()
                new = f"new-{len(growth) + 1}"
                _say(progress, f"growing adaptor {new} from {len(bx)} novel inputs")
                res = grow(rt, bx, by, trainer=trainer, budget=budget, name=new, device=device)
                rt.load_adapter(res.adapter, name=new)
                router.add_grown(new, new, bx, by)
                growth.append({"name": new, "truth": name, "at": pos + s + len(xb), **res.as_dict()})
                timeline.append({"at": pos + s + len(xb), "segment": si, "truth": name, "event": f"grow:{new}"})
                used[name] = used.get(name, set()) | {bytes(v) for v in bx}
        base_acc, oracle_acc = refs.accuracy(x, y, name)
        segments.append(
            {
                "domain": name,
                "inputs": len(x),
                "acc": float(np.mean(correct)),
                "base_acc": base_acc,
                "oracle_acc": oracle_acc,
                "ood_share": ood / len(x),
                "served_by": {k: v / len(x) for k, v in Counter(served).items()},
            }
        )
        pos += len(x)

    final = _final_eval(router, refs, domains, cfg, used)
    total = sum(s["inputs"] for s in segments)
    st = router.stats
    result = {
        "config": asdict(cfg),
        "budget": {k: (None if v == float("inf") else v) for k, v in asdict(budget).items()},
        "router": asdict(router.config),
        "taps": list(tapped.tensors),
        "device": device,
        "segments": segments,
        "overall": {k: sum(s[k] * s["inputs"] for s in segments) / total for k in ("acc", "base_acc", "oracle_acc")},
        "timeline": timeline,
        "growth": growth,
        "final": final,
        "switches": st["switches"],
        "detect_pct": 100.0 * (st["detect_s"] - st["learn_s"]) / max(st["infer_s"], 1e-12),
        "learn_pct": 100.0 * st["learn_s"] / max(st["infer_s"], 1e-12),
        "domains_known_at_end": router.domains,
        "load_avg": _load(),
    }
    rt.close()
    refs.close()
    return result


class _References:
    """Base-only and oracle predictions on the untapped model (oracle: every domain's pre-trained adapter)."""

    def __init__(self, model: Path, adapters: dict[str, Path], backend: str, threads: int | None) -> None:
        from edge.runtime import Runtime

        self.rt = Runtime(model, backend=backend, threads=threads)
        for k, p in adapters.items():
            self.rt.load_adapter(p, name=k)

    def accuracy(self, x: np.ndarray, y: np.ndarray, domain: str) -> tuple[float, float]:
        accs = []
        for state in (None, domain if domain in self.rt.adapters else None):
            self.rt.switch(state)
            accs.append(float((self.rt.run({self.rt.info.inputs[0]: x})["logits"].argmax(1) == y).mean()))
        return accs[0], accs[1]

    def close(self) -> None:
        self.rt.close()


def _final_eval(router, refs, domains, cfg: StreamConfig, used: dict) -> list[dict]:
    """Route every seen domain's test inputs (minus growth data) again, unlabelled, domain after domain."""
    rows = []
    for name in dict.fromkeys(cfg.sequence):
        d = domains[name]
        keep = np.array([bytes(v) not in used.get(name, set()) for v in d.x_test])
        x, y = d.x_test[keep], d.y_test[keep]
        served, correct = [], []
        for s in range(0, len(x), cfg.batch):
            step = router.process(x[s : s + cfg.batch])
            served += [step.served_by] * len(step.logits)
            correct += list(step.logits.argmax(1) == y[s : s + cfg.batch])
        base_acc, oracle_acc = refs.accuracy(x, y, name)
        top, n = Counter(served).most_common(1)[0]
        rows.append(
            {
                "domain": name,
                "inputs": len(x),
                "acc": float(np.mean(correct)),
                "base_acc": base_acc,
                "oracle_acc": oracle_acc,
                "served_mostly_by": top,
                "served_share": n / len(x),
            }
        )
    return rows


def format_stream(r: dict) -> str:
    """The timeline and the accuracy tables, for the terminal."""
    lines = ["stream: " + " -> ".join(s["domain"] for s in r["segments"]), "", "timeline (input index: event):"]
    for e in r["timeline"]:
        lines.append(f"  {e['at']:>5}  [{e['truth']:<7}] {e['event']}")
    for g in r["growth"]:
        c = g["chosen"]
        fits = sum(x["fits"] for x in g["candidates"])
        lines.append(
            f"  grew {g['name']} for {g['truth']!r}: {c['arch']} ({c['nnz']} entries, {c['memory_mb']:.3f} MB, "
            f"proxy {c['proxy']}), {fits}/{len(g['candidates'])} candidates within budget, trained in {g['train_s']} s"
        )
    lines += ["", f"{'segment':<10} {'inputs':>6} {'edge':>7} {'base':>7} {'oracle':>7} {'OOD':>6}  served by"]
    for s in r["segments"]:
        served = ", ".join(f"{k} {v:.0%}" for k, v in sorted(s["served_by"].items(), key=lambda kv: -kv[1]))
        lines.append(
            f"{s['domain']:<10} {s['inputs']:>6} {s['acc']:>7.1%} {s['base_acc']:>7.1%} {s['oracle_acc']:>7.1%} "
            f"{s['ood_share']:>6.1%}  {served}"
        )
    o = r["overall"]
    lines.append(f"{'overall':<10} {'':>6} {o['acc']:>7.1%} {o['base_acc']:>7.1%} {o['oracle_acc']:>7.1%}")
    lines += ["", "all seen domains afterwards (held-out test inputs, unlabelled):"]
    lines.append(f"{'domain':<10} {'inputs':>6} {'edge':>7} {'base':>7} {'oracle':>7}  routed to")
    for f in r["final"]:
        lines.append(
            f"{f['domain']:<10} {f['inputs']:>6} {f['acc']:>7.1%} {f['base_acc']:>7.1%} {f['oracle_acc']:>7.1%}  "
            f"{f['served_mostly_by']} ({f['served_share']:.0%})"
        )
    mean = {k: np.mean([f[k] for f in r["final"]]) for k in ("acc", "base_acc", "oracle_acc")}
    lines.append(f"{'mean':<10} {'':>6} {mean['acc']:>7.1%} {mean['base_acc']:>7.1%} {mean['oracle_acc']:>7.1%}")
    lines += [
        "",
        f"{r['switches']} switches; wall time next to inference: detection and routing {r['detect_pct']:.1f} %, "
        f"prototype updates {r['learn_pct']:.1f} % (load average {r['load_avg']})",
    ]
    return "\n".join(lines)


def _load() -> list[float] | None:
    import os

    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _say(progress: bool, msg: str) -> None:
    if progress:
        import sys

        print(f"[edge] {msg}", file=sys.stderr, flush=True)


def cli(args) -> int:
    """``edge demo --stream`` (host + device: the demo's artifacts are built or reused, growth trains on the host)."""
    from edge.commands import host_needed
    from edge.datasets import load_domains
    from edge.demo import write_json

    host_needed("edge demo --stream")
    from exporters.pipeline import DemoConfig, prepare_demo

    demo = DemoConfig(seed=args.seed)
    art = prepare_demo(args.cache, demo, progress=not args.quiet)
    cfg = StreamConfig(seed=args.seed)
    domains = load_domains(demo.domains, seed=demo.seed)
    budget = None
    if getattr(args, "grow_device", None):
        from edge.devices import load_profile
        from edge.growth import Budget

        budget = Budget.of(load_profile(args.grow_device))
    result = run_stream(
        art.model,
        art.adapters,
        art.model.parent / "encoder.safetensors",
        domains,
        cfg,
        backend=args.backend,
        strategy=args.strategy,
        threads=args.threads,
        budget=budget,
        progress=not args.quiet,
    )
    print(format_stream(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
