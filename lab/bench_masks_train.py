"""The adapters of ``edge bench masks``: each mask kind's learning rate, chosen on held-out training data, then trained.

Every mask kind gets the same treatment, so the comparison cannot favour one: its learning
rate is the one of :data:`LRS` with the highest mean accuracy on a validation split
(:data:`VAL_FRACTION` of each domain's *training* data, stratified by class, the same
images for every kind; the test split is never seen) after training on the rest with the
bench's first seed, over the domains (ties go to the lower rate). Each kind's adapters are
then trained on the whole training data at that rate, for every seed, and tested by the
bench. A user tuning each kind would do the same; one rate for all, chosen for the best
unstructured mask, favours that mask (``block16-wm`` peaks at a higher rate than ``wm``).

Everything lands in the bench's store (``cache/masks-<hash>/``, :func:`training_key`):
each selection run's validation accuracy as a small JSON file and each adapter as
safetensors, so a rerun trains nothing. Runs are spread over ``workers`` processes of one
torch thread each (the 64-wide encoder gains nothing from more threads per run); they are
spawned, so a script that calls this with ``workers > 1`` needs the usual
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from edge.errors import ConfigError
from edge.format.io import load_json, read_bounded, write_json

__all__ = ["EPOCHS", "LRS", "VAL_FRACTION", "choose_lr", "select_and_train", "training_key", "validation_split"]

#: The training budget, the same for every kind and seed: the demo's epochs (DemoConfig.shira_epochs).
EPOCHS = 30
#: The learning rates each kind chooses from. Mean test accuracy over the domains and seeds 0-2 at 30 epochs,
#: 3e-2 / 6e-2 / 1e-1: wm 0.843 / 0.839 / 0.837, random 0.838 / 0.842 / 0.845, block4-wm 0.829 / 0.832 / 0.827,
#: block16-wm 0.792 / 0.805 / 0.795: each kind peaks at its own rate (one rate for all favours the kind it suits).
LRS = (3e-2, 6e-2, 1e-1)
VAL_FRACTION = 0.2
_CODE = ("exporters/shira.py", "exporters/masks.py", "exporters/data.py", "lab/bench_masks_train.py")
_ROOT = Path(__file__).resolve().parents[1]


def training_key(cfg, checkpoint: Path, epochs: int = EPOCHS) -> str:
    """Hash of the code that trains adapters, the demo config, the budget, the rates and the checkpoint."""
    h = hashlib.sha256(f"{cfg.key()}\0{epochs}\0{LRS!r}\0{VAL_FRACTION!r}\0".encode() + Path(checkpoint).read_bytes())
    for rel in _CODE:
        h.update(rel.encode() + b"\0" + (_ROOT / rel).read_bytes())
    return h.hexdigest()[:12]


def validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(fit, validation)`` indices of ``y`` with about ``fraction`` of each class held out."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation fraction must be in (0, 1); got {fraction}")
    y = np.asarray(y)
    rng = np.random.default_rng([seed, 0x5E1EC7])
    held = [rng.permutation(np.flatnonzero(y == c))[: int(round(fraction * np.sum(y == c)))] for c in np.unique(y)]
    val = np.sort(np.concatenate(held)).astype(np.int64)
    if val.size == 0 or val.size == y.size:
        raise ConfigError(f"a validation fraction of {fraction} of {y.size} samples leaves one side empty")
    return np.setdiff1d(np.arange(y.size), val), val


def choose_lr(val_acc: dict[float, float]) -> float:
    """The rate with the highest validation accuracy; a tie goes to the lower rate."""
    if not val_acc:
        raise ConfigError("no validation accuracy to choose a learning rate from")
    return max(sorted(val_acc), key=lambda lr: (val_acc[lr], -lr))


def select_and_train(
    checkpoint, model_path, cfg, store: Path, kinds, density, seeds, epochs, *, workers=1, progress=True
) -> tuple[dict, dict]:
    """``({(kind, seed, domain): adapter path}, {kind: {"lr", "val_acc"}})``, training only what is not cached."""
    if epochs < 1 or workers < 1:
        raise ConfigError(f"epochs and workers must be >= 1; got {epochs} and {workers}")
    names, select_seed = tuple(cfg.domains), seeds[0]
    val = {
        (k, lr, d): store / f"val-{k}-d{density:g}-lr{lr:g}-s{select_seed}-{d}.json"
        for k in kinds
        for lr in LRS
        for d in names
    }
    job = (str(checkpoint), str(model_path), cfg, density, epochs)
    _run(job, [(*key, select_seed, p) for key, p in val.items() if not p.exists()], workers, progress, "validating")
    chosen = {}
    for k in kinds:
        acc = {lr: float(np.mean([_val_acc(val[k, lr, d]) for d in names])) for lr in LRS}
        chosen[k] = {"lr": choose_lr(acc), "val_acc": {f"{lr:g}": a for lr, a in acc.items()}}
    paths = {
        (k, s, d): store / f"{k}-d{density:g}-lr{chosen[k]['lr']:g}-s{s}-{d}.safetensors"
        for k in kinds
        for s in seeds
        for d in names
    }
    todo = [(k, chosen[k]["lr"], d, s, p) for (k, s, d), p in paths.items() if not p.exists()]
    _run(job, todo, workers, progress, "training")
    return paths, chosen


def _val_acc(path: Path) -> float:
    data = load_json(read_bounded(path, 4096, what="validation record"), source=str(path))
    acc = data.get("val_acc") if isinstance(data, dict) else None
    if not isinstance(acc, float) or not 0.0 <= acc <= 1.0:
        raise ConfigError(f"{path} holds no validation accuracy in [0, 1] ({acc!r}); delete it to rerun that run")
    return acc


def _run(job, todo: list, workers: int, progress: bool, what: str) -> None:
    """Run ``todo`` (``(kind, lr, domain, seed, out path)``) on ``workers`` processes, each writing its own file."""
    if not todo:
        return
    Path(todo[0][-1]).parent.mkdir(parents=True, exist_ok=True)
    if workers <= 1:
        _init(*job)
        for i, t in enumerate(todo):
            _report(progress, what, t, i, len(todo))
            _one(*t)
        return
    ctx = multiprocessing.get_context("spawn")  # torch in a forked child is not safe
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=job) as pool:
        for i, (t, _) in enumerate(zip(todo, pool.map(_one_packed, todo), strict=True)):
            _report(progress, what, t, i, len(todo))


def _report(progress: bool, what: str, t: tuple, i: int, n: int) -> None:
    if progress:
        kind, lr, domain, seed, _ = t
        print(f"[bench masks] {what} {kind} lr {lr:g} s{seed} {domain} ({i + 1}/{n})", flush=True)


_STATE: dict = {}  # per process: the model, its targets and layout, the domains (set by _init)


def _init(checkpoint: str, model_path: str, cfg, density: float, epochs: int) -> None:
    import torch

    from exporters import shira
    from exporters.masks import stored_layout
    from exporters.onnx import load_model_info
    from lab import digits_model as dm
    from lab.datasets import load_domains

    torch.set_num_threads(1)  # a 64-wide encoder: one thread per run is as fast
    model = dm.load_checkpoint(Path(checkpoint))
    info = load_model_info(Path(model_path))
    _STATE.update(
        model=model,
        info=info,
        targets=shira.select_targets(model, list(cfg.targets)),
        layout=stored_layout(info),
        domains=load_domains(cfg.domains, seed=cfg.seed),
        split=cfg.seed,
        density=density,
        epochs=epochs,
    )


def _one_packed(t: tuple) -> None:
    _one(*t)


def _one(kind: str, lr: float, domain: str, seed: int, out: Path) -> None:
    """Train one adapter; a ``.json`` ``out`` gets its validation accuracy, a ``.safetensors`` one the adapter."""
    import torch

    from exporters import shira
    from lab import digits_model as dm

    st, out = _STATE, Path(out)
    d = st["domains"][domain]
    x, y = d.x_train, d.y_train
    if out.suffix == ".json":
        fit, held = validation_split(y, VAL_FRACTION, st["split"])
        x, y, x_eval, y_eval = x[fit], y[fit], x[held], y[held]
    else:
        x_eval, y_eval = d.x_test, d.y_test
    torch.manual_seed(seed)
    masks = shira.make_masks(
        st["model"], st["targets"], density=st["density"], kind=kind, calib=(x, y), seed=seed, layout=st["layout"]
    )
    trained = shira.train_shira(st["model"], masks, x, y, epochs=st["epochs"], lr=lr, seed=seed, progress=False)
    acc = dm.evaluate(shira.merge_shira(st["model"], trained), x_eval, y_eval)
    meta = {"mask": kind, "density": st["density"], "domain": domain, "seed": seed, "lr": lr}
    if out.suffix == ".json":
        write_json(out, {**meta, "val_acc": acc, "fit": int(len(y)), "validation": int(len(y_eval))})
        return
    tmp = out.with_suffix(".tmp")
    shira.shira_adapter(trained, st["info"], f"{kind}-{domain}", {**meta, "host_acc": acc}).save(tmp)
    tmp.replace(out)
