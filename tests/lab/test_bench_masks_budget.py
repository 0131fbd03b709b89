"""edge bench masks --epochs-grid: each kind chooses (rate, epochs) on held-out data by one rule (opt-in)."""

from __future__ import annotations

import argparse

import pytest

from edge.errors import ConfigError
from lab import bench_masks
from lab import bench_masks_budget as bb


def test_parse_epochs_grid_sorts_dedups_and_rejects_what_is_not_a_grid():
    assert bb.parse_epochs_grid("60,30") == (30, 60)
    assert bb.parse_epochs_grid("30, 60,30,90") == (30, 60, 90)
    for bad, match in (("30", "two or more"), ("30,30", "two or more"), ("0,30", ">= 1"), ("30,sixty", "integers")):
        with pytest.raises(ConfigError, match=match):
            bb.parse_epochs_grid(bad)


def test_the_flag_is_opt_in_and_parsed_by_the_cli():
    parser = argparse.ArgumentParser()
    bench_masks.add_arguments(parser)
    default = parser.parse_args([])
    assert default.epochs_grid is None and default.epochs == bench_masks.EPOCHS == 30
    assert parser.parse_args(["--epochs-grid", "60,30"]).epochs_grid == (30, 60)
    with pytest.raises(SystemExit):
        parser.parse_args(["--epochs-grid", "30"])


def _chosen(acc: dict) -> dict:  # select_and_train's second value for one budget
    return {k: {"lr": max(v, key=v.get), "val_acc": {f"{lr:g}": a for lr, a in v.items()}} for k, v in acc.items()}


def test_choose_budget_takes_the_best_pair_and_fewer_epochs_then_the_lower_rate_on_a_tie():
    by_epochs = {
        30: _chosen({"wm": {0.03: 0.842, 0.06: 0.847, 0.1: 0.828}, "random": {0.03: 0.81, 0.06: 0.81, 0.1: 0.832}}),
        60: _chosen({"wm": {0.03: 0.837, 0.06: 0.853, 0.1: 0.85}, "random": {0.03: 0.826, 0.06: 0.832, 0.1: 0.832}}),
    }
    got = bb.choose_budget(by_epochs)
    assert (got["wm"]["lr"], got["wm"]["epochs"]) == (0.06, 60)
    assert (got["random"]["lr"], got["random"]["epochs"]) == (0.1, 30)  # 0.832 three times: 30 epochs wins
    assert list(got["wm"]["val_acc"]) == ["0.03@30", "0.06@30", "0.1@30", "0.03@60", "0.06@60", "0.1@60"]
    assert got["wm"]["val_acc"]["0.06@60"] == 0.853
    tie = bb.choose_budget({30: _chosen({"wm": {0.03: 0.8, 0.1: 0.8}}), 60: _chosen({"wm": {0.03: 0.8}})})
    assert (tie["wm"]["lr"], tie["wm"]["epochs"]) == (0.03, 30)
    with pytest.raises(ConfigError, match="no validation accuracy"):
        bb.choose_budget({})


def test_select_budget_validates_every_budget_then_trains_each_kind_only_at_its_choice(tmp_path, monkeypatch):
    peak = {"wm": (60, 0.06), "block4-wm": (30, 0.1)}  # where each fake kind's validation accuracy peaks
    calls = []

    def fake_select_and_train(checkpoint, model, cfg, store, kinds, density, seeds, epochs, *, workers, progress):
        calls.append((tuple(kinds), tuple(seeds), epochs, store.name, model))
        acc = {k: {lr: 0.9 if (epochs, lr) == peak[k] else 0.8 for lr in (0.03, 0.06, 0.1)} for k in kinds}
        paths = {(k, s, "rotate"): store / f"{k}-s{s}" for k in kinds for s in seeds}
        return paths, _chosen(acc)

    monkeypatch.setattr(bb, "select_and_train", fake_select_and_train)
    monkeypatch.setattr(bb, "training_key", lambda cfg, checkpoint, epochs: f"key{epochs}")
    exported = []

    def export(store):
        exported.append(store.name)
        return store / "encoder.onnx"

    model, paths, chosen = bb.select_budget(
        "ck", None, tmp_path, export, ("wm", "block4-wm"), 0.01, (0, 1, 2), (30, 60), workers=2, progress=False
    )
    assert exported == ["masks-key30", "masks-key60"] and model == tmp_path / "masks-key30" / "encoder.onnx"
    kinds = ("wm", "block4-wm")
    assert calls[:2] == [  # selection: every kind at every budget, the first seed only
        (kinds, (0,), 30, "masks-key30", tmp_path / "masks-key30" / "encoder.onnx"),
        (kinds, (0,), 60, "masks-key60", tmp_path / "masks-key60" / "encoder.onnx"),
    ]
    assert [c[:4] for c in calls[2:]] == [  # then each kind's seeds at its own budget, in that budget's store
        (("block4-wm",), (0, 1, 2), 30, "masks-key30"),
        (("wm",), (0, 1, 2), 60, "masks-key60"),
    ]
    assert {k: (v["epochs"], v["lr"]) for k, v in chosen.items()} == {"wm": (60, 0.06), "block4-wm": (30, 0.1)}
    assert paths["wm", 2, "rotate"] == tmp_path / "masks-key60" / "wm-s2"
    assert paths["block4-wm", 1, "rotate"] == tmp_path / "masks-key30" / "block4-wm-s1"
