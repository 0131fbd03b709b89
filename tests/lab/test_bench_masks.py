"""edge bench masks: the switch figures attribute slow switches, goals are judged per structured unit, the report."""

from __future__ import annotations

import numpy as np
import pytest

from lab.bench_masks import switch_figures
from lab.bench_masks_report import GOALS, goals, markdown, summary


def test_switch_figures_attribute_slow_switches():
    # (ms, collections, minor faults, involuntary context switches) per timed switch
    rows = [(0.1, 0, 0, 0)] * 95 + [(0.5, 1, 0, 0), (0.6, 0, 3, 0), (0.7, 0, 0, 1), (0.8, 1, 0, 2), (0.2, 0, 0, 1)]
    f = switch_figures(rows)
    assert f["n"] == 100 and f["switch_ms_p50"] == pytest.approx(0.1)
    assert f["slow"] == 4  # over 3x p50: 0.5, 0.6, 0.7, 0.8
    assert (f["slow_with_gc"], f["slow_with_page_faults"], f["slow_preempted"], f["preempted"]) == (2, 1, 2, 3)
    calm = np.percentile([0.1] * 95 + [0.5, 0.6], 99)  # the switches with no involuntary context switch
    assert f["switch_ms_p99"] > f["switch_ms_p99_not_preempted"] == pytest.approx(calm)
    assert f["p99_over_p50"] == pytest.approx(f["switch_ms_p99"] / 0.1)


def _timing(p50: float, p99: float) -> dict:
    f = switch_figures([(p50, 0, 0, 0)] * 98 + [(p99, 0, 0, 1)] * 2)
    return {"strategies": {"hybrid": f, "bound": f}, **f}


def _result() -> dict:
    domains = ["rotate", "noise"]
    kinds = {}
    for kind, acc, lr in (
        ("wm", 0.84, 0.03),
        ("random", 0.83, 0.1),
        ("block4-wm", 0.832, 0.06),
        ("block16-wm", 0.79, 0.06),
        ("rows-wm", 0.836, 0.06),
    ):
        kinds[kind] = {
            "structured": "-" in kind,
            "lr": lr,
            "val_acc": {"0.03": acc - 0.01, "0.06": acc, "0.1": acc - 0.02},
            "mean_acc": acc,
            "acc": dict.fromkeys(domains, acc),
            "entries": 672,
            "runs_per_entry": 1.0,
            "switch_vs_lora_x": 1.0,
            **_timing(0.01, 0.02),
        }
    minilm = {
        "model": "all-MiniLM-L6-v2",
        "density": 0.01,
        "targets": 36,
        "lora_fuse_ms_p50": 3.0,
        "lora_rank": 2,
        "default_strategy": "hybrid",
        "load_average": [1.0, 1.5, 2.0],
        "kinds": {
            k: {
                "structured": k != "random",
                "same_positions": k.endswith("wm"),
                "entries": 106176,
                "runs_per_entry": r,
                "switch_vs_lora_x": x,
                **_timing(p, q),
            }
            for k, r, x, p, q in (
                ("random", 1.0, 4.0, 0.75, 1.0),
                ("block4-random", 0.25, 6.0, 0.5, 4.0),
                ("block4-wm", 0.25, 25.0, 0.12, 0.2),  # the kind judged on accuracy: timed itself
                ("block16-random", 0.06, 21.0, 0.14, 0.3),  # block16-wm not timed: judged on this one
                ("rows-random", 0.002, 30.0, 0.1, 0.2),
                ("rows-wm", 0.002, 10.0, 0.3, 0.4),  # accuracy met, its own speed not: random's does not count
            )
        },
    }
    return {
        "model": "digits-vit",
        "density": 0.01,
        "epochs": 30,
        "lr_grid": [0.03, 0.06, 0.1],
        "val_fraction": 0.2,
        "seeds": [0, 1, 2],
        "domains": domains,
        "switch_pair": domains,
        "targets": 12,
        "base_acc": dict.fromkeys(domains, 0.3),
        "lora_fuse_ms_p50": 0.08,
        "lora_rank": 1,
        "default_strategy": "hybrid",
        "kinds": kinds,
        "summary": summary(kinds),
        "minilm": minilm,
    }


def test_goals_per_structured_unit_judge_speed_and_tail_on_the_kind_whose_accuracy_is_judged():
    r = _result()
    s = r["summary"]
    assert s["best_unstructured"] == "wm" and s["best_structured"] == "rows-wm"
    assert s["gap_points"] == pytest.approx({"block4-wm": 0.8, "block16-wm": 5.0, "rows-wm": 0.4})
    g = goals(r)
    assert set(g) == {"block4", "block16", "rows"}
    b4 = g["block4"]  # all three met on block4-wm; its random kind (6x, tail 8) is only shown beside it
    assert b4["timed_kind"] == "block4-wm" and b4["same_positions"] is True
    assert b4["acc_met"] and b4["speed_met"] and b4["p99_met"] and b4["met"] is True
    assert b4["switch_vs_lora_x"] == 25.0 and b4["random_switch_vs_lora_x"] == 6.0
    assert b4["random_p99_over_p50"] == pytest.approx(8.0)
    b16 = g["block16"]  # block16-wm was not timed: speed and tail from block16-random, the verdict stays open
    assert b16["timed_kind"] == "block16-random" and b16["same_positions"] is False
    assert not b16["acc_met"] and b16["speed_met"] and b16["p99_met"] and b16["met"] is None
    rows = g["rows"]  # accuracy met, rows-random fast enough, rows-wm not: not met (one kind must meet all three)
    assert rows["timed_kind"] == "rows-wm" and rows["acc_met"] and not rows["speed_met"] and rows["p99_met"]
    assert rows["random_switch_vs_lora_x"] >= GOALS["switch_vs_lora_x"] and rows["met"] is False
    assert GOALS["acc_gap_points"] == 1.0


def test_goals_without_minilm_timing_judge_accuracy_alone():
    r = _result()
    r["minilm"] = {"skipped": "--no-minilm"}
    g = goals(r)
    assert g["block4"]["acc_met"] and g["block4"]["met"] is None and "switch_vs_lora_x" not in g["block4"]
    r["goals"] = g
    assert "| block4 | block4-wm | 0.8 | met | - | - | - | - | - | - | - | - | - | - | - |" in markdown(r)


def test_markdown_reports_gaps_tails_and_goals():
    r = _result()
    r["goals"] = goals(r)
    md = markdown(r)
    assert "| block16-wm | 0.06 | 0.790 | 0.790 | 0.790 | 5.0 |" in md  # each kind's chosen lr
    assert "each kind's best of 0.03 / 0.06 / 0.1 by mean accuracy over the domains on 20% of each domain's" in md
    assert "block4-wm 0.822 / 0.832 / 0.812; block16-wm 0.780 / 0.790 / 0.770" in md
    assert (
        "| block4 | block4-wm | 0.8 | met | block4-wm | same | 25.0x | met | 1.7 | met | 6.0x | 8.0 | - | - | met |"
        in md
    )
    assert (
        "| block16 | block16-wm | 5.0 | **not met** | block16-random (`block16-wm` not timed) | different | 21.0x "
        "| met | 2.1 | met | 21.0x | 2.1 | - | - | - |" in md
    )
    assert "| rows | rows-wm | 0.4 | met | rows-wm | same | 10.0x | **not met** | 1.3 | met | 30.0x | 2.0 |" in md
    assert "| block4-wm | same | 106,176 | 0.250 | 0.120 | 0.200 | 1.7 |" in md  # MiniLM: positions per kind
    assert "| block4-random | different | 106,176 | 0.250 | 0.500 | 4.000 | 8.0 |" in md
    assert "A, B positions: *same* when A and B write exactly the same entries" in md  # said once, from code
    digits = "0 of 500 switches over 3x p50: 0 with a collection, 0 with page faults, 0 preempted by the OS"
    assert f"`hybrid`: {digits} (10 of all 500 were preempted)." in md
    # MiniLM: only block4-random's two 4.0 ms switches are over 3x its p50 (0.5 ms), both preempted
    assert "`hybrid`: 2 of 600 switches over 3x p50: 0 with a collection, 0 with page faults, 2 preempted" in md
    assert "load average 1.00, 1.50, 2.00 (1, 5, 15 min) when timed" in md
    assert "write the same positions" not in md  # the digits kinds carry no positions figure here


def test_markdown_names_the_digits_kinds_whose_switched_adapters_share_positions():
    r = _result()
    for k, v in r["kinds"].items():
        v["same_positions"] = k.endswith("wm")
    md = markdown(r)
    assert (
        "The adapters switched (rotate and noise) write the same positions for `wm`, `block4-wm`, `block16-wm`, "
        "`rows-wm` (one mask for every domain: A -> B is one pass) and different positions for `random`." in md
    )


def test_speed_is_met_only_when_the_paired_interval_clears_the_goal():
    """The LoRA fusion is timed in every round: a median over 20x whose 95 % interval reaches below it is not met."""
    r = _result()
    own = r["minilm"]["kinds"]["block4-wm"]
    own["vs_lora_ci95"] = [18.5, 27.0]  # median 25x, interval crossing the goal
    g = goals(r)
    assert g["block4"]["switch_vs_lora_x"] == 25.0 and not g["block4"]["speed_met"] and g["block4"]["met"] is False
    own["vs_lora_ci95"] = [21.0, 27.0]
    g = goals(r)
    assert g["block4"]["speed_met"] and g["block4"]["met"] is True
    r["goals"] = g
    assert "| 25.0x [21.0, 27.0] | met |" in markdown(r)


def test_switch_times_pair_the_reference_within_rounds(tmp_path):
    """Each kind's ratio to the reference is the median of per-round ratios, with its interval."""
    import _tiny

    from edge.runtime import Runtime
    from lab.bench_masks import _switch_times

    path = tmp_path / "m.onnx"
    info = _tiny.make_mlp(path, sizes=(10, 24, 3))
    pair = (_tiny.random_adapter(info, 1, name="a"), _tiny.random_adapter(info, 2, name="b"))
    calls = []

    def reference(n):
        calls.append(n)
        return 1.0  # ms

    out, default = _switch_times(path, {"k": pair}, 12, 4, None, reference=reference)
    with Runtime(path) as rt:
        assert default == rt.strategy
    for f in out["k"].values():
        assert f["lora_fuse_ms_p50"] == 1.0 and f["n"] == 12
        lo, hi = f["vs_lora_ci95"]
        assert lo <= f["switch_vs_lora_x"] <= hi and f["switch_vs_lora_x"] > 1.0  # a tiny switch beats 1 ms
    assert len(calls) == 4 * len(out["k"])  # once per round, per strategy
