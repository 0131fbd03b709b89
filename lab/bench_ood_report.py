"""The markdown section of ``edge bench ood`` (:mod:`lab.bench_ood`): detectors, routing as served, detection cost."""

from __future__ import annotations

__all__ = ["markdown"]


def markdown(r: dict) -> str:
    names = list(r["methods"])
    lines = [
        f"Features: {r['taps']['width']}-wide, {len(r['taps']['tensors'])} tapped "
        f"tensor{'s' if len(r['taps']['tensors']) > 1 else ''} pooled "
        f"({r['taps']['set']}); ID = clean digits (test split), OOD = each shift of the same images; "
        f"near = {', '.join(r['near'])}; far = {', '.join(r['far'])}. AUROC with ID positive; FPR at 95 % "
        "and 98 % TPR (98 %: the router's serving TPR).",
        "",
        "| method | mean AUROC | near | far | mean FPR95 | mean FPR98 | AUROC, final features only |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        m, f = r["methods"][n], r["methods_final_features"][n]
        lines.append(
            f"| {n} | {100 * m['auroc']:.1f} | {100 * m['auroc_near']:.1f} | {100 * m['auroc_far']:.1f} | "
            f"{m['fpr95']:.3f} | {m['fpr98']:.3f} | {100 * f['auroc']:.1f} |"
        )
    lines += [
        "",
        "AUROC (FPR95) per shift:",
        "",
        "| shift | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for s, row in r["per_shift"].items():
        tag = " (near)" if s in r["near"] else ""
        cells = " | ".join(f"{100 * row[n]['auroc']:.1f} ({row[n]['fpr95']:.2f})" for n in names)
        lines.append(f"| {s}{tag} | {cells} |")
    o = r["overhead"]
    lines += [
        "",
        f"Routing (5 known domains, per-state HDC, each input voting for the domain of its most similar class "
        f"prototype, or OOD below the threshold), per input over every state and known domain, with the retrained "
        f"prototypes: as served (the graph head's vote; a known input voted OOD counts as wrong) "
        f"**{100 * r['routing_served']:.1f} %**, known inputs rejected as OOD **{100 * r['known_rejected']:.1f} %**, "
        f"argmax domain with the threshold ignored {100 * r['routing_argmax']:.1f} % (plain bundles: served "
        f"{100 * r['routing_served_unrefined']:.1f} %, argmax {100 * r['routing_argmax_unrefined']:.1f} %); "
        f"the serving threshold keeps {100 * r['serving_tpr']:.0f} % of cross-fitted held-out known inputs and "
        "accepts, of the unknown near shifts under the clean state, "
        + ", ".join(f"{s} {100 * v:.1f} %" for s, v in r["unknown_accepted"].items())
        + (
            "; each adapted domain left out of the router (no adapter for it, as a novel stream meets it), "
            "its inputs voted into a known domain (mean over the states): "
            + ", ".join(f"{s} {100 * v:.1f} %" for s, v in r["novel_accepted"].items())
            if "novel_accepted" in r
            else ""
        )
        + f"; window policy on a domain-by-domain stream {100 * r['stream_routing_acc']:.1f} % (each transition "
        "costs about one window); switches on mixed streams: "
        + ", ".join(f"{k}: {v['switches']} in {v['inputs']} inputs" for k, v in r["mixed"].items())
        + ".",
        "",
        f"Detection cost per input (router scoring: {r['scoring']}). *Graph*: taps and the HDC head in the "
        "model, each input's vote (domain or OOD) an output of the run (the router's path, the goal's figure). "
        "*Numpy*: the same detector scored in numpy after a taps-only run. Bipolar: the nonlinear encoding "
        "(a `d x 4096` projection per input). Every run fetches what a served stream does "
        "(`Runtime.run(feeds, outputs)`): the plain run its logits, the graph-scored run the logits and the vote "
        f"({', '.join(f'`{n}`' for n in r.get('fetched', ['logits', 'edge.vote']))}), the taps-only runs the logits "
        "and the features.",
        "",
        "Batch 1 (a sensor stream on a device) is the headline. Overheads are medians over "
        f"{o.get('batch1', {}).get('rounds', 40)} rounds of "
        "per-round ratios (each round times every contestant in a block, in random order); the pooled p50 "
        "and p10 of all runs are shown for comparison. A tap on a "
        "tensor that onnxruntime would otherwise fuse away (e.g. the Add before the last LayerNormalization, "
        "fused into SkipLayerNormalization) keeps that fusion out of the tapped model, which can make it faster "
        "or slower than the plain one: with `all` taps on the digits encoder it runs about 5 % faster, so that "
        "row understates the detector's cost; the `attn`, `attn-in` and `mlp-in` taps leave the optimised graph "
        "unchanged. "
        "At batch 1 the cost is onnxruntime's per node (0.4-1 us each, whatever the node computes) and reading "
        "the head's matrices: two taps and the head add seven nodes, one tap six and half the matrices "
        "(`edge.route.taps` and `edge.route.tapsets` list what else was measured).",
        "",
        "| batch | plain run ms | graph-scored run ms | overhead | pooled p50 | pooled p10 | of which taps "
        "| numpy scoring instead | bipolar instead |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if "threads" in r:
        held = r["threads"]
        why = "all cores" if held is None else str(held)
        why += ", as a model this small runs by default" if held == 1 else ""
        lines[-4] += f" Rows without a thread count ran on the runtime's default threads: {why}."
    for b, v in o.items():
        label = b[5:].replace("-threads", ", ORT threads ")
        lines.append(
            f"| {label} | {v['plain_ms']:.3f} | {v['graph_ms']:.3f} | **{v['overhead_pct']:+.1f} %** | "
            f"{v['overhead_pct_pooled_p50']:+.1f} % | {v['overhead_pct_p10']:+.1f} % | {v['taps_pct']:+.1f} % | "
            f"{v['numpy_overhead_pct']:+.1f} % | {v['bipolar_overhead_pct']:+.1f} % |"
        )
    if "minilm" in r:
        mm = r["minilm"]
        lines += [
            "",
            f"The same detection on the pretrained MiniLM encoder ({len(mm['taps'])} taps, {mm['width']}-wide "
            f"features, 128 tokens; medians over {mm['rounds']} rounds of per-round ratios): "
            + "; ".join(
                f"batch {b[5:]}: plain {v['plain_ms']:.1f} ms, with taps and head {v['headed_ms']:.1f} ms, overhead "
                + (f"**{v['overhead_pct']:+.2f} %**" if b == f"batch{mm['batch']}" else f"{v['overhead_pct']:+.2f} %")
                + (f" (taps {v['taps_pct']:+.2f} %, head over taps {v['head_pct']:+.2f} %)" if "head_pct" in v else "")
                for b, v in mm["per_batch"].items()
            )
            + ". A negative taps figure means the tapped encoder ran faster than the plain one: tapping a "
            "residual sum keeps onnxruntime from fusing it into SkipLayerNormalization (6 of MiniLM's 12), so "
            "the overhead against the plain model understates what the head itself costs.",
        ]
    g = r["goals"]

    def met(goal: str) -> str:
        return "met" if g["met"][goal] else "not met"

    lines += [
        "",
        f"Load average during the run: {r['load_avg']}. Goals: HDC AUROC {g['hdc_vs_best_auroc_pts']:+.1f} points vs "
        f"the best baseline (goal >= -1): **{met('auroc')}**; routing as served "
        f"{100 * r['routing_served']:.1f} % (goal >= 95 %): **{met('routing')}**; known inputs rejected "
        f"{100 * r['known_rejected']:.1f} % (goal <= 3 %): **{met('rejected')}**; detection overhead "
        f"{r['detect_overhead_pct']:.1f} % at batch 1 (goal <= 5 %): **{met('overhead')}**"
        + (
            " (interquartile range over the paired rounds {:.1f} to {:.1f} %)".format(*o["batch1"]["overhead_pct_iqr"])
            if "overhead_pct_iqr" in o.get("batch1", {})
            else ""
        )
        + (
            f" (with one onnxruntime thread: {o['batch1-threads1']['overhead_pct']:.1f} %)"
            if "batch1-threads1" in o
            else ""
        )
        + f"; at batch {r['batch']} {o['batch' + str(r['batch'])]['overhead_pct']:.1f} %"
        + (
            f"; on MiniLM {r['minilm']['overhead_pct']:.1f} % at batch 1 (goal <= 3 %): **{met('minilm_overhead')}**"
            + (
                " (interquartile range {:.1f} to {:.1f} %)".format(
                    *r["minilm"]["per_batch"]["batch1"]["overhead_pct_iqr"]
                )
                if "overhead_pct_iqr" in r["minilm"]["per_batch"].get("batch1", {})
                else ""
            )
            if "minilm" in r
            else ""
        )
        + ".",
        "",
    ]
    return "\n".join(lines)
