"""Growing a new adaptor: search space, budgets, a zero-shot proxy, and a trainer hook.

When the router (:mod:`edge.router`) has collected enough persistently novel inputs,
:func:`grow` picks an adapter architecture and trains it::

    budget = Budget.of(profile)                       # or Budget(memory_mb=0.1, latency_ms=5.0)
    result = grow(rt, x, y, trainer=HostTrainer(ckpt, rt.info), budget=budget, name="new-1")
    rt.load_adapter(result.adapter)

**Search space** (:data:`SEARCH_SPACE`): adapter kind (a fusable method of
:data:`edge.adapters.METHODS`; only ``shira`` today), density, and which layers
(:data:`LAYER_SETS`: attention, MLP, all, or the later half of the blocks).

**Budgets.** Each candidate's cost is computed from the model's tensor shapes: entries
``nnz``; resident memory ``nnz * BYTES_PER_ENTRY`` (the file's indices and values plus
what the runtime prepares for a fused switch); and the latency of the first inference
after switching to it, ``infer_ms + switch_ns_per_entry * nnz`` (fused adapters add no
steady-state inference cost), from timings measured on this device by
:func:`measure_device`. Candidates over the memory or latency budget are dropped.

**Zero-shot proxy** (:data:`PROXIES`), computed once on the novel inputs, no training:
``snip`` sums the largest ``|w * dL/dw|`` entries a candidate could train (the SNIP mask
it would get), as a share of all entries' saliency: how much first-order loss change the
candidate can reach. ``params`` is the trainable count (ANCHORS: often as good). The
pick is the cheapest feasible candidate whose proxy reaches ``knee`` of the best
feasible proxy: where saliency saturates with density, this stops where more entries
buy little. Checked once on the demo (256 inverted digits, all 16 candidates of 4
densities x 4 layer sets trained for 30 epochs): Spearman rank correlation with the
accuracy reached was 0.96 for ``snip`` and 0.97 for ``params``; at equal entry count
``snip`` ranked the layer sets all > attn > mlp > late, accuracy all > late ~ attn > mlp.
On that shift accuracy kept rising with density, so the pick is the largest candidate
the budget allows.

**Trainer hook** (:data:`TRAINERS`): an object with ``train(arch, x, y, name) -> Adapter``
and optionally ``saliency(x, y, params) -> {param: |w * grad|}`` (``snip`` needs it).
``host`` (:class:`HostTrainer`) trains on the host through :mod:`exporters.shira`
(imported lazily: it needs torch); a device-side trainer (the on-device update module)
registers itself here under another name and plugs into :func:`grow` unchanged.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from edge.errors import ConfigError
from edge.registry import Registry

__all__ = [
    "BYTES_PER_ENTRY",
    "LAYER_SETS",
    "PROXIES",
    "SEARCH_SPACE",
    "TRAINERS",
    "Arch",
    "Budget",
    "Candidate",
    "GrowthJob",
    "GrowthResult",
    "HostTrainer",
    "candidates",
    "grow",
    "measure_device",
    "select",
]

#: resident bytes per adapter entry: file (2 int32 indices + 1 float32 value) and the runtime's
#: prepared switch (int64 positions, delta, base and merged values, backend write lists)
BYTES_PER_ENTRY = 52


def _by_suffix(*suffixes: str) -> Callable[[Sequence[str]], list[str]]:
    def pick(names: Sequence[str]) -> list[str]:
        return [n for n in names if any(n.endswith(f".{s}.weight") for s in suffixes)]

    return pick


def _later_blocks(names: Sequence[str]) -> list[str]:
    """Linear weights of the later half of the numbered blocks (``...blocks.<i>...``)."""
    idx = {n: int(m.group(1)) for n in names if (m := re.search(r"(?:^|\.)blocks?\.(\d+)\.", n))}
    if not idx:
        return []
    cut = (max(idx.values()) + 1) // 2
    return [n for n in names if idx.get(n, -1) >= cut]


#: which 2-D weights a candidate adapts: name -> function(2-D parameter names) -> chosen names
LAYER_SETS: Registry[Callable[[Sequence[str]], list[str]]] = Registry("layer set")
LAYER_SETS.add("attn", _by_suffix("q", "k", "v", "proj", "query", "key", "value", "out_proj"))
LAYER_SETS.add("mlp", _by_suffix("fc1", "fc2", "dense", "up_proj", "down_proj"))
LAYER_SETS.add("all", _by_suffix("q", "k", "v", "proj", "fc1", "fc2"))
LAYER_SETS.add("late", lambda names: _later_blocks(_by_suffix("q", "k", "v", "proj", "fc1", "fc2")(names)))


@dataclass(frozen=True)
class Arch:
    """One point of the search space."""

    kind: str = "shira"
    density: float = 0.02
    layers: str = "all"

    def targets(self, info) -> list[str]:
        """The model's parameters this architecture adapts (2-D, matched by :data:`LAYER_SETS`)."""
        names = [k for k, t in info.tensors.items() if len(t.shape) == 2]
        return LAYER_SETS.get(self.layers)(names)

    def __str__(self) -> str:
        return f"{self.kind}/{self.layers}@{self.density:g}"


#: the default search space: 5 densities x 4 layer sets of SHiRA
SEARCH_SPACE: tuple[Arch, ...] = tuple(
    Arch("shira", d, layers) for d, layers in itertools.product((0.005, 0.01, 0.02, 0.05, 0.1), LAYER_SETS.names())
)


@dataclass(frozen=True)
class Budget:
    """What a new adapter may cost: resident memory (MB) and first-inference-after-switch latency (ms)."""

    memory_mb: float = math.inf
    latency_ms: float = math.inf

    @classmethod
    def of(cls, profile, resident_mb: float | None = None) -> Budget:
        """From a device profile (``.budgets.memory_mb``, ``.budgets.latency_ms`` or ``latency_p95_ms``).

        A profile's memory budget is for the whole process: the adapter gets what is left
        above ``resident_mb`` (default: this process's peak resident memory so far).
        """
        b = getattr(profile, "budgets", profile)
        mem = getattr(b, "memory_mb", None)
        lat = getattr(b, "latency_ms", getattr(b, "latency_p95_ms", None))
        if mem is None and lat is None:
            raise ConfigError(f"{type(profile).__name__} has no budgets.memory_mb or budgets.latency_ms")
        if mem is not None:
            if resident_mb is None:
                from edge._machine import peak_rss_mb

                resident_mb = peak_rss_mb()
            mem = float(mem) - resident_mb
        return cls(math.inf if mem is None else mem, math.inf if lat is None else float(lat))


@dataclass(frozen=True)
class Candidate:
    """An architecture with its cost on this model and device, and its proxy score."""

    arch: Arch
    targets: tuple[str, ...]
    nnz: int
    memory_mb: float
    latency_ms: float
    fits: bool
    proxy: float = float("nan")

    def as_dict(self) -> dict:
        return {
            "arch": str(self.arch),
            "nnz": self.nnz,
            "memory_mb": round(self.memory_mb, 4),
            "latency_ms": round(self.latency_ms, 4),
            "fits": self.fits,
            "proxy": None if math.isnan(self.proxy) else round(self.proxy, 4),
        }


def measure_device(runtime, x: np.ndarray, nnz: Mapping[str, int] | None = None, runs: int = 30) -> dict:
    """Batch-1 inference p50 (ms) and switch cost per adapter entry (ns) of ``runtime`` on this device.

    The switch cost is timed over loaded adapters whose entry counts ``nnz`` gives
    (name -> entries); without them a conservative 100 ns per entry is assumed and the
    result says so.
    """
    from edge.benchmarks import p50, time_calls

    one = {runtime.info.inputs[0]: np.ascontiguousarray(x[:1])}
    infer_ms = p50(time_calls(lambda: runtime.run(one), runs))
    names = [n for n in (nnz or {}) if n in runtime.adapters]
    if not names:
        return {"infer_ms": infer_ms, "switch_ns_per_entry": 100.0, "switch_measured": False}
    active, ns = runtime.active, []
    for i in range(4 * len(names)):
        a = names[i % len(names)]
        t0 = time.perf_counter()
        runtime.switch(a)
        ns.append((time.perf_counter() - t0) * 1e9 / max(1, nnz[a]))
        runtime.wait_settled()
    runtime.switch(active or None)
    runtime.wait_settled()
    return {"infer_ms": infer_ms, "switch_ns_per_entry": float(np.median(ns)), "switch_measured": True}


def candidates(info, budget: Budget, device: Mapping[str, float], space: Sequence[Arch] = SEARCH_SPACE) -> list:
    """Cost every architecture of ``space`` on model ``info`` and mark which fit ``budget``."""
    from edge.adapters import METHODS

    out = []
    for arch in space:
        if arch.kind not in METHODS or not METHODS.get(arch.kind).get("fusable"):
            raise ConfigError(f"adapter kind {arch.kind!r} is not a fusable method; known: {METHODS.names()}")
        if not 0.0 < arch.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {arch.density} in {arch}")
        targets = arch.targets(info)
        if not targets:
            continue  # this layer set does not exist in this model
        nnz = sum(max(1, round(arch.density * math.prod(info.tensors[t].shape))) for t in targets)
        mem = nnz * BYTES_PER_ENTRY / 2**20
        lat = device["infer_ms"] + device["switch_ns_per_entry"] * nnz / 1e6
        out.append(Candidate(arch, tuple(targets), nnz, mem, lat, mem <= budget.memory_mb and lat <= budget.latency_ms))
    if not out:
        raise ConfigError(f"no architecture of the search space matches model {info.name!r}'s layers")
    return out


# -- proxies ---------------------------------------------------------------------------------
def _params_proxy(cands, trainer, x, y) -> list[float]:
    return [math.log1p(c.nnz) for c in cands]


def _snip_proxy(cands, trainer, x, y) -> list[float]:
    if not hasattr(trainer, "saliency"):
        raise ConfigError(f"proxy 'snip' needs a trainer with saliency(x, y, params); {trainer!r} has none")
    params = sorted({t for c in cands for t in c.targets})
    sal = {k: np.sort(np.asarray(v, np.float64).ravel())[::-1] for k, v in trainer.saliency(x, y, params).items()}
    total = sum(float(s.sum()) for s in sal.values()) or 1.0
    cum = {k: np.concatenate([[0.0], np.cumsum(s)]) for k, s in sal.items()}
    return [sum(cum[t][max(1, round(c.arch.density * len(sal[t])))] for t in c.targets) / total for c in cands]


#: zero-shot proxies: name -> function(candidates, trainer, x, y) -> one score per candidate (higher = better)
PROXIES: Registry[Callable] = Registry("zero-shot proxy")
PROXIES.add("snip", _snip_proxy)
PROXIES.add("params", _params_proxy)


def select(cands: Sequence[Candidate], knee: float = 0.9) -> Candidate:
    """The cheapest fitting candidate whose proxy is at least ``knee`` times the best fitting proxy."""
    fit = [c for c in cands if c.fits]
    if not fit:
        cheapest = min(cands, key=lambda c: c.nnz)
        raise ConfigError(
            f"no adapter architecture fits the budget; the smallest ({cheapest.arch}) needs "
            f"{cheapest.memory_mb:.4f} MB and {cheapest.latency_ms:.3f} ms. Raise the budget or add smaller "
            "candidates to the search space"
        )
    best = max(c.proxy for c in fit)
    return min((c for c in fit if c.proxy >= knee * best), key=lambda c: (c.nnz, -c.proxy))


@dataclass(frozen=True)
class GrowthResult:
    adapter: object  # edge.adapters.Adapter
    chosen: Candidate
    candidates: list = field(default_factory=list)
    train_s: float = 0.0
    proxy: str = "snip"

    def as_dict(self) -> dict:
        return {
            "adapter": self.adapter.name,
            "chosen": self.chosen.as_dict(),
            "proxy": self.proxy,
            "train_s": round(self.train_s, 2),
            "candidates": [c.as_dict() for c in self.candidates],
        }


def grow(
    runtime,
    x: np.ndarray,
    y: np.ndarray,
    *,
    trainer,
    budget: Budget = Budget(),
    name: str = "grown",
    space: Sequence[Arch] = SEARCH_SPACE,
    proxy: str = "snip",
    knee: float = 0.9,
    device: Mapping[str, float] | None = None,
) -> GrowthResult:
    """Pick an architecture for labelled novel inputs ``(x, y)`` under ``budget`` and train it with ``trainer``."""
    _check_labelled(x, y)
    device = dict(device or measure_device(runtime, x))
    return _grow(runtime.info, x, y, trainer, budget, name, space, proxy, knee, device)


def _check_labelled(x: np.ndarray, y: np.ndarray) -> None:
    y = np.asarray(y)
    if len(x) != len(y) or not len(x):
        raise ConfigError(f"growth needs labelled inputs, got {len(x)} inputs and {len(y)} labels")
    if (y < 0).any():
        raise ConfigError(f"{int((y < 0).sum())} of {len(y)} novel inputs have no label; growth trains supervised")


def _grow(info, x, y, trainer, budget, name, space, proxy, knee, device) -> GrowthResult:
    y = np.asarray(y, np.int64)
    cands = candidates(info, budget, device, space)
    feasible = [c for c in cands if c.fits]
    scores = dict(zip(map(id, feasible), PROXIES.get(proxy)(feasible, trainer, x, y))) if feasible else {}
    cands = [replace(c, proxy=scores.get(id(c), float("nan"))) for c in cands]
    chosen = select(cands, knee)
    t0 = time.perf_counter()
    adapter = trainer.train(chosen.arch, x, y, name)
    return GrowthResult(adapter, chosen, cands, time.perf_counter() - t0, proxy)


# -- in the background ---------------------------------------------------------------------------
class GrowthJob:
    """:func:`grow` in a child process at low CPU priority, so the stream keeps being served meanwhile.

        job = GrowthJob(rt, x, y, trainer=trainer, budget=budget, name="new-1", device=device, workdir=d)
        ...                                   # keep calling router.process(...)
        if job.done():
            result = job.result()             # the adapter, read back from the file the child wrote
            rt.load_adapter(result.adapter, name="new-1")

    The child (``spawn``: a fresh interpreter, nothing inherited) gets the trainer, the
    labelled inputs, the model's :class:`~edge.modelinfo.ModelInfo`, budget and device
    timings; it lowers its priority by ``nice`` (POSIX), runs the proxy search and the
    training, and writes ``<workdir>/<name>.safetensors`` (the standard adapter format,
    written atomically) and ``<name>.growth.json`` (the choice, the candidates, the
    training time, or the error). The parent reads them back with
    :func:`~edge.adapters.load_adapter`: nothing is unpickled on the way back. The
    device timings (``device``) must be measured beforehand (:func:`measure_device`),
    since the child has no runtime.
    """

    def __init__(
        self,
        runtime,
        x: np.ndarray,
        y: np.ndarray,
        *,
        trainer,
        workdir,
        device: Mapping[str, float],
        budget: Budget = Budget(),
        name: str = "grown",
        space: Sequence[Arch] = SEARCH_SPACE,
        proxy: str = "snip",
        knee: float = 0.9,
        nice: int = 10,
    ) -> None:
        import multiprocessing
        from pathlib import Path

        _check_labelled(x, y)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ConfigError(f"adapter name {name!r} must be letters, digits, '.', '_' or '-' (it names a file)")
        PROXIES.get(proxy)  # unknown names fail here, not in the child
        self.name, self.workdir = name, Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.adapter_path = self.workdir / f"{name}.safetensors"
        self.report_path = self.workdir / f"{name}.growth.json"
        for p in (self.adapter_path, self.report_path):
            p.unlink(missing_ok=True)
        args = (runtime.info, np.asarray(x), np.asarray(y, np.int64), trainer, budget, name, tuple(space), proxy, knee)
        self.started = time.perf_counter()
        self._proc = multiprocessing.get_context("spawn").Process(
            target=_grow_child,
            args=(*args, dict(device), str(self.adapter_path), str(self.report_path), nice),
            name=f"edge-grow-{name}",
            daemon=True,
        )
        self._proc.start()
        self._result: GrowthResult | None = None

    def done(self) -> bool:
        """The child has finished (successfully or not)."""
        return self._result is not None or not self._proc.is_alive()

    def result(self, timeout: float | None = None) -> GrowthResult:
        """Wait for the child (up to ``timeout`` s) and return what it grew; raises what it failed with."""
        import json

        from edge.adapters import load_adapter
        from edge.errors import EdgeError

        if self._result is not None:
            return self._result
        self._proc.join(timeout)
        if self._proc.is_alive():
            raise TimeoutError(f"growing {self.name!r} is still running after {timeout} s")
        try:
            report = json.loads(self.report_path.read_text())
        except (OSError, ValueError) as e:
            raise EdgeError(
                f"growing {self.name!r} failed: the child exited with code {self._proc.exitcode} and left no "
                f"readable report ({e})"
            ) from None
        if "error" in report:
            raise (ConfigError if report.get("type") == "ConfigError" else EdgeError)(
                f"growing {self.name!r} failed in the child: {report['error']}"
            )
        adapter = load_adapter(self.adapter_path)
        cands = [Candidate(**{**c, "arch": Arch(**c["arch"]), "targets": tuple(c["targets"])}) for c in report["cands"]]
        self._result = GrowthResult(adapter, cands[report["chosen"]], cands, report["train_s"], report["proxy"])
        return self._result

    def cancel(self) -> None:
        """Stop the child (its partial files are never read)."""
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)


def _grow_child(info, x, y, trainer, budget, name, space, proxy, knee, device, adapter_path, report_path, nice):
    """Body of :class:`GrowthJob`'s child process."""
    import dataclasses
    import json
    import os
    from pathlib import Path

    from edge._io import atomic_write_bytes

    if nice and hasattr(os, "nice"):
        os.nice(nice)
    try:
        res = _grow(info, x, y, trainer, budget, name, space, proxy, knee, device)
        res.adapter.save(adapter_path)
        report = {
            "cands": [dataclasses.asdict(c) for c in res.candidates],
            "chosen": res.candidates.index(res.chosen),
            "train_s": res.train_s,
            "proxy": res.proxy,
        }
    except Exception as e:  # reported to the parent, which raises it there
        report = {"error": f"{type(e).__name__}: {e}", "type": type(e).__name__}
    atomic_write_bytes(Path(report_path), json.dumps(report).encode())


# -- trainers --------------------------------------------------------------------------------
#: trainer factories by name: "host" trains with torch via exporters; the on-device updater adds its own
TRAINERS: Registry[Callable] = Registry("adapter trainer")


@TRAINERS.register("host")
class HostTrainer:
    """Train a SHiRA adapter on the host with :func:`exporters.shira.train_shira` (needs torch).

    ``checkpoint`` is the torch checkpoint the ONNX model ``info`` was exported from
    (``load`` reads it; default: the digits encoder's loader). Masks are SNIP, as in
    the demo's pre-trained adapters.
    """

    def __init__(
        self, checkpoint, info, *, epochs: int = 30, lr: float = 1e-2, seed: int = 0, threads: int | None = 1, load=None
    ) -> None:
        self.checkpoint, self.info, self.epochs, self.lr, self.seed = checkpoint, info, epochs, lr, seed
        self.threads = threads  # torch intra-op threads while training (small models train faster on one)
        self._load = load
        self._model = None

    def model(self):
        if self._model is None:
            from edge.commands import host_needed

            host_needed("growing an adapter with the host trainer")
            if self._load is None:
                from exporters.digits_model import load_checkpoint as load
            else:
                load = self._load
            self._model = load(self.checkpoint)
        return self._model

    def saliency(self, x: np.ndarray, y: np.ndarray, params: Sequence[str]) -> dict[str, np.ndarray]:
        """``|w * dL/dw|`` of each parameter on ``(x, y)`` (mean cross-entropy), at the base weights."""
        from exporters.shira import saliency

        return saliency(self.model(), x, y, params)

    def train(self, arch: Arch, x: np.ndarray, y: np.ndarray, name: str):
        from exporters import shira
        from exporters.pipeline import to_adapter

        trained = shira.train_snip(
            self.model(),
            arch.targets(self.info),
            x,
            y,
            density=arch.density,
            epochs=self.epochs,
            lr=self.lr,
            seed=self.seed,
            threads=self.threads,
        )
        meta = {"mask": "snip", "density": arch.density, "layers": arch.layers, "grown": True, "samples": len(x)}
        return to_adapter(trained, self.info, name, meta)


from edge import growth_device as _growth_device  # noqa: E402,F401  registers TRAINERS["device"] and layer sets head, last-mlp
