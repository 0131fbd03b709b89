"""Detection overhead (``edge bench ood``): a plain run against the router's detection path, paired within rounds.

``detection_overhead`` times, on the demo encoder, the plain run, the taps-only run, the
run with the detector head in the graph (the router's path: :mod:`edge.route.taps`), and
for comparison the same detector scored in numpy after a taps-only run and the bipolar
encoding, at batch 1 (the headline: a sensor stream) and at the stream batch, with the
session's default intra-op threads and with one. ``encoder_overhead`` does the plain vs
headed comparison on any exported encoder (MiniLM). Every overhead is paired: the median
over rounds of the per-round ratio of block medians (:func:`paired_pct`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.machine import load_average

__all__ = ["ROUNDS", "detection_overhead", "encoder_overhead", "paired_pct", "time_rounds"]

#: paired rounds of the digits encoder's detection overhead (each round times every contestant in a block)
ROUNDS = 40


def detection_overhead(model, rt, tapped, domains, batch, backend, threads, runs, router) -> dict:
    """Plain run vs the router's detection path (and the numpy and bipolar variants), in interleaved blocks.

    Measured with the session's default threads and again with one intra-op thread (on
    small models and few cores one thread is often as fast, and leaves a core to numpy), unless the default
    already is one thread (a model under ``runtimes.base.SMALL_MODEL_BYTES``).
    """
    from edge.route.ood import HDC
    from edge.route.taps import tap_model
    from edge.runtime import Runtime

    router.switch_to("clean")  # writes the clean state's detector into the head
    rt.wait_settled()  # the steady state: head and weights prepacked
    det = router.detector("clean")
    bip = HDC(encoding="bipolar")
    o = rt.run({"pixels": domains["clean"].x_train})
    bip.fit(o[tapped.features], o["logits"], domains["clean"].y_train)
    taps_only = tap_model(
        model, model.with_name(f"{model.stem}.tapped-{','.join(tapped.tensors)}.onnx"), tapped.tensors
    )
    result = {}
    held = rt.backend.threads  # what the default resolved to (None: all cores)
    for th in [threads] + ([] if held == 1 else [1]):
        plain = Runtime(model, backend=backend, threads=th)
        bare = Runtime(taps_only.path, backend=backend, threads=th)
        if th == threads:
            headed = rt
        else:
            headed = Runtime(tapped.path, backend=backend, threads=th)
            headed.set_head(det.head_values(tapped.head))
            headed.wait_settled()
        for b in sorted({1, batch}):
            key = f"batch{b}" + ("" if th == threads else f"-threads{th}")
            x = domains["clean"].x_test[:b]
            result[key] = _time_pipelines(plain, bare, headed, det, bip, x, runs, router.fetches)
        for r in (plain, bare, headed):
            if r is not rt:
                r.close()
    return {
        "batch": batch,
        "scoring": router.scoring,
        "fetched": list(router.fetches),  # what the graph-scored runs fetch (the router's serving path)
        "threads": held,
        "detect_overhead_pct": result["batch1"]["overhead_pct"],  # the headline: a sensor stream runs at batch 1
        f"detect_overhead_pct_batch{batch}": result[f"batch{batch}"]["overhead_pct"],
        "numpy_overhead_pct": result["batch1"]["numpy_overhead_pct"],
        "overhead": result,
        "load_avg": load_average(),
    }


def _time_pipelines(plain, bare, headed, det, bip, x, runs, fetches) -> dict:
    """Each contestant fetches what a served stream does: the plain run its logits, the router's path
    ``fetches`` (:attr:`Reconfigurator.fetches`: the logits and the vote), the taps-only runs the logits
    and the features."""
    from edge.machine import p50
    from edge.route.taps import FEATURES, VOTE

    x = {"pixels": np.ascontiguousarray(x)}
    threshold = det.threshold
    logits, tapped = ["logits"], ["logits", FEATURES]

    def graph():  # the router's path: each input's vote (domain, or -1 = OOD) comes out of the run
        return headed.run(x, fetches)[VOTE]

    def numpy_scored():  # the same detector scored in numpy after a taps-only run
        score, dom = det.route(bare.run(x, tapped)[FEATURES])
        return np.where(score < threshold, -1, dom)

    def bipolar():
        return bip.score(bare.run(x, tapped)[FEATURES]) < 0

    contestants = {
        "plain": lambda: plain.run(x, logits),
        "tapped": lambda: bare.run(x, tapped),
        "graph": graph,
        "numpy": numpy_scored,
        "bipolar": bipolar,
    }
    t, per_round = time_rounds(contestants, runs, rounds=ROUNDS)
    m = {k: p50(v) for k, v in t.items()}
    q = {k: float(np.percentile(v, 10)) for k, v in t.items()}  # the least disturbed runs: a quiet-machine view

    def paired(k: str) -> float:
        return paired_pct(per_round, k)

    return {
        "plain_ms": m["plain"],
        "tapped_ms": m["tapped"],
        "graph_ms": m["graph"],
        "numpy_ms": m["numpy"],
        "overhead_pct": paired("graph"),
        "overhead_pct_iqr": paired_iqr(per_round, "graph"),
        "rounds": ROUNDS,
        "overhead_pct_pooled_p50": 100.0 * (m["graph"] / m["plain"] - 1.0),
        "overhead_pct_p10": 100.0 * (q["graph"] / q["plain"] - 1.0),
        "taps_pct": paired("tapped"),
        "numpy_overhead_pct": paired("numpy"),
        "bipolar_overhead_pct": paired("bipolar"),
    }


def time_rounds(contestants: dict, runs: int, rounds: int) -> tuple[dict, dict]:
    """Every run's time (ms) and every round's block median, per contestant.

    Each round runs every contestant in a block of ``runs // rounds`` calls (one session
    busy at a time), in random order.
    """
    from edge.machine import p50, time_calls

    t = {k: [] for k in contestants}
    per_round = {k: [] for k in contestants}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for k in rng.permutation(list(contestants)):
            block = time_calls(contestants[k], max(1, runs // rounds))
            t[k] += block
            per_round[k].append(p50(block))
    return t, per_round


def paired_iqr(per_round: dict, k: str, ref: str = "plain") -> list[float]:
    """The 25th and 75th percentiles over rounds of ``k``'s paired ratio to ``ref`` (as :func:`paired_pct`), in %:
    how far the headline could move between runs on this load."""
    r = np.array(per_round[k]) / np.array(per_round[ref])
    return [100.0 * (float(np.percentile(r, q)) - 1.0) for q in (25, 75)]


def paired_pct(per_round: dict, k: str, ref: str = "plain") -> float:
    """Median over rounds of ``k``'s block median over ``ref``'s in the same round, minus one, in %.

    Two-thread onnxruntime runs on this VM switch between a fast and a slow mode (0.64 vs
    ~0.95 ms at batch 16) for seconds at a time; ratios within a round see the same mode,
    so this is the headline figure.
    """
    return 100.0 * (float(np.median(np.array(per_round[k]) / np.array(per_round[ref]))) - 1.0)


def encoder_overhead(
    model: Path,
    feeds: dict,
    *,
    taps: str = "attn",
    batches: tuple[int, ...] = (1, 16),
    threads: int | None = None,
    runs: int = 200,
    rounds: int = 10,
) -> dict:
    """Plain run vs the same model tapped with a detector head, on any exported encoder, per batch size.

    ``feeds`` holds one or more inputs; they are repeated to each batch size. The head is
    written with random values: its cost does not depend on them. For the real pretrained
    encoder (MiniLM) this says what detection costs next to an encoder of deployable size,
    where the digits encoder is the worst case (69 k parameters). Overheads are paired
    within rounds (:func:`paired_pct`); ``overhead_pct`` is batch 1's.
    """
    from edge.machine import p50
    from edge.route.taps import FEATURES, VOTE, Head, tap_model
    from edge.runtime import Runtime

    tapped = tap_model(model, model.with_name(f"{model.stem}.tapped-{taps}-head.onnx"), taps, head=Head(domains=6))
    bare = tap_model(model, model.with_name(f"{model.stem}.tapped-{taps}.onnx"), taps)
    runtimes = {
        k: Runtime(p, threads=threads) for k, p in (("plain", model), ("tapped", bare.path), ("headed", tapped.path))
    }
    headed = runtimes["headed"]
    own = list(runtimes["plain"].info.outputs or runtimes["plain"].backend.output_names)  # the encoder's outputs
    fetch = {"plain": own, "tapped": [*own, FEATURES], "headed": [*own, VOTE]}  # what a served stream fetches
    rng = np.random.default_rng(0)
    headed.set_head({n: rng.standard_normal(headed.info.tensors[n].shape).astype(np.float32) for n in headed.heads})
    headed.wait_settled()
    per_batch = {}
    for b in batches:
        fb = {k: np.ascontiguousarray(np.resize(v, (b, *v.shape[1:]))) for k, v in feeds.items()}
        contestants = {k: (lambda r=r, fb=fb, o=fetch[k]: r.run(fb, o)) for k, r in runtimes.items()}
        t, per_round = time_rounds(contestants, max(rounds, runs // b), rounds)
        per_batch[f"batch{b}"] = {
            "plain_ms": p50(t["plain"]),
            "headed_ms": p50(t["headed"]),
            "overhead_pct": paired_pct(per_round, "headed"),
            "overhead_pct_iqr": paired_iqr(per_round, "headed"),
            "overhead_pct_pooled_p50": 100.0 * (p50(t["headed"]) / p50(t["plain"]) - 1.0),
            # the head alone, over the taps-only model: tapping can change what onnxruntime fuses in the
            # encoder itself (on MiniLM the attn taps keep 6 of 12 SkipLayerNormalization fusions out)
            "taps_pct": paired_pct(per_round, "tapped"),
            "head_pct": paired_pct(per_round, "headed", ref="tapped"),
        }
    for r in runtimes.values():
        r.close()
    head = per_batch[f"batch{batches[0]}"]
    return {
        "model": model.name,
        "fetched": {"plain": fetch["plain"], "headed": fetch["headed"]},
        "taps": list(tapped.tensors),
        "width": tapped.width,
        "batch": batches[0],
        **{k: head[k] for k in ("plain_ms", "headed_ms", "overhead_pct")},
        "per_batch": per_batch,
        "rounds": rounds,
    }
