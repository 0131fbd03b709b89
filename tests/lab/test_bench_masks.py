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
                "entries": 106176,
                "runs_per_entry": r,
                "switch_vs_lora_x": x,
                **_timing(p, q),
            }
            for k, r, x, p, q in (
                ("random", 1.0, 4.0, 0.75, 1.0),
                ("block4-random", 0.25, 6.0, 0.5, 4.0),
                ("block16-random", 0.06, 21.0, 0.14, 0.3),
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


def test_goals_per_structured_unit():
    r = _result()
    s = r["summary"]
    assert s["best_unstructured"] == "wm" and s["best_structured"] == "block4-wm"
    assert s["gap_points"] == pytest.approx({"block4-wm": 0.8, "block16-wm": 5.0})
    g = goals(r)
    assert set(g) == {"block4", "block16"}
    assert g["block4"]["acc_met"] and not g["block4"]["speed_met"] and not g["block4"]["p99_met"]
    assert not g["block16"]["acc_met"] and g["block16"]["speed_met"] and g["block16"]["p99_met"]
    assert GOALS["acc_gap_points"] == 1.0


def test_markdown_reports_gaps_tails_and_goals():
    r = _result()
    r["goals"] = goals(r)
    md = markdown(r)
    assert "| block16-wm | 0.06 | 0.790 | 0.790 | 0.790 | 5.0 |" in md  # each kind's chosen lr
    assert "each kind's best of 0.03 / 0.06 / 0.1 by mean accuracy over the domains on 20% of each domain's" in md
    assert "block4-wm 0.822 / 0.832 / 0.812; block16-wm 0.780 / 0.790 / 0.770." in md
    assert "| block4 | block4-wm | 0.8 | met | 6.0x | **not met** | 8.0 | **not met** |" in md
    digits = "0 of 400 switches over 3x p50: 0 with a collection, 0 with page faults, 0 preempted by the OS"
    assert f"`hybrid`: {digits} (8 of all 400 were preempted)." in md
    # MiniLM: only block4-random's two 4.0 ms switches are over 3x its p50 (0.5 ms), both preempted
    assert "`hybrid`: 2 of 300 switches over 3x p50: 0 with a collection, 0 with page faults, 2 preempted" in md
    assert "load average 1.00, 1.50, 2.00 (1, 5, 15 min) when timed" in md
    assert md.count("\n| ") >= 12
