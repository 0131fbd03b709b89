"""edge bench masks: each kind's learning rate is chosen by one rule on held-out training data, and cached."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from edge.errors import ConfigError
from lab import bench_masks_train as bt


def test_validation_split_is_stratified_disjoint_and_deterministic():
    y = np.repeat(np.arange(10), [20, 21, 19, 20, 20, 22, 18, 20, 20, 20])
    fit, val = bt.validation_split(y, 0.2, seed=0)
    assert np.intersect1d(fit, val).size == 0 and np.union1d(fit, val).size == y.size
    assert np.all(np.diff(val) > 0) and np.all(np.diff(fit) > 0)
    for c in range(10):  # about 20 % of every class held out
        assert np.sum(y[val] == c) == round(0.2 * np.sum(y == c))
    again = bt.validation_split(y, 0.2, seed=0)[1]
    np.testing.assert_array_equal(val, again)
    assert not np.array_equal(val, bt.validation_split(y, 0.2, seed=1)[1])
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\); got 1.0"):
        bt.validation_split(y, 1.0, seed=0)
    with pytest.raises(ConfigError, match="leaves one side empty"):
        bt.validation_split(np.arange(3), 0.1, seed=0)


def test_choose_lr_takes_the_best_and_the_lower_rate_on_a_tie():
    assert bt.choose_lr({0.03: 0.80, 0.06: 0.84, 0.1: 0.83}) == 0.06
    assert bt.choose_lr({0.1: 0.84, 0.03: 0.84, 0.06: 0.80}) == 0.03
    with pytest.raises(ConfigError, match="no validation accuracy"):
        bt.choose_lr({})


def test_the_rates_and_the_budget_are_part_of_the_training_key(tmp_path, monkeypatch):
    from lab.pipeline import DemoConfig

    checkpoint = tmp_path / "encoder.safetensors"
    checkpoint.write_bytes(b"weights")
    cfg = DemoConfig()
    key = bt.training_key(cfg, checkpoint)
    assert key == bt.training_key(cfg, checkpoint, bt.EPOCHS) != bt.training_key(cfg, checkpoint, 60)
    monkeypatch.setattr(bt, "LRS", (1e-2, 3e-2))
    assert bt.training_key(cfg, checkpoint) != key


def test_each_kind_trains_at_its_own_rate_chosen_on_validation_and_nothing_twice(tmp_path, monkeypatch):
    best = {"wm": 3e-2, "block4-wm": 1e-1}  # the validation accuracy each fake run reports peaks there
    calls = []

    def fake_one(kind, lr, domain, seed, out):
        calls.append((kind, lr, domain, seed, out.suffix))
        if out.suffix == ".json":
            out.write_text(json.dumps({"val_acc": 0.9 - abs(np.log(lr / best[kind])) / 10}))
        else:
            out.write_bytes(b"adapter")

    monkeypatch.setattr(bt, "_init", lambda *a: None)
    monkeypatch.setattr(bt, "_one", fake_one)
    cfg = SimpleNamespace(domains=("rotate", "noise"))
    args = ("ck", "model.onnx", cfg, tmp_path, tuple(best), 0.01, (4, 5), 30)
    paths, chosen = bt.select_and_train(*args, workers=1, progress=False)
    assert {k: v["lr"] for k, v in chosen.items()} == best
    assert list(chosen["wm"]["val_acc"]) == [f"{lr:g}" for lr in bt.LRS]
    val = [c for c in calls if c[-1] == ".json"]
    assert len(val) == len(best) * len(bt.LRS) * 2 and {c[3] for c in val} == {4}  # selected with the first seed
    trained = [c for c in calls if c[-1] == ".safetensors"]
    assert sorted(trained) == sorted(
        (k, best[k], d, s, ".safetensors") for k in best for d in cfg.domains for s in (4, 5)
    )
    assert paths["block4-wm", 5, "noise"].name == "block4-wm-d0.01-lr0.1-s5-noise.safetensors"
    calls.clear()
    assert bt.select_and_train(*args, workers=1, progress=False) == (paths, chosen) and not calls  # all cached
    (tmp_path / "val-wm-d0.01-lr0.03-s4-rotate.json").write_text('{"val_acc": "high"}')
    with pytest.raises(ConfigError, match="holds no validation accuracy"):
        bt.select_and_train(*args, workers=1, progress=False)
    with pytest.raises(ConfigError, match="epochs and workers must be >= 1; got 0 and 1"):
        bt.select_and_train(*args[:-1], 0)
    with pytest.raises(ConfigError, match="epochs and workers must be >= 1; got 30 and 0"):
        bt.select_and_train(*args, workers=0)
