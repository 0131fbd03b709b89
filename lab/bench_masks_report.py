"""The report of ``edge bench masks``: best kinds, goals per structured unit, and the markdown section."""

from __future__ import annotations

import numpy as np

__all__ = ["GOALS", "SAME_POSITIONS", "goals", "markdown", "summary"]

#: issue 16, with a structured mask at 1 %: switch >= 20x LoRA fusion, p99 < 3x p50, accuracy within 1 point
GOALS = {"switch_vs_lora_x": 20.0, "p99_over_p50": 3.0, "acc_gap_points": 1.0}


def summary(per_kind: dict) -> dict:
    """Best kinds by mean accuracy, and each structured kind's gap to the best unstructured one (points)."""
    acc = {k: v["mean_acc"] for k, v in per_kind.items()}
    flat = {k: a for k, a in acc.items() if not per_kind[k]["structured"]}
    struct = {k: a for k, a in acc.items() if per_kind[k]["structured"]}
    out = {"best": max(acc, key=acc.get)}
    if flat:
        out["best_unstructured"] = max(flat, key=flat.get)
    if struct:
        out["best_structured"] = max(struct, key=struct.get)
    if flat and struct:
        best = flat[out["best_unstructured"]]
        out["gap_points"] = {k: 100 * (best - a) for k, a in struct.items()}
        out["structured_gap_points"] = out["gap_points"][out["best_structured"]]
        out["structured_within_goal"] = out["structured_gap_points"] <= GOALS["acc_gap_points"]
        ref = per_kind[out["best_unstructured"]].get("seed_acc") or {}
        paired = {k: _paired_gaps(ref, per_kind[k].get("seed_acc") or {}) for k in struct}
        out["seed_gap_points"] = {k: g for k, g in paired.items() if g}
    return out


def _paired_gaps(ref: dict, seed_acc: dict) -> dict:
    """Gap in points to the best unstructured kind per training seed (the same seed's shuffles on both sides)."""
    return {s: 100 * (ref[s] - a) for s, a in seed_acc.items() if s in ref}


def goals(result: dict) -> dict:
    """Per structured unit: its best kind's accuracy gap (digits), and that same kind's switch on MiniLM.

    Speed and tail are judged on the kind whose accuracy is judged where MiniLM timed it (wm kinds: A and B
    on the one mask of the model); a kind not timed there (snip, grad: masks scored on each domain's data) is
    judged on the unit's random kind, named in ``timed_kind``, and its ``met`` stays ``None``. The unit's
    random kind (A and B on different positions) is recorded beside it. ``met``: accuracy, speed and tail all
    met on the same kind.
    """
    gaps = result["summary"].get("gap_points", {})
    timed = (result.get("minilm") or {}).get("kinds", {})
    out = {}
    for kind, gap in gaps.items():
        unit = kind.split("-")[0]
        if unit in out and out[unit]["acc_gap_points"] <= gap:
            continue
        row = {"kind": kind, "acc_gap_points": gap, "acc_met": gap <= GOALS["acc_gap_points"]}
        seed_gaps = result["summary"].get("seed_gap_points", {}).get(kind)
        if seed_gaps:
            row["seed_gap_points"] = seed_gaps  # the goal is on the mean; every seed: a stricter check, shown beside
            row["acc_met_every_seed"] = max(seed_gaps.values()) <= GOALS["acc_gap_points"]
        own, rand = timed.get(kind), timed.get(f"{unit}-random")
        t = own or rand
        if t:
            row.update(
                timed_kind=kind if own else f"{unit}-random",
                same_positions=t.get("same_positions"),
                switch_vs_lora_x=t["switch_vs_lora_x"],
                p99_over_p50=t["p99_over_p50"],
                # paired within rounds: met when the median's whole 95 % interval is (an older run: the median)
                speed_met=t.get("vs_lora_ci95", [t["switch_vs_lora_x"]])[0] >= GOALS["switch_vs_lora_x"],
                p99_met=t["p99_over_p50"] < GOALS["p99_over_p50"],
            )
        if t and "vs_lora_ci95" in t:
            row["vs_lora_ci95"] = t["vs_lora_ci95"]
        if rand:
            row.update(random_switch_vs_lora_x=rand["switch_vs_lora_x"], random_p99_over_p50=rand["p99_over_p50"])
        row["met"] = (row["acc_met"] and row["speed_met"] and row["p99_met"]) if own else None
        out[unit] = row
    return out


#: what the goals table's "A, B positions" column means, and why wm masks share theirs (printed under the table)
SAME_POSITIONS = (
    "A, B positions: *same* when A and B write exactly the same entries of every target tensor "
    "(`edge.fusion.same_positions`): the runtime keeps one copy of their base values and one undo, and A -> B "
    "writes B's values over A's in one pass, with no undo first. A wm mask (the largest |w| per unit, scored in "
    "the stored layout) is a function of the base weights alone, so every adapter of one model trained with a wm "
    "kind writes the same entries: the product's default path (its default mask is `wm`). So does a random mask "
    "drawn from the same seed (`make_masks` seeds it by the training seed and the tensor, not the data: the digits "
    "random adapters of one seed). MiniLM's random kinds draw A's and B's masks from different seeds, as adapters "
    "whose masks differ (snip and grad masks are scored on each domain's own gradients): *different* entries, and "
    "A -> B first undoes A's."
)


def _load(avg) -> str:
    return "unknown" if not avg else ", ".join(f"{v:.2f}" for v in avg) + " (1, 5, 15 min)"


def _yes(flag) -> str:
    return "-" if flag is None else ("met" if flag else "**not met**")


def _slow(v: dict) -> str:
    """Where the switches over 3x p50 came from, summed over the kinds' figures ``v``."""
    n = sum(x["n"] for x in v)
    keys = ("slow", "slow_with_gc", "slow_with_page_faults", "slow_preempted", "preempted")
    slow, gc_, pf, pre, preempted = (sum(x[k] for x in v) for k in keys)
    return (
        f"{slow} of {n} switches over 3x p50: {gc_} with a collection, {pf} with page faults, {pre} preempted by "
        f"the OS ({preempted} of all {n} were preempted)"
    )


def _spread(v: dict) -> str:
    """Per-seed mean accuracies as ``min-max`` (``-`` without per-seed figures)."""
    seeds = list((v.get("seed_acc") or {}).values())
    return f"{min(seeds):.3f}-{max(seeds):.3f}" if seeds else "-"


def _seed_gaps(gaps: dict | None) -> str:
    return "-" if not gaps else " / ".join(f"{g:.1f}" for g in gaps.values())


def _default_line(r: dict) -> list[str]:
    """Where the default mask (``make_masks``' and the demo's) stands against the best unstructured kind measured."""
    default, best = r.get("default_mask"), r["summary"].get("best_unstructured")
    if default is None or best is None or default not in r["kinds"]:
        return [] if default is None else ["", f"Default mask `{default}`: not measured in this run."]
    gap = 100 * (r["kinds"][best]["mean_acc"] - r["kinds"][default]["mean_acc"])
    where = (
        "the best unstructured kind" if default == best else (f"{gap:.1f} points below the best unstructured `{best}`")
    )
    return ["", f"Default mask (`exporters.shira.make_masks`, the demo's `DemoConfig.mask`) `{default}`: {where}."]


def _at_epochs(v: dict) -> str:
    """`` @60`` after a kind's rate when it chose its epochs too (--epochs-grid), else nothing."""
    return f" @{v['epochs']}" if "epochs" in v else ""


def _lr_line(r: dict) -> str:
    """How each kind's learning rate was chosen, and each kind's validation accuracy per rate."""
    grid = " / ".join(f"{lr:g}" for lr in r["lr_grid"])
    if "epochs_grid" in r:  # opt-in (--epochs-grid): each kind chose its epochs with its rate
        return (
            f"Learning rate and epochs (column lr): each kind's best pair of {grid} x "
            f"{' / '.join(map(str, r['epochs_grid']))} epochs by mean accuracy over the domains on "
            f"{r['val_fraction']:.0%} of each domain's training data held out (stratified, the same images for every "
            f"kind), trained on the rest with seed {r['seeds'][0]}; the adapters tested here are then trained on all "
            "of the training data at that pair. Validation accuracy per rate@epochs: "
            + "; ".join(
                f"{k} " + " / ".join(f"{p} {a:.3f}" for p, a in v["val_acc"].items()) for k, v in r["kinds"].items()
            )
            + "."
        )
    return (
        f"Learning rate (column lr): each kind's best of {grid} by mean accuracy over the domains on "
        f"{r['val_fraction']:.0%} of each domain's training data held out (stratified, the same images for every "
        f"kind), trained on the rest with seed {r['seeds'][0]}; the adapters tested here are then trained on all of "
        "the training data at that rate. Validation accuracy per rate: "
        + "; ".join(f"{k} " + " / ".join(f"{a:.3f}" for a in v["val_acc"].values()) for k, v in r["kinds"].items())
        + "."
    )


def markdown(result: dict) -> str:
    r = result
    domains = r["domains"]
    s = r["summary"]
    gaps = s.get("gap_points", {})
    lines = [
        f"### {r['model']}: {len(r['kinds'])} mask kinds at density {r['density']:.0%}, "
        f"{r['epochs']} epochs, seeds {r['seeds']}, {r['targets']} target tensors",
        "",
        _lr_line(r),
        "",
        f"Switch {r['switch_pair'][0]} -> {r['switch_pair'][1]}; LoRA fusion of the same trainable count "
        f"(rank {r['lora_rank']}) {r['lora_fuse_ms_p50']:.3f} ms. Default strategy `{r['default_strategy']}`.",
        "",
        "| mask | lr | mean acc | " + " | ".join(domains) + " | gap (points) | seed means | gap per seed | "
        "runs/entry | switch ms p50 | p99 | bound p50 | bound p99 | vs LoRA |",
        "|---|---|---|" + "---|" * len(domains) + "---|---|---|---|---|---|---|---|---|",
        "| (base, no adapter) | - | "
        + f"{np.mean(list(r['base_acc'].values())):.3f} | "
        + " | ".join(f"{r['base_acc'][d]:.3f}" for d in domains)
        + " | - | - | - | - | - | - | - | - | - |",
    ]
    for kind, v in r["kinds"].items():
        bound = v["strategies"]["bound"]
        gap = f"{gaps[kind]:.1f}" if kind in gaps else "-"
        lines.append(
            f"| {kind} | {v['lr']:g}{_at_epochs(v)} | {v['mean_acc']:.3f} | "
            + " | ".join(f"{v['acc'][d]:.3f}" for d in domains)
            + f" | {gap} | {_spread(v)} | {_seed_gaps(s.get('seed_gap_points', {}).get(kind))} | "
            f"{v['runs_per_entry']:.3f} | {v['switch_ms_p50']:.3f} | {v['switch_ms_p99']:.3f} | "
            f"{bound['switch_ms_p50']:.3f} | {bound['switch_ms_p99']:.3f} | {v['switch_vs_lora_x']:.1f}x |"
        )
    lines += ["", f"Best by mean accuracy: `{s['best']}`."]
    if "structured_gap_points" in s:
        lines[-1] += (
            f" Best structured `{s['best_structured']}` is {s['structured_gap_points']:.1f} points below the best "
            f"unstructured `{s['best_unstructured']}` (goal <= {GOALS['acc_gap_points']:.0f}). Seed means: each "
            "training seed's mean over the domains; gap per seed: against the best unstructured kind trained with "
            "the same seed."
        )
    lines += _default_line(r) + _positions_line(r["kinds"], f"{r['switch_pair'][0]} and {r['switch_pair'][1]}")
    for strategy in (r["default_strategy"], "bound"):
        lines += ["", f"`{strategy}`: " + _slow([v["strategies"][strategy] for v in r["kinds"].values()]) + "."]
    m = r.get("minilm")
    if m and "skipped" in m:
        lines += ["", f"MiniLM timing skipped: {m['skipped']}"]
    elif m:
        lines += [
            "",
            f"#### {m['model']}: random and wm-family masks at {m['density']:.0%} ({m['targets']} target tensors), "
            "timing only",
            "",
            f"LoRA fusion (rank {m['lora_rank']}) {m['lora_fuse_ms_p50']:.2f} ms (median over the rounds); default "
            f"strategy `{m['default_strategy']}`; load average {_load(m['load_average'])} when timed. Two adapters "
            "A and B per kind with random values, no training: random kinds on their own random masks, wm kinds on "
            f"the one mask `exporters.shira.make_masks` scores on {m['model']}'s stored base weights; kinds "
            "interleaved within rounds (order rotated), the LoRA fusion timed right before each kind in every "
            "round: each ratio to it is the median of the per-round ratios (paired), with its 95 % interval in the "
            "goals table.",
            "",
            "| mask | A, B positions | entries | runs/entry | switch ms p50 | p99 | p99/p50 | p99 not preempted | "
            "bound p50 | bound p99 | vs LoRA | bound vs LoRA |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for kind, v in m["kinds"].items():
            bound = v["strategies"]["bound"]
            calm = v["switch_ms_p99_not_preempted"]
            lines.append(
                f"| {kind} | {_positions(v.get('same_positions'))} | {v['entries']:,} | {v['runs_per_entry']:.3f} | "
                f"{v['switch_ms_p50']:.3f} | "
                f"{v['switch_ms_p99']:.3f} | {v['p99_over_p50']:.1f} | {'-' if calm is None else f'{calm:.3f}'} | "
                f"{bound['switch_ms_p50']:.3f} | {bound['switch_ms_p99']:.3f} | {v['switch_vs_lora_x']:.1f}x | "
                f"{bound.get('switch_vs_lora_x', m['lora_fuse_ms_p50'] / bound['switch_ms_p50']):.1f}x |"
            )
        for strategy in (m["default_strategy"], "bound"):
            lines += ["", f"`{strategy}`: " + _slow([v["strategies"][strategy] for v in m["kinds"].values()]) + "."]
    g = r.get("goals") or {}
    if g:
        lines += [
            "",
            f"Goals per structured unit: its best kind's accuracy gap on {r['model']}, and that same kind's switch "
            f"on MiniLM (default strategy) where it was timed, the unit's random kind beside it: gap <= "
            f"{GOALS['acc_gap_points']:.0f} point, switch >= {GOALS['switch_vs_lora_x']:.0f}x LoRA fusion, p99 < "
            f"{GOALS['p99_over_p50']:.0f}x p50 (speed: median of per-round ratios, met when its whole 95 % interval "
            "is). A best kind MiniLM did not time (masks scored on each domain's "
            "data: snip, grad; there is no labelled MiniLM task here) is judged on the unit's random kind, named in "
            "the column timed, and its unit's verdict stays open (-). Met on one kind: accuracy, speed and tail all "
            "met by the same kind.",
            "",
            "| unit | best kind | gap (points) | accuracy | timed | A, B positions | vs LoRA | speed | p99/p50 | "
            "tail | random vs LoRA | random p99/p50 | gap per seed | accuracy, every seed | met on one kind |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for unit, x in g.items():
            vs = f"{x['switch_vs_lora_x']:.1f}x" if "switch_vs_lora_x" in x else "-"
            if "vs_lora_ci95" in x:
                vs += " [{:.1f}, {:.1f}]".format(*x["vs_lora_ci95"])
            tail = f"{x['p99_over_p50']:.1f}" if "p99_over_p50" in x else "-"
            rvs = f"{x['random_switch_vs_lora_x']:.1f}x" if "random_switch_vs_lora_x" in x else "-"
            rtail = f"{x['random_p99_over_p50']:.1f}" if "random_p99_over_p50" in x else "-"
            timed = x.get("timed_kind", "-")
            if timed not in ("-", x["kind"]):
                timed += f" (`{x['kind']}` not timed)"
            lines.append(
                f"| {unit} | {x['kind']} | {x['acc_gap_points']:.1f} | {_yes(x['acc_met'])} | {timed} | "
                f"{_positions(x.get('same_positions'))} | {vs} | {_yes(x.get('speed_met'))} | {tail} | "
                f"{_yes(x.get('p99_met'))} | {rvs} | {rtail} | {_seed_gaps(x.get('seed_gap_points'))} | "
                f"{_yes(x.get('acc_met_every_seed'))} | {_yes(x.get('met'))} |"
            )
        lines += ["", SAME_POSITIONS]
    return "\n".join(lines) + "\n"


def _positions(same) -> str:
    return "-" if same is None else ("same" if same else "different")


def _positions_line(kinds: dict, pair: str) -> list[str]:
    """Which kinds' two switched adapters write the same entries (one mask for every domain), from the figures."""
    if not any("same_positions" in v for v in kinds.values()):
        return []
    same = ", ".join(f"`{k}`" for k, v in kinds.items() if v.get("same_positions")) or "no kind"
    other = ", ".join(f"`{k}`" for k, v in kinds.items() if v.get("same_positions") is False) or "no kind"
    return [
        "",
        f"The adapters switched ({pair}) write the same positions for {same} (one mask for every domain: A -> B is "
        f"one pass) and different positions for {other}.",
    ]
