"""What ``edge demo --stream`` reports: routing as served (:class:`Votes`) and the tables (:func:`format_stream`)."""

from __future__ import annotations

import numpy as np

__all__ = ["Votes", "format_row", "format_stream"]


class Votes:
    """Routing as served, per input of a known domain: the vote (the threshold applied) names it, or says OOD.

    ``routing_served`` is the share of the inputs whose domain the router knew when they were
    scored that were voted to that domain (voted OOD counts as wrong), ``known_rejected`` the
    share voted OOD; ``known_inputs`` how many there were (the rest came before the domain was
    known, e.g. a novel segment before its adaptor grew; a grown domain counts under the name it
    was registered with). None when there were none.
    """

    def __init__(self) -> None:
        self.known = self.right = self.rejected = 0

    def add(self, step, domain: str) -> None:
        if domain in step.names:
            self.known += len(step.codes)
            self.right += int((step.codes == step.names.index(domain)).sum())
            self.rejected += int((step.codes < 0).sum())

    def as_dict(self) -> dict:
        n = self.known
        return {
            "known_inputs": n,
            "routing_served": self.right / n if n else None,
            "known_rejected": self.rejected / n if n else None,
        }

    @staticmethod
    def pooled(rows: list[dict]) -> dict:
        """The same figures over several rows of :meth:`as_dict`."""
        v = Votes()
        for r in rows:
            if r["known_inputs"]:
                v.known += r["known_inputs"]
                v.right += round(r["routing_served"] * r["known_inputs"])
                v.rejected += round(r["known_rejected"] * r["known_inputs"])
        return v.as_dict()


def format_stream(r: dict) -> str:
    """The timeline and the accuracy tables, for the terminal."""
    stream = " -> ".join(s["domain"] for s in r["segments"])
    lines = [f"model {r.get('model', '?')}; stream: {stream}", "", "timeline (input index: event):"]
    for e in r["timeline"]:
        lines.append(f"  {e['at']:>5}  [{e['truth']:<7}] {e['event']}")
    for g in r["growth"]:
        c = g["chosen"]
        fits = sum(x["fits"] for x in g["candidates"])
        lines.append(
            f"  grew {g['name']} for {g['truth']!r}: {c['arch']} ({c['nnz']} entries, {c['memory_mb']:.3f} MB, "
            f"proxy {c['proxy']}), {fits}/{len(g['candidates'])} candidates within budget, trained in {g['train_s']} s"
        )
        if g["background"]:
            waited = g.get("waited_after_stream_s")
            lines.append(
                f"    in the background: started at input {g['started_at']}, {g['wall_s']} s wall, "
                f"{g['batches_while_growing']} batches served meanwhile (router refit {g['refit_s']} s on a shadow "
                f"runtime); the stream paused {g['stall_ms']} ms in all"
                + (f"; the stream ended first and waited {waited} s for it" if waited else "")
            )
        else:
            lines.append(f"    the stream paused {g['stall_ms']} ms (training and registering)")
    for k, v in r["batch_ms"].items():
        lines.append(
            f"  batch latency {k}: p50 {v['p50']:.2f} ms, p95 {v['p95']:.2f} ms, max {v['max']:.2f} ms "
            f"({v['batches']} batches)"
        )
    head = f"{'inputs':>6} {'edge':>7} {'base':>7} {'oracle':>7} {'routed':>7} {'reject':>7}"
    lines += ["", f"{'segment':<10} {head} {'OOD':>6}  served by"]
    for s in r["segments"]:
        served = ", ".join(f"{k} {v:.0%}" for k, v in sorted(s["served_by"].items(), key=lambda kv: -kv[1]))
        lines.append(f"{s['domain']:<10} {format_row(s)} {s['ood_share']:>6.1%}  {served}")
    lines.append(f"{'overall':<10} {format_row({'inputs': '', **r['overall']})}")
    lines += [
        "",
        "all seen domains afterwards (held-out test inputs, unlabelled; routed: the share of a known domain's inputs "
        "voted to it, the OOD threshold applied; reject: voted OOD):",
    ]
    lines.append(f"{'domain':<10} {head}  routed to")
    for f in r["final"]:
        lines.append(f"{f['domain']:<10} {format_row(f)}  {f['served_mostly_by']} ({f['served_share']:.0%})")
    mean = {k: np.mean([f[k] for f in r["final"]]) for k in ("acc", "base_acc", "oracle_acc")}
    lines.append(f"{'mean':<10} {format_row({'inputs': '', **mean, **r['final_routing']})}")
    lines += [
        "",
        f"{r['switches']} switches; the router's wall time next to inference: window policy and growth buffer "
        f"{r['detect_pct']:.1f} %, prototype updates {r['learn_pct']:.1f} %, switches and head writes "
        f"{r['write_pct']:.1f} % (load average {r['load_avg']}). A switch or head write makes the runtime rebuild "
        "its session in the background, and onnxruntime holds the GIL for parts of a build, so these include "
        f"waits of a few ms; the stream is short ({sum(s['inputs'] for s in r['segments']):,} inputs) for its "
        f"{r['switches']} switches.",
    ]
    return "\n".join(lines)


def format_row(r: dict) -> str:
    """Inputs, accuracies and the routing-as-served figures of one table row ("-" when not known)."""
    cells = [f"{r['inputs']:>6}", *(f"{r[k]:>7.1%}" for k in ("acc", "base_acc", "oracle_acc"))]
    cells += [f"{'-':>7}" if r.get(k) is None else f"{r[k]:>7.1%}" for k in ("routing_served", "known_rejected")]
    return " ".join(cells)
