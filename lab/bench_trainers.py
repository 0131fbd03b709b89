"""The device trainer (numpy) against the host trainer (torch) on the same tail: part of ``edge bench update``.

For each encoder (the demo ViT and the demo CNN) and each target domain, both trainers
grow a SHiRA adapter of the same graph-found tail (:mod:`edge.learn.tail`, layer set
``tail``: the last linear layer and the classifier) from the same labelled samples, with
the same recipe (:class:`TrainerConfig`: SNIP mask at the same density, zero deltas,
AdamW with the same epochs, learning rate, minibatch size and weight decay;
:class:`~edge.learn.device_trainer.DeviceTrainer` and
:class:`~exporters.host_trainer.HostTrainer`). Only the shuffle of the minibatches
differs (numpy's generator vs torch's), and the arithmetic (float64 vs float32).

Each trainer runs in its own fresh interpreter: the device one with ``import torch``
blocked from its first line (:data:`BLOCK_TORCH`) and BLAS and onnxruntime on
``threads``; it reports whether torch got imported anyway. Each times its training
(for the device: the one model run that gives the tail's inputs, plus the epochs; for
the host: every epoch's forward and backward through the whole torch model) and its
peak extra resident memory (``VmHWM`` after a reset, minus ``VmRSS`` before; Linux).
The adapters come back as files; this process loads both into the runtime (fused) and
measures test accuracy. The gain of a trainer is its mean accuracy over the domains
minus the base model's; the ratio is the device gain over the host gain (goal >= 0.9).
The training loss of both adapters on their samples (one numpy forward) and the share
of mask entries the two trainers chose alike are reported beside.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge.errors import ConfigError, EdgeError

__all__ = ["BLOCK_TORCH", "GOAL", "Encoder", "TrainerConfig", "child_main", "compare_trainers", "markdown"]

GOAL = 0.9  # device gain / host gain

#: prepended to the device child's code: ``import torch`` (or any ``torch.*``) raises there
BLOCK_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked: the device trainer must not import it")
sys.meta_path.insert(0, _NoTorch())
"""


@dataclass(frozen=True)
class TrainerConfig:
    """The recipe both trainers follow: the device trainer's defaults, for each ``(density, minibatch)`` of ``runs``.

    With at most ``batch`` samples a minibatch is the whole set, so the two trainers take
    the same steps (up to rounding) whatever the seed: such a run uses ``seeds[0]`` only. A
    smaller minibatch makes their shuffles differ: it runs once per seed of ``seeds``.
    """

    layers: str = "tail"
    runs: tuple[tuple[float, int], ...] = ((0.1, 256), (0.5, 256), (0.5, 32))
    epochs: int = 200
    lr: float = 3e-2
    weight_decay: float = 1e-4
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "runs", tuple((float(d), int(b)) for d, b in self.runs))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds:
            raise ConfigError("the trainer comparison needs at least one seed")
        if not self.runs or not all(0.0 < d <= 1.0 and b >= 1 for d, b in self.runs):
            raise ConfigError(f"runs must be (density in (0, 1], minibatch >= 1) pairs, got {self.runs}")


@dataclass(frozen=True)
class Encoder:
    """An exported model, the torch checkpoint it came from and the module-level loader of that checkpoint."""

    model: Path
    checkpoint: Path
    load: str = "lab.digits_model:load_checkpoint"  # "module:function"


def compare_trainers(
    encoders: Mapping[str, Encoder],
    draws: Mapping[str, tuple[np.ndarray, np.ndarray]],
    tests: Mapping[str, tuple[np.ndarray, np.ndarray]],
    cfg: TrainerConfig = TrainerConfig(),
    *,
    threads: int = 1,
    timeout: float = 1800.0,
) -> dict:
    """Per encoder: rows per (density, minibatch, domain) and a summary per (density, minibatch); see the module doc.

    ``draws``: the labelled training samples per domain; ``tests``: the test split per domain.
    """
    from edge.machine import load_average

    n = {len(y) for _, y in draws.values()}
    out = {"config": asdict(cfg), "samples": n.pop() if len(n) == 1 else sorted(n), "threads": threads}
    out.update(goal=GOAL, load=load_average(), encoders={})
    with tempfile.TemporaryDirectory(prefix="edge-trainers-") as tmp:
        samples = Path(tmp) / "samples.npz"
        np.savez(
            samples, **{f"x_{k}": x for k, (x, _) in draws.items()}, **{f"y_{k}": y for k, (_, y) in draws.items()}
        )
        for name, enc in encoders.items():
            runs = {}
            for role in ("device", "host"):
                work = Path(tmp) / name / role
                work.mkdir(parents=True)
                job = {
                    "role": role,
                    "model": str(enc.model),
                    "checkpoint": str(enc.checkpoint),
                    "load": enc.load,
                    "samples": str(samples),
                    "domains": list(draws),
                    "cfg": asdict(cfg),
                    "threads": threads,
                    "out": str(work),
                }
                runs[role] = _run_child(job, work, timeout)
            out["encoders"][name] = _evaluate(enc, runs, draws, tests, cfg, threads)
    out["met"] = all(
        s["ratio_worst_seed"] is not None and s["ratio_worst_seed"] >= GOAL
        for e in out["encoders"].values()
        for s in e["summary"]
    )
    return out


def _run_child(job: dict, work: Path, timeout: float) -> dict:
    path = work / "job.json"
    path.write_text(json.dumps(job))
    code = (BLOCK_TORCH if job["role"] == "device" else "") + (
        "\nimport sys\nfrom lab.bench_trainers import child_main\nchild_main(sys.argv[1])\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise EdgeError(f"the {job['role']} trainer on {job['model']} did not finish within {timeout:g} s") from e
    if done.returncode:
        raise EdgeError(
            f"the {job['role']} trainer on {job['model']} failed (exit code {done.returncode}): "
            f"{done.stderr.strip()[-2000:]}"
        )
    return json.loads((work / "result.json").read_text())


def child_main(job_path: str) -> None:
    """Body of a trainer's interpreter: train every (density, domain), write adapters and ``result.json``."""
    import importlib
    import time

    from edge.learn.space import Arch
    from edge.learn.update import limit_blas_threads
    from edge.machine import reset_peak_rss, status_mb

    job = json.loads(Path(job_path).read_text())
    cfg, out = TrainerConfig(**job["cfg"]), Path(job["out"])
    with np.load(job["samples"], allow_pickle=False) as z:
        draws = {k: (z[f"x_{k}"], z[f"y_{k}"]) for k in job["domains"]}
    rows = []
    with limit_blas_threads(job["threads"]):
        trainer = _trainer(job, cfg, importlib)
        (density, trainer.batch), (x, y) = cfg.runs[0], next(iter(draws.values()))
        trainer.train(Arch("shira", density, cfg.layers), x, y, "warm-up")  # untimed: sessions, allocators
        for density, batch, k, seed in _jobs(cfg, draws):
            trainer.batch, trainer.seed, (x, y) = batch, seed, draws[k]
            reset_peak_rss()
            before = status_mb("VmRSS")
            t0 = time.perf_counter()
            adapter = trainer.train(Arch("shira", density, cfg.layers), x, y, f"{job['role']}-{k}")
            seconds = time.perf_counter() - t0
            peak = status_mb("VmHWM")
            file = out / f"{density:g}-{batch}-{seed}-{k}.safetensors"
            adapter.save(file)
            rows.append(
                {
                    "density": density,
                    "batch": batch,
                    "seed": seed,
                    "domain": k,
                    "seconds": seconds,
                    "peak_extra_mb": None if peak is None or before is None else max(0.0, peak - before),
                    "adapter": str(file),
                }
            )
    result = {"rows": rows, "torch_imported": "torch" in sys.modules, "targets": _targets(trainer, cfg)}
    (out / "result.json").write_text(json.dumps(result))


def _trainer(job: dict, cfg: TrainerConfig, importlib):
    import onnx

    from edge.format.modelinfo import onnx_info
    from edge.learn.tail import find_tail, remember

    opts = {"epochs": cfg.epochs, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "seed": cfg.seeds[0]}
    if job["role"] == "device":
        from edge.learn.device_trainer import DeviceTrainer

        return DeviceTrainer(job["model"], threads=job["threads"], **opts)
    from exporters.host_trainer import HostTrainer

    proto = onnx.load(job["model"])
    info = onnx_info(proto)
    remember(info, find_tail(proto, info))  # the same graph-found tail the device trainer trains
    module, func = job["load"].split(":")
    load = getattr(importlib.import_module(module), func)
    return HostTrainer(Path(job["checkpoint"]), info, load=load, threads=job["threads"], **opts)


def _targets(trainer, cfg: TrainerConfig) -> list[str]:
    from edge.learn.space import Arch

    return Arch("shira", cfg.runs[0][0], cfg.layers).targets(trainer.info)


def _evaluate(enc: Encoder, runs: dict, draws, tests, cfg: TrainerConfig, threads: int) -> dict:
    """Base, host and device test accuracy of every adapter (fused in the runtime), losses and mask overlap."""
    from edge.format.adapter import load_adapter
    from edge.learn.device_trainer import DeviceTrainer
    from edge.learn.update import limit_blas_threads
    from edge.runtime import Runtime

    if runs["device"]["targets"] != runs["host"]["targets"]:
        raise EdgeError(
            f"{enc.model}: the trainers trained different tensors (device {runs['device']['targets']}, host "
            f"{runs['host']['targets']}); the comparison needs the same tail"
        )
    if runs["device"]["torch_imported"]:
        raise EdgeError(f"{enc.model}: the device trainer's interpreter imported torch despite the block")
    rows = []
    with limit_blas_threads(threads), Runtime(enc.model, threads=threads) as rt:
        numpy_fwd = DeviceTrainer(enc.model, rt.info, threads=threads)

        def acc(k: str) -> float:
            x, y = tests[k]
            return float((rt.run({rt.info.inputs[0]: x})["logits"].argmax(1) == y).mean())

        base = {k: acc(k) for k in draws}
        losses = {k: _loss(numpy_fwd.logits(x), y) for k, (x, y) in draws.items()}
        key = ("density", "batch", "domain", "seed")
        by_key = {role: {tuple(r[c] for c in key): r for r in run["rows"]} for role, run in runs.items()}
        for density, batch, k, seed in _jobs(cfg, draws):
            row = {"density": density, "batch": batch, "domain": k, "seed": seed}
            row.update(acc_base=base[k], loss_base=losses[k])
            adapters = {}
            for role in ("host", "device"):
                r = by_key[role][(density, batch, k, seed)]
                a = adapters[role] = load_adapter(r["adapter"])
                rt.load_adapter(a, name=role)
                rt.switch(role)
                row[f"acc_{role}"] = acc(k)
                rt.switch(None)
                rt.unload_adapter(role)
                row[f"loss_{role}"] = _loss(numpy_fwd.logits(draws[k][0], a), draws[k][1])
                row[f"seconds_{role}"], row[f"peak_extra_mb_{role}"] = r["seconds"], r["peak_extra_mb"]
            row["mask_overlap"] = _overlap(adapters["host"], adapters["device"])
            rows.append(row)
        name = rt.info.name
    summary = [_summarise([r for r in rows if (r["density"], r["batch"]) == run], *run) for run in cfg.runs]
    return {
        "model": str(enc.model),
        "name": name,
        "targets": runs["device"]["targets"],
        "torch_imported_on_device": runs["device"]["torch_imported"],
        "rows": rows,
        "summary": summary,
    }


def _jobs(cfg: TrainerConfig, draws: Mapping[str, tuple]):
    """``(density, minibatch, domain, seed)`` of every training, in order (see :class:`TrainerConfig` for seeds)."""
    for density, batch in cfg.runs:
        for k, (_, y) in draws.items():
            for seed in cfg.seeds if batch < len(y) else cfg.seeds[:1]:
                yield density, batch, k, seed


def _ratio(rows: Sequence[dict]) -> float | None:
    """Device gain over host gain (mean accuracy over ``rows`` minus the base's); None without a host gain."""
    base, host, device = (float(np.mean([r[k] for r in rows])) for k in ("acc_base", "acc_host", "acc_device"))
    return (device - base) / (host - base) if host > base else None


def _summarise(rows: Sequence[dict], density: float, batch: int) -> dict:
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("acc_base", "acc_host", "acc_device")}
    host_gain, device_gain = mean["acc_host"] - mean["acc_base"], mean["acc_device"] - mean["acc_base"]
    seeds = sorted({r["seed"] for r in rows})
    per_seed = [_ratio([r for r in rows if r["seed"] == s]) for s in seeds]
    return {
        "density": density,
        "batch": batch,
        "seeds": seeds,
        **mean,
        "host_gain": host_gain,
        "device_gain": device_gain,
        "ratio": _ratio(rows),
        "ratio_per_seed": per_seed,
        "ratio_worst_seed": None if None in per_seed else min(per_seed),
        "loss_base": float(np.mean([r["loss_base"] for r in rows])),
        "loss_host": float(np.mean([r["loss_host"] for r in rows])),
        "loss_device": float(np.mean([r["loss_device"] for r in rows])),
        "seconds_host": float(np.median([r["seconds_host"] for r in rows])),
        "seconds_device": float(np.median([r["seconds_device"] for r in rows])),
        "peak_extra_mb_host": _worst(r["peak_extra_mb_host"] for r in rows),
        "peak_extra_mb_device": _worst(r["peak_extra_mb_device"] for r in rows),
        "mask_overlap": float(np.mean([r["mask_overlap"] for r in rows])),
    }


def _worst(values) -> float | None:
    """The largest of ``values``; None when memory could not be read (no ``/proc/self/status``)."""
    got = [v for v in values if v is not None]
    return max(got) if got else None


def _load(v) -> str:
    return "-" if not v else ", ".join(f"{x:.2f}" for x in v)


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _loss(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def _overlap(a, b) -> float:
    """The share of entries both adapters train (over the larger count), across their tensors."""
    same = total = 0
    for p, d in a.tensors.items():
        other = b.tensors.get(p)
        ia = {tuple(c) for c in np.asarray(d.indices).T}
        ib = set() if other is None else {tuple(c) for c in np.asarray(other.indices).T}
        same, total = same + len(ia & ib), total + max(len(ia), len(ib))
    return same / total if total else 1.0


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        "### The device trainer (numpy, torch blocked) vs the host trainer (torch) on the same tail",
        "",
        f"Layer set `{c['layers']}` (found in the graph), SNIP mask, AdamW: {c['epochs']} epochs, lr {c['lr']:g}, "
        f"weight decay {c['weight_decay']:g}, {r['samples']} samples per domain; {r['threads']} thread(s); load "
        f"average {_load(r['load'])} (1, 5, 15 min) before the runs. A minibatch as large as the samples makes "
        "both trainers take the same full-batch steps, whatever the seed (one run, seed "
        f"{c['seeds'][0]}); a smaller one shuffles differently in each (numpy's and torch's generators): one run "
        f"per seed ({', '.join(map(str, c['seeds']))}). Accuracy on each domain's test split with the adapter fused "
        "in the runtime, mean over the domains (and seeds); gain = that minus the base model's; device/host = "
        "device gain / host gain, over all seeds and for the worst seed (goal >= "
        f"{r['goal']:.0%}). Loss: mean cross-entropy on the training samples, of the base model and of each "
        "adapter. Seconds: median training time per domain (device: one model run plus the epochs on the tail; "
        "host: the epochs through the whole torch model). Peak MB: extra resident memory during training, worst "
        "domain. Same mask: the share of entries both trainers picked.",
        "",
        "| encoder | tail | density | minibatch | seeds | base acc | host acc | device acc | host gain | "
        "device gain | device/host | worst seed | loss base | loss host | loss device | s host | s device | "
        "peak MB host | peak MB device | same mask |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in r["encoders"].items():
        for s in e["summary"]:
            lines.append(
                f"| {name} | {', '.join(f'`{t}`' for t in e['targets'])} | {s['density']:g} | {s['batch']} | "
                f"{len(s['seeds'])} | {s['acc_base']:.1%} | {s['acc_host']:.1%} | {s['acc_device']:.1%} | "
                f"{s['host_gain']:+.1%} | {s['device_gain']:+.1%} | **{_pct(s['ratio'])}** | "
                f"{_pct(s['ratio_worst_seed'])} | {s['loss_base']:.3f} | {s['loss_host']:.3f} | "
                f"{s['loss_device']:.3f} | {s['seconds_host']:.3f} | {s['seconds_device']:.3f} | "
                f"{_mb(s['peak_extra_mb_host'])} | {_mb(s['peak_extra_mb_device'])} | {s['mask_overlap']:.0%} |"
            )
    lines += [
        "",
        "| encoder | density | minibatch | domain | base | host (mean over seeds) | device (mean over seeds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in r["encoders"].items():
        groups: dict[tuple, list] = {}
        for row in e["rows"]:
            groups.setdefault((row["density"], row["batch"], row["domain"]), []).append(row)
        for (density, batch, k), rows in groups.items():
            host, device = (float(np.mean([x[f"acc_{t}"] for x in rows])) for t in ("host", "device"))
            lines.append(
                f"| {name} | {density:g} | {batch} | {k} | {rows[0]['acc_base']:.1%} | {host:.1%} | {device:.1%} |"
            )
    torch_free = all(not e["torch_imported_on_device"] for e in r["encoders"].values())
    lines += [
        "",
        f"Device trainer within {r['goal']:.0%} of the host trainer's gain on every encoder and run, worst seed, "
        f"with no torch imported ({'none' if torch_free else 'torch WAS imported'}): "
        f"**{'met' if r['met'] else 'not met'}**.",
        "",
    ]
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"
