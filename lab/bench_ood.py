"""OOD detection (HDC vs MSP, energy, Mahalanobis, KNN), routing accuracy and detection cost (``edge bench ood``).

On the digits encoder of ``edge demo``, base weights (taps: ``VIT_TAPS``, the normalised embedding, on the ViT;
``CNN_TAPS`` on the CNN; ``--taps`` any set of :mod:`edge.route.tapsets`, ``NAME:K`` its first ``K`` taps):
every detector is fitted on the clean training split's tapped features (and logits), and
scored on the clean test split (ID, the positive class) against each shifted copy of it (OOD). Near shifts are mild
(``rotate-mild`` 10-20 degrees, ``noise-mild`` sigma 0.15, ``shift`` one pixel and 90 %
scale); far ones are the demo's rotate, noise, blur and invert. The same numbers on the
model's final ``features`` output alone are reported too (``methods_final_features``).

Routing: the :class:`~edge.route.router.Reconfigurator` knows clean (base) and the four
adapted domains. Per input, under every state, over each known domain's test inputs:
``routing_served`` is the share whose vote as the runtime serves it (the graph head's
``edge.vote``, the OOD threshold applied) is the right domain: a known input voted OOD
counts as wrong; ``known_rejected`` the share voted OOD; ``routing_argmax`` the share
whose most similar class prototype is of the right domain, threshold ignored (the
flattering figure this bench used to report). ``stream_routing_acc`` is what the window
policy serves on a stream visiting each domain in turn (transitions cost a window), and
``mixed`` counts switches on streams that interleave two domains at random.
``unknown_accepted`` is the serving threshold's false positive rate: the share of each
near shift (unknown to the router) voted into a known domain under the clean state.
``novel_accepted``: each adapted domain left out of the router in turn (what ``edge demo
--stream`` meets: a domain with no adapter), the share of its test inputs voted into a known
domain, mean over the states; the growth loop needs it low.

``detect_overhead_pct`` at batch 1 (a sensor stream on a device; the ``--batch`` figure,
16, beside it): everything detection adds to a plain run of the encoder, as the router
runs it: the taps and the HDC detector head in the graph (:mod:`edge.route.taps`), over
the plain run. For comparison, the same scoring done in numpy after a taps-only
run (``numpy_overhead_pct``), and the nonlinear bipolar encoding (``bipolar``). Every
overhead is paired within rounds: the median over rounds of the per-round ratio of block
medians, on the demo encoder and on MiniLM (``--minilm``) alike; the timing lives in
:mod:`lab.bench_overhead`. Each run fetches only what a served stream does: the plain run
its logits, the router's path :attr:`~edge.route.router.Reconfigurator.fetches` (the
logits and the vote: the bench's router does not learn).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import ConfigError
from lab.bench_ood_report import markdown
from lab.bench_overhead import detection_overhead, encoder_overhead

__all__ = ["FAR", "GOALS", "NEAR", "add_arguments", "bench_ood", "cli", "markdown", "register_near_shifts"]

HEAD_SPARE = 1  # domains the in-graph detector head holds beyond the known ones (room to grow one)
#: the CNN's default taps: the first of its declared ones (the stem map) alone. One pooled tensor instead of two
#: saves the Concat, about 7 points of batch-1 overhead on a 12 us model (BENCHMARKS.md: 32.8 -> 25.7 %),
#: and on the demo domains it detects as well (HDC AUROC 98.6 vs 98.1) and routes nearly as well (served 97.5
#: vs 98.1 %, rejected 2.1 vs 1.5 %)
CNN_TAPS = "first"
#: the ViT's default taps: block 0's normalised attention input (the normalised embedding) alone (edge.route.tapsets,
#: ``NAME:K``). One tap instead of the two ``attn`` taps saves the Concat and half the head's matrices, most of the
#: batch-1 overhead on a 60 us model; it routes 95.0 % as served (``attn`` 95.5 %), detects best (HDC AUROC 96.7,
#: ``attn`` 92.7) and lets no inverted input in when invert is unknown; ``mlp-in:1``, served before at the same
#: cost, let 42 % in (edge.route.tapsets lists them)
VIT_TAPS = "attn-in:1"
GOALS = {
    "hdc_vs_best_auroc_pts": -1.0,
    "routing_served": 0.95,
    "known_rejected": 0.03,
    "detect_overhead_pct": 5.0,  # at batch 1
    "minilm_overhead_pct": 3.0,  # at batch 1
}
NEAR = ("rotate-mild", "noise-mild", "shift")
FAR = ("rotate", "noise", "blur", "invert")
METHODS = {
    "hdc": {},
    "msp": {},
    "energy": {},
    "mahalanobis": {},
    "knn": {"k": 1},
    "hdc-bipolar": {"encoding": "bipolar"},  # the nonlinear encoding, for comparison
}


def register_near_shifts() -> None:
    """Register ``rotate-mild`` and ``noise-mild`` in :data:`lab.datasets.SHIFTS` (once)."""
    from lab.datasets import SHIFTS, register_shift, warp

    if "rotate-mild" not in SHIFTS:

        @register_shift("rotate-mild")
        def _rotate_mild(x, rng):
            """Rotate by 10-20 degrees either way (bilinear)."""
            n = len(x)
            angle = np.deg2rad(rng.uniform(10.0, 20.0, n)) * rng.choice([-1.0, 1.0], n)
            return warp(x, angle, np.ones(n), np.zeros(n), np.zeros(n))

    if "noise-mild" not in SHIFTS:

        @register_shift("noise-mild")
        def _noise_mild(x, rng):
            """Additive gaussian noise, sigma 0.15."""
            return np.clip(x + rng.normal(0.0, 0.15, x.shape).astype(np.float32), 0.0, 1.0)


def bench_ood(
    model: Path,
    adapters: dict[str, Path],
    domains: dict,
    *,
    taps: str = VIT_TAPS,
    batch: int = 16,
    backend: str = "onnxruntime",
    threads: int | None = None,
    runs: int = 600,
    seed: int = 0,
) -> dict:
    from edge.route.ood import make_detector
    from edge.route.taps import Head, tap_model
    from edge.runtime import Runtime

    if backend != "onnxruntime":
        raise ConfigError(
            f"feature taps edit ONNX graphs; backend {backend!r} is not supported here, use --backend onnxruntime"
        )
    head = Head(domains=len(adapters) + 1 + HEAD_SPARE, classes=int(domains["clean"].y_train.max()) + 1)
    tag = taps.replace(":", "-")
    tapped = tap_model(model, model.with_name(f"{model.stem}.tapped-{tag}-head.onnx"), taps, head=head)
    rt = Runtime(tapped.path, backend=backend, threads=threads)

    def feats(x):
        o = rt.run({"pixels": x})
        return o[tapped.features], o["logits"], o["features"]

    clean = domains["clean"]
    f_tr, l_tr, g_tr = feats(clean.x_train)
    f_id, l_id, g_id = feats(clean.x_test)
    shifted = {s: feats(domains[s].x_test) for s in (*NEAR, *FAR)}
    methods, final = {}, {}
    per_shift: dict[str, dict] = {s: {} for s in shifted}
    for name, opts in METHODS.items():
        kind = name.split("-")[0]
        for table, (tr, te, col) in (("taps", (f_tr, f_id, 0)), ("final", (g_tr, g_id, 2))):
            det = make_detector(kind, **opts).fit(tr, l_tr, clean.y_train)
            sid = det.score(te, l_id)
            rows = {s: _metrics(sid, det.score(v[col], v[1])) for s, v in shifted.items()}
            summary = _summary(rows)
            if table == "taps":
                methods[name] = summary
                for s, m in rows.items():
                    per_shift[s][name] = m
            else:
                final[name] = summary

    plain_routing = _routing(rt, tapped, adapters, domains, batch, seed, refine_epochs=0)  # for comparison
    routing = _routing(rt, tapped, adapters, domains, batch, seed)
    routing["routing_served_unrefined"] = plain_routing["routing_served"]
    routing["routing_argmax_unrefined"] = plain_routing["routing_argmax"]
    overhead = detection_overhead(model, rt, tapped, domains, batch, backend, threads, runs, routing.pop("_router"))
    routing["novel_accepted"] = _novel_accepted(rt, tapped, adapters, domains, seed)
    rt.close()
    best = max(v["auroc"] for k, v in methods.items() if k not in ("hdc", "hdc-bipolar"))
    gap = 100.0 * (methods["hdc"]["auroc"] - best)
    return {
        "model": str(model.name),
        "taps": {"set": taps, "tensors": list(tapped.tensors), "width": tapped.width},
        "methods": methods,
        "per_shift": per_shift,
        "near": list(NEAR),
        "far": list(FAR),
        "methods_final_features": final,
        **routing,
        **overhead,
        "goals": {
            "hdc_vs_best_auroc_pts": gap,
            "targets": GOALS,
            "met": {
                "auroc": gap >= GOALS["hdc_vs_best_auroc_pts"],
                "routing": routing["routing_served"] >= GOALS["routing_served"],
                "rejected": routing["known_rejected"] <= GOALS["known_rejected"],
                "overhead": overhead["detect_overhead_pct"] <= GOALS["detect_overhead_pct"],
            },
        },
    }


def _metrics(id_scores, ood_scores) -> dict:
    from edge.route.ood import auroc, fpr_at_tpr

    return {
        "auroc": auroc(id_scores, ood_scores),
        "fpr95": fpr_at_tpr(id_scores, ood_scores),
        "fpr98": fpr_at_tpr(id_scores, ood_scores, 0.98),  # at the router's serving TPR
    }


def _summary(rows: dict) -> dict:
    out = {k: float(np.mean([m[k] for m in rows.values()])) for k in ("auroc", "fpr95", "fpr98")}
    out["auroc_near"] = float(np.mean([rows[s]["auroc"] for s in NEAR]))
    out["auroc_far"] = float(np.mean([rows[s]["auroc"] for s in FAR]))
    return out


def _routing(rt, tapped, adapters, domains, batch, seed, refine_epochs=10) -> dict:
    from edge.route.router import Reconfigurator, RouterConfig

    for name, path in adapters.items():
        if name not in rt.adapters:
            rt.load_adapter(path, name=name)
    known = ["clean", *adapters]
    router = Reconfigurator(rt, tapped, RouterConfig(learn=False, seed=seed, refine_epochs=refine_epochs))
    for name in known:
        router.add_domain(name, None if name == "clean" else name, domains[name].x_train, domains[name].y_train)
    router.fit()
    # per input, under every state: the argmax domain of det.assess, and the vote the runtime serves (the graph
    # head, the threshold applied: a known input voted -1 = OOD counts as wrong)
    per_state = {k: {} for k in ("served", "rejected", "argmax")}
    for state in known:
        router.switch_to(state)  # the state's adapter, and its detector written into the head
        rt.wait_settled()
        det = router.detector(state)
        for table in per_state.values():
            table[state] = {}
        for i, name in enumerate(known):
            f, votes = _features_and_votes(rt, tapped, domains[name].x_test)
            per_state["argmax"][state][name] = float((det.assess(f)[1] == i).mean())
            per_state["served"][state][name] = float((votes == i).mean())
            per_state["rejected"][state][name] = float((votes < 0).mean())
    means = {k: float(np.mean([a for row in t.values() for a in row.values()])) for k, t in per_state.items()}
    # the serving threshold's false positive rate: unknown (near) shifts of the clean inputs accepted as known
    router.switch_to("clean")
    rt.wait_settled()
    accepted = {s: float((_features_and_votes(rt, tapped, domains[s].x_test)[1] >= 0).mean()) for s in NEAR}

    rng = np.random.default_rng(seed)
    router.switch_to("clean")
    served, truth = [], []
    for name in [*known[1:], "clean"]:
        x = domains[name].x_test
        for s in range(0, len(x), batch):
            step = router.process(x[s : s + batch])
            served += [step.served_by] * len(step.logits)
            truth += [name] * len(step.logits)
    stream_acc = float(np.mean(np.array(served) == np.array(truth)))

    mixed = {}
    for share in (0.5, 0.8):
        a, b = domains["rotate"].x_test, domains["noise"].x_test
        pick = rng.random(len(a)) < share
        x = np.where(pick[:, None, None, None], a, b)
        before = router.stats["switches"]
        for s in range(0, len(x), batch):
            router.process(x[s : s + batch])
        mixed[f"rotate{int(share * 100)}/noise{100 - int(share * 100)}"] = {
            "inputs": len(x),
            "switches": router.stats["switches"] - before,
            "ends_on": router.active,
        }
    return {
        "routing_served": means["served"],
        "known_rejected": means["rejected"],
        "routing_argmax": means["argmax"],
        "routing_per_state": per_state,
        "serving_tpr": router.config.tpr,
        "unknown_accepted": accepted,  # per near shift, under the clean state: the FPR at the serving threshold
        "stream_routing_acc": stream_acc,
        "mixed": mixed,
        "_router": router,
    }


def _novel_accepted(rt, tapped, adapters, domains, seed) -> dict[str, float]:
    """Per adapted domain left out of the router (no adapter known for it): the share of its test inputs voted
    into a known domain, mean over the router's states (``rt`` holds every adapter already)."""
    from edge.route.router import Reconfigurator, RouterConfig

    out = {}
    for left in adapters:
        known = [k for k in adapters if k != left]
        router = Reconfigurator(rt, tapped, RouterConfig(learn=False, seed=seed))
        for name in ["clean", *known]:
            router.add_domain(name, None if name == "clean" else name, domains[name].x_train, domains[name].y_train)
        router.fit()
        accepted = []
        for state in ["clean", *known]:
            router.switch_to(state)
            rt.wait_settled()
            accepted.append(float((_features_and_votes(rt, tapped, domains[left].x_test)[1] >= 0).mean()))
        out[left] = float(np.mean(accepted))
    return out


def _features_and_votes(rt, tapped, x: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Tapped features and the graph head's votes (domain index, -1 = OOD) of ``x`` under the current state."""
    from edge.route.taps import VOTE

    outs = [rt.run({rt.info.inputs[0]: x[s : s + batch]}) for s in range(0, len(x), batch)]
    return np.concatenate([o[tapped.features] for o in outs]), np.concatenate([o[VOTE] for o in outs])


def add_arguments(sp) -> None:
    sp.add_argument(
        "--taps",
        default=None,
        help="tap set (edge.route.tapsets: attn, attn-in, mlp-in, blocks, all, stages, residual, declared, auto, "
        "first; "
        f"NAME:K for its first K taps; default {VIT_TAPS} on the ViT, {CNN_TAPS} on the CNN)",
    )
    sp.add_argument("--model", default="vit", choices=["vit", "cnn"], help="demo encoder family (default vit)")
    sp.add_argument("--batch", type=int, default=16, help="stream batch size for routing and overhead (default 16)")
    sp.add_argument("--runs", type=int, default=600, help="timed runs per contestant")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument(
        "--minilm", action="store_true", help="also time the same detection on MiniLM (exported on first use)"
    )


def cli(args) -> int:
    import json

    from edge.commands import host_needed
    from edge.format.io import write_json
    from edge.machine import machine
    from edge.route.tapsets import tap_set
    from lab.benchmarks import write_section
    from lab.datasets import load_domains

    host_needed("edge bench ood (builds or reuses the demo's model and adapters)")
    from lab.pipeline import DemoConfig, prepare_demo

    register_near_shifts()
    cfg = DemoConfig(model=args.model)
    taps = args.taps or (VIT_TAPS if args.model == "vit" else CNN_TAPS)
    tap_set(taps)  # an unknown set or a bad count fails here, before the demo's artifacts are built
    art = prepare_demo(args.cache, cfg, progress=not args.quiet)
    domains = load_domains(tuple(dict.fromkeys((*cfg.domains, *NEAR, *FAR))), seed=cfg.seed)  # the adapters' split
    r = bench_ood(
        art.model,
        art.adapters,
        domains,
        taps=taps,
        batch=args.batch,
        backend=args.backend,
        threads=args.threads,
        runs=args.runs,
        seed=args.seed,
    )
    if args.minilm:
        from lab.bench_switch import bench_model

        path, feeds = bench_model("minilm", args.cache, args.quiet)
        # 30 paired rounds of 20 calls at batch 1: its goal is a 3 % line, finer than 10 rounds resolve (the IQR)
        r["minilm"] = encoder_overhead(path, feeds, threads=args.threads, runs=600, rounds=30)
        r["goals"]["met"]["minilm_overhead"] = r["minilm"]["overhead_pct"] <= GOALS["minilm_overhead_pct"]
    r["machine"] = machine()
    print(json.dumps(r, indent=1))
    if args.json:
        write_json(args.json, r)
    if args.md:
        key = f"ood:{taps}" if args.model == "vit" else f"ood:{args.model}:{taps}"
        title = f"OOD detection and routing ({args.model}, {taps} taps)"
        write_section(args.md, key, title, markdown(r))
    return 0
