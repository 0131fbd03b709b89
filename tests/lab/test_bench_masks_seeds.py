"""edge bench masks' report: per-seed accuracies, gaps paired by training seed, a met that one seed misses, and
each kind's epochs when ``--epochs-grid`` chose them."""

from __future__ import annotations

import pytest

from lab.bench_masks_report import goals, markdown, summary


def _kind(seed_acc: dict[str, float]) -> dict:
    timing = {
        "switch_ms_p50": 0.01,
        "switch_ms_p99": 0.02,
        "n": 10,
        "slow": 0,
        "slow_with_gc": 0,
        "slow_with_page_faults": 0,
        "slow_preempted": 0,
        "preempted": 0,
    }
    mean = sum(seed_acc.values()) / len(seed_acc)
    return {
        "lr": 0.03,
        "val_acc": {"0.03": mean, "0.06": mean, "0.1": mean},
        "mean_acc": mean,
        "acc": {"rotate": mean},
        "seed_acc": seed_acc,
        "entries": 656,
        "runs_per_entry": 1.0,
        "switch_vs_lora_x": 2.0,
        "strategies": {"hybrid": timing, "bound": timing},
        **timing,
    }


def _result(kinds: dict) -> dict:
    for k, v in kinds.items():
        v["structured"] = "-" in k
    return {
        "model": "digits-vit",
        "density": 0.01,
        "epochs": 30,
        "lr_grid": [0.03, 0.06, 0.1],
        "val_fraction": 0.2,
        "seeds": [0, 1, 2],
        "domains": ["rotate"],
        "switch_pair": ["rotate", "noise"],
        "targets": 12,
        "base_acc": {"rotate": 0.3},
        "lora_fuse_ms_p50": 0.08,
        "lora_rank": 1,
        "default_strategy": "hybrid",
        "kinds": kinds,
        "summary": summary(kinds),
    }


def test_gaps_are_paired_by_seed_and_a_mean_met_missed_by_one_seed_is_flagged():
    r = _result(
        {
            "wm": _kind({"0": 0.840, "1": 0.845, "2": 0.850}),
            "block4-wm": _kind({"0": 0.838, "1": 0.842, "2": 0.830}),  # mean gap 0.83, seed 2 misses by 2.0
            "block16-wm": _kind({"0": 0.835, "1": 0.840, "2": 0.845}),  # 0.5 on every seed
        }
    )
    s = r["summary"]
    assert s["seed_gap_points"]["block4-wm"] == pytest.approx({"0": 0.2, "1": 0.3, "2": 2.0})
    assert s["seed_gap_points"]["block16-wm"] == pytest.approx({"0": 0.5, "1": 0.5, "2": 0.5})
    g = goals(r)
    assert g["block4"]["acc_met"] and not g["block4"]["acc_met_every_seed"]
    assert g["block16"]["acc_met"] and g["block16"]["acc_met_every_seed"]
    r["goals"] = g
    md = markdown(r)
    assert "| block4-wm | 0.03 | 0.837 | 0.837 | 0.8 | 0.830-0.842 | 0.2 / 0.3 / 2.0 |" in md
    assert "| wm | 0.03 | 0.845 | 0.845 | - | 0.840-0.850 | - |" in md
    untimed = "- | - | - | - | - | - | - | - |"  # no MiniLM figures: speed, tail and the unit's verdict open
    assert f"| block4 | block4-wm | 0.8 | met | {untimed} 0.2 / 0.3 / 2.0 | **not met** | - |" in md
    assert f"| block16 | block16-wm | 0.5 | met | {untimed} 0.5 / 0.5 / 0.5 | met | - |" in md


def test_results_without_seed_figures_still_report():
    kinds = {"wm": _kind({"0": 0.84}), "block4-wm": _kind({"0": 0.83})}
    for v in kinds.values():
        del v["seed_acc"]
    r = _result(kinds)
    assert "seed_gap_points" in r["summary"] and not r["summary"]["seed_gap_points"]
    g = goals(r)
    assert "acc_met_every_seed" not in g["block4"]
    r["goals"] = g
    assert "| block4-wm | 0.03 | 0.830 | 0.830 | 1.0 | - | - |" in markdown(r)


def test_epochs_are_one_budget_for_every_kind_and_part_of_the_training_key(tmp_path):
    from edge.errors import ConfigError
    from lab.bench_masks import EPOCHS, bench_masks, training_key
    from lab.pipeline import DemoConfig

    with pytest.raises(ConfigError, match="epochs must be >= 1; got 0"):
        bench_masks(tmp_path, epochs=0)
    checkpoint = tmp_path / "encoder.safetensors"
    checkpoint.write_bytes(b"weights")
    cfg = DemoConfig()
    assert training_key(cfg, checkpoint) == training_key(cfg, checkpoint, EPOCHS)  # the default run's cache stays
    assert training_key(cfg, checkpoint, 60) != training_key(cfg, checkpoint, EPOCHS)


def test_the_report_says_where_the_default_mask_stands():
    kinds = {"wm": _kind({"0": 0.84}), "random": _kind({"0": 0.845}), "block4-wm": _kind({"0": 0.83})}
    r = _result(kinds)
    r["default_mask"] = "wm"
    assert "`wm`: 0.5 points below the best unstructured `random`." in markdown(r)
    r["default_mask"] = "random"
    assert "`random`: the best unstructured kind." in markdown(r)
    r["default_mask"] = "snip"
    assert "Default mask `snip`: not measured in this run." in markdown(r)


def test_markdown_names_each_kinds_epochs_only_when_they_were_chosen():
    from lab import bench_masks

    timing = bench_masks.switch_figures([(0.01, 0, 0, 0)] * 100)
    kinds = {
        kind: {
            "lr": lr,
            "epochs": epochs,
            "val_acc": {"0.06@30": acc - 0.01, "0.06@60": acc},
            "mean_acc": acc,
            "acc": {"rotate": acc},
            "entries": 672,
            "runs_per_entry": 1.0,
            "switch_vs_lora_x": 1.0,
            "strategies": {"hybrid": timing, "bound": timing},
            **timing,
        }
        for kind, acc, lr, epochs in (("wm", 0.85, 0.06, 60), ("block4-wm", 0.832, 0.06, 30))
    }
    r = {
        **_result(kinds),
        "epochs": "30/60 (each kind's choice)",
        "epochs_grid": [30, 60],
        "seeds": [0],
        "switch_pair": ["rotate", "rotate"],
    }
    md = markdown(r)
    assert "2 mask kinds at density 1%, 30/60 (each kind's choice) epochs" in md
    assert "each kind's best pair of 0.03 / 0.06 / 0.1 x 30 / 60 epochs" in md
    assert "wm 0.06@30 0.840 / 0.06@60 0.850; block4-wm 0.06@30 0.822 / 0.06@60 0.832." in md
    assert "| wm | 0.06 @60 | 0.850 |" in md and "| block4-wm | 0.06 @30 | 0.832 |" in md
    for v in kinds.values():  # the default run records no epochs per kind: its rows keep the rate alone
        del v["epochs"]
    del r["epochs_grid"]
    assert "| wm | 0.06 | 0.850 |" in markdown(r)
