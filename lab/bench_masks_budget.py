"""Opt-in for ``edge bench masks --epochs-grid 30,60``: each kind chooses its epochs along with its rate.

The same rule for every kind, on the same held-out training data as the rate alone
(:mod:`lab.bench_masks_train`): the (rate, epochs) pair with the best mean validation
accuracy over the domains after training with the first seed; then every seed is trained
on all the training data at that pair. Each budget keeps its own store
(:func:`lab.bench_masks_train.training_key` includes the epochs), so the default run's
cache is the 30-epoch store, reused as is. The test split is never seen.
"""

from __future__ import annotations

from pathlib import Path

from edge.errors import ConfigError
from lab.bench_masks_train import select_and_train, training_key

__all__ = ["choose_budget", "parse_epochs_grid", "select_budget"]


def parse_epochs_grid(text: str) -> tuple[int, ...]:
    """``"30,60"`` -> ``(30, 60)``: distinct positive epoch counts, sorted, at least two."""
    try:
        grid = sorted({int(t) for t in text.split(",")})
    except ValueError as e:
        raise ConfigError(f"--epochs-grid takes comma-separated integers such as 30,60; got {text!r}") from e
    if len(grid) < 2 or grid[0] < 1:
        raise ConfigError(f"--epochs-grid needs two or more distinct epoch counts >= 1 (e.g. 30,60); got {text!r}")
    return tuple(grid)


def choose_budget(by_epochs: dict[int, dict]) -> dict:
    """Each kind's ``{"lr", "epochs", "val_acc": {"LR@EPOCHS": acc}}`` from ``{epochs: select_and_train's choice}``.

    The pair with the highest mean validation accuracy over the domains; a tie goes to fewer epochs, then to the
    lower rate (as :func:`lab.bench_masks_train.choose_lr`).
    """
    if not by_epochs:
        raise ConfigError("no validation accuracy to choose a budget from")
    out = {}
    for kind in next(iter(by_epochs.values())):
        acc = {(e, float(lr)): a for e, ch in by_epochs.items() for lr, a in ch[kind]["val_acc"].items()}
        e, lr = max(sorted(acc), key=acc.__getitem__)  # the first of equals: fewest epochs, then lowest rate
        out[kind] = {"lr": lr, "epochs": e, "val_acc": {f"{r:g}@{n}": a for (n, r), a in sorted(acc.items())}}
    return out


def select_budget(
    checkpoint, cfg, cache: Path, export, kinds, density, seeds, grid, *, workers=1, progress=True
) -> tuple[Path, dict, dict]:
    """``(model, paths, chosen)`` with each kind's (rate, epochs) chosen on validation from ``grid``.

    ``export(store)`` returns the ONNX export of ``checkpoint`` kept in ``store`` (made once).
    Each budget has its own store (:func:`training_key`); selection there also trains the first seed's adapters
    at that budget's best rate (kept in the store, used when the kind chooses that budget).
    """
    stores = {e: cache / f"masks-{training_key(cfg, checkpoint, e)}" for e in grid}
    models = {e: export(stores[e]) for e in grid}
    run = dict(workers=workers, progress=progress)
    by_epochs = {
        e: select_and_train(checkpoint, models[e], cfg, stores[e], kinds, density, seeds[:1], e, **run)[1] for e in grid
    }
    chosen, paths = choose_budget(by_epochs), {}
    for e in grid:
        mine = tuple(k for k in kinds if chosen[k]["epochs"] == e)
        if mine:
            paths.update(select_and_train(checkpoint, models[e], cfg, stores[e], mine, density, seeds, e, **run)[0])
    return models[grid[0]], paths, chosen
