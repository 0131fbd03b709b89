"""The adapter pairs ``edge bench masks`` times on MiniLM: per mask unit, a random kind and the wm-family kind.

No training: two adapters A and B per kind with random values, on MiniLM's target tensors at
one density. Per unit (unstructured, ``block4``, ``block16``, ``rows``, :data:`UNITS`):

``random`` kinds (``random``, ``block4-random``, ...)  A and B each draw their own random mask
    (:func:`exporters.masks.random_structured`) from its own seed: different positions, as two adapters
    whose masks differ (snip and grad masks are scored on each domain's own gradients);
``wm`` kinds (``wm``, ``block4-wm``, ...)  the mask :func:`exporters.shira.make_masks` scores on
    MiniLM's own stored base weights (``|w|`` in the stored layout, :func:`exporters.masks.stored_layout`;
    MiniLM's export stores MatMul weights transposed), the kinds the accuracy part judges. A
    weight-magnitude mask is a function of the base weights alone, so every adapter of one model
    trained with that kind writes the same entries: A and B share positions
    (:func:`same_positions`) and differ only in values.

The runtime shares the base values and the undo of adapters on the same positions
(``edge.fusion.same_positions``), and a switch from one to the other writes only the new values
over the old ones (no undo pass first): the product's default path, its default mask being ``wm``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SCORES", "UNITS", "kind_name", "minilm_pairs", "same_positions", "weights_module"]

UNITS = (None, "block4", "block16", "rows")  # None: unstructured
SCORES = ("random", "wm")  # per unit: A and B on their own random masks; on the one wm mask of the model


def kind_name(unit: str | None, score: str) -> str:
    """``random``, ``wm``, ``block4-random``, ``block4-wm``, ...: names registered in :data:`exporters.shira.MASKS`."""
    return score if unit is None else f"{unit}-{score}"


def same_positions(a, b) -> bool:
    """Whether adapters ``a`` and ``b`` (:class:`edge.format.adapter.Adapter`) write exactly the same entries."""
    if a.tensors.keys() != b.tensors.keys():
        return False
    for t, da in a.tensors.items():
        ia, ib = np.asarray(da.indices), np.asarray(b.tensors[t].indices)
        if ia.shape != ib.shape:
            return False
        shape = tuple(a.shapes[t])
        if not np.array_equal(np.sort(np.ravel_multi_index(ia, shape)), np.sort(np.ravel_multi_index(ib, shape))):
            return False
    return True


def weights_module(weights: dict):
    """A torch module whose ``named_parameters()`` are ``weights`` (name -> numpy array, source layout), no copy.

    Dotted names become nested submodules, so :func:`exporters.shira.make_masks` scores them as it scores a
    trained model's parameters.
    """
    import torch

    root = torch.nn.Module()
    for name, w in weights.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, torch.nn.Parameter(torch.from_numpy(np.asarray(w)), requires_grad=False))
    return root


def minilm_pairs(info, base: dict, density: float) -> tuple[dict, dict]:
    """``({kind: (A, B)}, {kind: {"structured", "unit", "same_positions", "entries", "runs_per_entry"}})``.

    ``base`` maps each target tensor to its base weight in the source layout (``Runtime.weights``). Kinds are
    ordered unit by unit, random before wm, so the rounds of the switch timing interleave them.
    """
    from edge.format.adapter import Adapter, SparseDelta
    from exporters.masks import random_structured, stored_layout, stored_runs
    from exporters.shira import make_masks

    names = list(base)
    module = weights_module(base)
    adapters, per_kind = {}, {}
    for unit in UNITS:
        for score in SCORES:
            kind = kind_name(unit, score)
            shared = None
            if score == "wm":  # one mask for the model: scored once, A and B on it
                shared = make_masks(module, names, density=density, kind=kind, layout=stored_layout(info))
            pair, runs, nnz = [], 0, 0
            for seed, label in ((1, "A"), (2, "B")):
                rng = np.random.default_rng([seed, len(kind)])
                tensors, shapes = {}, {}
                for t in names:
                    ti = info.tensors[t]
                    idx = shared[t] if shared else random_structured(ti.shape, ti.transposed, density, unit, rng)
                    values = (rng.standard_normal(idx.shape[1]) * 1e-2).astype("f4")
                    tensors[t] = SparseDelta(idx.astype(np.int32), values)
                    shapes[t] = tuple(ti.shape)
                    runs, nnz = runs + stored_runs(idx, ti.shape, ti.transposed), nnz + idx.shape[1]
                pair.append(Adapter(f"{kind}:{label}", info.fingerprint, tensors, shapes, info={"mask": kind}))
            adapters[kind] = tuple(pair)
            per_kind[kind] = {
                "structured": unit is not None,
                "unit": unit or "unstructured",
                "same_positions": same_positions(*pair),
                "entries": nnz // 2,
                "runs_per_entry": runs / nnz,
            }
    return adapters, per_kind
