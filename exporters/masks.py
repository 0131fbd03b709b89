"""Structured SHiRA masks: entries in runs that are contiguous in the weight's *stored* layout.

A switch writes an adapter's entries into the runtime's float32 arena. numpy's per-element
indexing, not memory, bounds that write, so entries that sit in long contiguous runs of
the stored tensor can be copied as runs. Units, each ranked by the mean of an unstructured
score over the unit:

``block16``  aligned runs of 16 floats (one 64-byte cache line) of the stored tensor,
             flattened in C order (along its last axis, wrapping into the next row when
             the row length is not a multiple of 16);
``block4``   the same with runs of 4 floats (16 bytes): four times as many runs for the
             same count;
``rows``     whole stored rows: the stored tensor as ``[shape[0], -1]`` (a matrix row, a
             conv filter ``[in, *kernel]``, an embedding vector).

Blocks are spread over the stored rows: every row's best block (rows ordered by it) comes
before any row's second best. A block lies in one stored row, for a matrix one input
feature (or one output), so its delta has rank one: a block mask's delta has rank at most
the number of rows it touches, and spreading makes that as high as the count allows. That
rank, more than which blocks are chosen, is what a structured mask costs in accuracy: at
1 % of a 64-wide matrix (41 entries) cache-line runs allow rank 3, runs of 4 rank 10; at
1 % of a 384-wide one, 92 cache-line runs (the ``masks`` section of BENCHMARKS.md).
Choosing other blocks did not close the gap on the demo domains (``block4`` at 1 %, seed 0
unless said): scored by the domain's own gradients (``|g|``, ``g**2``, ``|sum g|``, ``|w g|``),
by a short dense fine-tune's ``|delta|`` or by the block's largest ``|w|``; unaligned runs;
one block per column group too; blocks chosen across tensors instead of per tensor: 0 to 7
points below the mean ``|w|`` spread over rows. ``|w|`` times the input feature's norm on
the domain's data (Wanda) was 0.2 points above it over three seeds: within seed noise.

Registered kinds are ``{unit}-{score}`` for the scores ``random``, ``wm``, ``grad`` and
``snip`` of :mod:`exporters.shira` (``block16-snip``, ``rows-wm``, ...). Units are taken
in rank order and entries within a unit in stored order, so ``make_masks`` keeps its exact
count: whole units and at most one partial unit (a contiguous prefix of it).

The stored layout comes from ``make_masks(..., layout=stored_layout(info))``: our ONNX
export stores MatMul weights as ``[in, out]``, the transpose of torch's ``[out, in]``, so
there a run of 16 is 16 consecutive torch *rows* of one torch column. Indices are
returned in the torch layout, as for every mask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from edge.errors import ConfigError
from edge.format.modelinfo import TensorInfo

__all__ = [
    "BLOCK",
    "STRUCTURED",
    "UNITS",
    "random_structured",
    "register_structured",
    "stored_layout",
    "stored_offsets",
    "stored_runs",
    "transposed_targets",
    "unit_ranks",
]

BLOCK = 16  # floats per cache line
UNITS = ("block4", "block16", "rows")
_LENGTH = {"block4": 4, "block16": BLOCK}  # floats per run of the block units
_SCORES = ("random", "wm", "grad", "snip")  # unstructured kinds of exporters.shira that units are scored by
STRUCTURED: tuple[str, ...] = tuple(f"{u}-{s}" for u in UNITS for s in _SCORES)
_LAYOUTS = ("transposed", "as-is")


def unit_ranks(scores: np.ndarray, unit: str) -> np.ndarray:
    """Rank (0 = taken first) of every entry of a stored tensor: units in rank order, then stored order.

    ``scores`` has the stored shape. ``rows`` ranks rows by mean score; block units rank
    blocks first by their rank among the blocks of their stored row (a block's row is its
    first entry's), then by mean score: one block per row before a second in any row.
    Ties go to the lower stored offset.
    """
    if unit not in UNITS:
        raise ConfigError(f"unknown mask unit {unit!r}; known units: {list(UNITS)}")
    shape = np.shape(scores)
    flat = np.asarray(scores, np.float64).reshape(-1)
    length = _LENGTH.get(unit) or flat.size // shape[0]
    ids = np.arange(flat.size) // length
    count = np.bincount(ids)
    mean = np.bincount(ids, weights=np.nan_to_num(flat, nan=-np.inf)) / count
    order = np.argsort(-mean, kind="stable")  # units by mean score
    if unit != "rows":
        row = (np.arange(count.size) * length) // (flat.size // shape[0])  # stored row of each block's first entry
        by_row = order[np.argsort(row[order], kind="stable")]  # grouped by row, best first within a row
        first = np.searchsorted(row[by_row], row[by_row])  # where each block's row starts in by_row
        in_row = np.empty(count.size, np.int64)
        in_row[by_row] = np.arange(count.size) - first
        order = order[np.argsort(in_row[order], kind="stable")]  # round-robin over rows, by score within a round
    unit_rank = np.empty(order.size, np.int64)
    unit_rank[order] = np.arange(order.size)
    start = np.concatenate([[0], np.cumsum(count[order])[:-1]])  # first entry rank of each unit, by unit rank
    return start[unit_rank[ids]] + (np.arange(flat.size) - ids * length)


def _structured(unit: str, base: Callable) -> Callable:
    def score(weight, grad_abs, rng):
        import torch

        inner = base(weight, grad_abs, rng).detach().double().numpy()
        return torch.from_numpy(-unit_ranks(inner.reshape(tuple(weight.shape)), unit).astype(np.float64)).reshape(
            tuple(weight.shape)
        )

    score.__qualname__ = f"structured[{unit}, {getattr(base, '__qualname__', base)}]"
    return score


def register_structured(register: Callable, masks: Mapping) -> None:
    """Register ``{unit}-{score}`` for each unit and unstructured score kind in ``masks``.

    ``register`` is :func:`exporters.shira.register_mask` and ``masks`` its registry
    (passed in, so this module does not import :mod:`exporters.shira`, which imports it).
    """
    for unit in UNITS:
        for name in _SCORES:
            kind = masks[name]
            register(f"{unit}-{name}", needs_calib=kind.needs_calib)(_structured(unit, kind.score))


def stored_layout(info) -> dict[str, str]:
    """``{param: "transposed" | "as-is"}`` of an exported model's :class:`~edge.format.modelinfo.ModelInfo`."""
    return {k: "transposed" if t.transposed else "as-is" for k, t in info.tensors.items()}


def transposed_targets(layout: Mapping[str, str] | None, shapes: Mapping[str, object]) -> set[str]:
    """The names among ``shapes`` (param -> weight) that ``layout`` says are stored transposed (2-D only)."""
    if layout is None:
        return set()
    bad = {k: v for k, v in layout.items() if v not in _LAYOUTS}
    if bad:
        raise ConfigError(f"layout values must be one of {list(_LAYOUTS)}; got {bad}")
    flipped = {k for k, w in shapes.items() if layout.get(k) == "transposed"}
    not_2d = sorted(k for k in flipped if len(tuple(shapes[k].shape)) != 2)
    if not_2d:
        raise ConfigError(f"only 2-D weights can be stored transposed; {not_2d} are not 2-D")
    return flipped


def stored_offsets(indices: np.ndarray, shape: tuple[int, ...], transposed: bool) -> np.ndarray:
    """Sorted flat offsets in the stored tensor of torch-layout ``indices`` ``[ndim, N]`` (as the runtime maps them)."""
    return np.sort(TensorInfo("", tuple(shape), transposed).stored_offsets(indices))


def stored_runs(indices: np.ndarray, shape: tuple[int, ...], transposed: bool) -> int:
    """Number of maximal runs of consecutive stored offsets that ``indices`` cover."""
    flat = stored_offsets(indices, shape, transposed)
    return int(flat.size and 1 + np.count_nonzero(np.diff(flat) != 1))


def random_structured(
    shape: tuple[int, ...], transposed: bool, density: float, unit: str | None, rng: np.random.Generator
) -> np.ndarray:
    """Torch-layout indices ``[ndim, N]`` (sorted) of a random mask of ``unit`` (``None``: unstructured), no torch.

    For timing on exported models: the same count ``max(1, round(density * numel))`` as
    :func:`exporters.shira.make_masks`, and the same units.
    """
    shape = tuple(int(s) for s in shape)
    stored = (shape[1], shape[0]) if transposed else shape
    size = int(np.prod(shape))
    n = max(1, int(round(density * size)))
    if unit is None:
        flat = rng.choice(size, n, replace=False)
    else:
        flat = np.argsort(unit_ranks(rng.random(stored), unit), kind="stable")[:n]
    idx = np.stack(np.unravel_index(flat, stored))
    if transposed:
        idx = idx[::-1]
    order = np.lexsort(idx[::-1])  # row-major in the torch layout
    return np.ascontiguousarray(idx[:, order]).astype(np.int64)
