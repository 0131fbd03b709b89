"""The growth search space and its costs: which adapter architectures a new adaptor may take,
what each costs on this model and device, the zero-shot proxies that rank them, and the pick.

**Search space** (:data:`SEARCH_SPACE`): adapter kind (a fusable method of
:data:`edge.format.adapter.METHODS`; only ``shira`` today), density, and which layers
(:data:`LAYER_SETS`: attention, MLP, all, the later half of the blocks, the head, the last MLP).

**Budgets.** Each candidate's cost is computed from the model's tensor shapes: entries
``nnz``; resident memory, per target, its entries times what the runtime keeps per entry of a weight of
that shape and element type once the adapter is loaded (:func:`edge.fusion.entry_bytes`: the file's indices
and values, the delta, base and new values, the switch's positions; :data:`BYTES_PER_ENTRY` for a float32
matrix); and the latency of the first inference
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
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge.errors import ConfigError
from edge.fusion import entry_bytes
from edge.registry import Registry

__all__ = [
    "BYTES_PER_ENTRY",
    "DEVICE_SPACE",
    "HEAD",
    "LAYER_SETS",
    "PROXIES",
    "SEARCH_SPACE",
    "Arch",
    "Budget",
    "Candidate",
    "candidates",
    "measure_device",
    "last_fc2",
    "select",
]

#: resident bytes per adapter entry of a float32 matrix, as the runtime keeps a loaded adapter first on its positions
#: (:func:`edge.fusion.entry_bytes`); a candidate counts each target by its own shape and element type
BYTES_PER_ENTRY = entry_bytes(4, 2)


def _by_suffix(*suffixes: str) -> Callable[[Sequence[str]], list[str]]:
    def pick(names: Sequence[str]) -> list[str]:
        return [n for n in names if any(n.endswith(f".{s}.weight") for s in suffixes)]

    return pick


def _later_blocks(names: Sequence[str]) -> list[str]:
    """Weights of the later half of the numbered blocks (``blocks.<i>``, ``layer.<i>``, ``layers.<i>``; nested
    numbers, as Swin's ``layers.<i>.blocks.<j>``, order the blocks by all of them)."""
    idx = {n: k for n in names if (k := tuple(map(int, re.findall(r"(?:^|\.)(?:blocks?|layers?)\.(\d+)(?=\.)", n))))}
    keys = sorted(set(idx.values()))
    return [n for n in names if n in idx and idx[n] >= keys[len(keys) // 2]] if keys else []


#: the names of attention and MLP projections: the digits ViT's, Hugging Face encoders' (BERT and its kin's
#: ``query``/``attention.output.dense``, DistilBERT's ``q_lin``/``lin1``, MPNet's ``attn.o``, ALBERT's ``ffn``, the
#: ``q_proj``/``fc1`` of ViT, DeiT, Dinov2 and Swin, ConvNeXt's ``pwconv1``) and decoder-style ones
_ATTN = "q k v o qkv proj query key value out_proj q_proj k_proj v_proj o_proj q_lin k_lin v_lin out_lin"
_ATTN = _by_suffix(*_ATTN.split(), "attention.output.dense", "attention.dense")
_MLP = "fc1 fc2 up_proj down_proj gate_proj lin1 lin2 intermediate.dense output.dense ffn ffn_output pwconv1 pwconv2"
_MLP = _by_suffix(*_MLP.split())


def _mlp(names: Sequence[str]) -> list[str]:
    attn = set(_ATTN(names))  # ``attention.output.dense`` ends like the MLP's ``output.dense``
    return [n for n in _MLP(names) if n not in attn]


def _all(names: Sequence[str]) -> list[str]:
    picked = set(_ATTN(names)) | set(_mlp(names))
    return [n for n in names if n in picked]


#: which 2-D weights a candidate adapts: name -> function(2-D parameter names) -> chosen names
LAYER_SETS: Registry[Callable[[Sequence[str]], list[str]]] = Registry("layer set")
LAYER_SETS.add("attn", _ATTN)
LAYER_SETS.add("mlp", _mlp)
LAYER_SETS.add("all", _all)
LAYER_SETS.add("late", lambda names: _later_blocks(_all(names)))


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

    def grown_info(self, samples: int, trainer: str, epochs: int) -> dict:
        """The ``info`` a grown adapter carries (a SNIP mask of this density on these layers), either trainer."""
        return {
            "mask": "snip",
            "density": self.density,
            "layers": self.layers,
            "grown": True,
            "samples": samples,
            "trainer": trainer,
            "epochs": epochs,
        }


HEAD = "head.weight"
_FC2 = re.compile(r"(?:^|\.)blocks?\.(\d+)\.mlp\.fc2\.weight$")


def last_fc2(names: Sequence[str]) -> list[str]:
    """The MLP output projection of the highest-numbered block (``...blocks.<i>.mlp.fc2.weight``)."""
    idx = {n: int(m.group(1)) for n in names if (m := _FC2.search(n))}
    return [max(idx, key=idx.get)] if idx else []


LAYER_SETS.add("head", lambda names: [n for n in names if n == HEAD])
LAYER_SETS.add("last-mlp", lambda names: last_fc2(names) + [n for n in names if n == HEAD])

#: the default search space: 5 densities x 4 layer sets of SHiRA
SEARCH_SPACE: tuple[Arch, ...] = tuple(
    Arch("shira", d, layers)
    for d, layers in itertools.product((0.005, 0.01, 0.02, 0.05, 0.1), ("all", "attn", "late", "mlp"))
)


#: the search space of :class:`edge.learn.device_trainer.DeviceTrainer`: 5 densities x the layer sets it can train
DEVICE_SPACE: tuple[Arch, ...] = tuple(
    Arch("shira", d, layers) for d, layers in itertools.product((0.02, 0.05, 0.1, 0.2, 0.5), ("head", "last-mlp"))
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
        above ``resident_mb`` (default: this process's peak resident memory so far). Given the
        :class:`~edge.runtime.Runtime` it will load into, the adapter gets the room that runtime's
        memory budget has left for adapters (``footprint["room_mb"]``: what its ``load_adapter`` checks),
        and the latency budget of its device profile.
        """
        if hasattr(profile, "footprint") and hasattr(profile, "load_adapter"):  # a Runtime
            room, device = profile.footprint["room_mb"], profile.device
            lat = None if device is None else device.budgets.latency_p95_ms
            if room is None and lat is None:
                raise ConfigError("the runtime has no budget: give it a device profile (Runtime(model, device=...))")
            return cls(math.inf if room is None else max(0.0, room), math.inf if lat is None else float(lat))
        b = getattr(profile, "budgets", profile)
        mem = getattr(b, "memory_mb", None)
        lat = getattr(b, "latency_ms", getattr(b, "latency_p95_ms", None))
        if mem is None and lat is None:
            raise ConfigError(f"{type(profile).__name__} has no budgets.memory_mb or budgets.latency_ms")
        if mem is not None:
            if resident_mb is None:
                from edge.machine import peak_rss_mb

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
    from edge.machine import p50, time_calls

    if isinstance(x, Mapping):  # a model of several inputs (token ids, masks): one sample of each
        one = {k: np.ascontiguousarray(v[:1]) for k, v in x.items()}
    else:
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
    from edge.format.adapter import METHODS

    out = []
    for arch in space:
        if arch.kind not in METHODS or not METHODS.get(arch.kind).get("fusable"):
            raise ConfigError(f"adapter kind {arch.kind!r} is not a fusable method; known: {METHODS.names()}")
        if not 0.0 < arch.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {arch.density} in {arch}")
        targets = arch.targets(info)
        if not targets:
            continue  # this layer set does not exist in this model
        counts = {t: max(1, round(arch.density * math.prod(info.tensors[t].shape))) for t in targets}
        nnz = sum(counts.values())
        mem = sum(n * _entry_bytes(info.tensors[t]) for t, n in counts.items()) / 2**20
        lat = device["infer_ms"] + device["switch_ns_per_entry"] * nnz / 1e6
        out.append(Candidate(arch, tuple(targets), nnz, mem, lat, mem <= budget.memory_mb and lat <= budget.latency_ms))
    if not out:
        flat = sum(len(t.shape) == 2 for t in info.tensors.values())
        raise ConfigError(
            f"no architecture of the search space matches model {info.name!r}'s layers (the search space adapts 2-D "
            f"weights by name; the model has {flat} of its {len(info.tensors)} targets 2-D); "
            "for any model pass space=edge.learn.tail.TAIL_SPACE"
        )
    return out


def _entry_bytes(t) -> int:
    """What the runtime keeps per entry of a new adapter on target ``t`` (a TensorInfo), once loaded."""
    return entry_bytes(np.dtype(t.dtype).itemsize, len(t.shape))


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
