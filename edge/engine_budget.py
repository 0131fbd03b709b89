"""``backend="auto"`` under a memory budget: the engines that fit it, checked before any is built to be measured.

:func:`edge.engines.compare_engines` builds every candidate engine to time it; on a small device that build alone
can exceed ``budgets.memory_mb``. :func:`fit_budget` predicts each candidate's footprint from its file (the backend's
``footprint_mb``: the graph or the tensor table, no weights read, on the providers the profile gives it here, its
fallback policy applied, at the sizes the engine's ``dims`` fix), takes the strategy the runtime would run under
the budget (the one asked, the profile's, else ``auto``'s first that fits) and leaves out, with the reason logged
and kept in ``skipped``, every engine with none; the others are measured at their full-speed steady state
(``rebuild``) when the runtime would serve one (``hybrid``, ``rebuild``), else at the strategy it would run
(``bound``, ``builtin``). When no candidate fits, the refusal is the :class:`~edge.errors.ConfigError` a single
backend gives.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from edge.errors import ConfigError, EdgeError

__all__ = ["FULL_SPEED", "fit_budget"]

log = logging.getLogger("edge.engines")

FULL_SPEED = "rebuild"  # what an engine is measured at when the runtime would serve a prepacked session


def fit_budget(found: list, skipped: dict, profile, strategy: str = "auto", enforce: bool = True) -> list:
    """The engines of ``found`` (:class:`~edge.engines.EngineFile`, in order) whose predicted footprint fits
    ``profile``'s ``budgets.memory_mb``, each with the strategy it is to be measured at; each one left out is added
    to ``skipped`` with why. No profile, or ``enforce`` False: ``found`` as it is. Raises :class:`ConfigError`
    naming every engine's figures when none fits."""
    from runtimes import get_backend

    budget = profile.budgets.memory_mb if profile is not None and enforce else None
    if budget is None or not found:
        return found
    kept, refused = [], {}
    for e in found:
        cls = get_backend(e.backend)
        pref = profile.preference(e.backend)
        asked = strategy if strategy != "auto" else (pref.strategy if pref else "auto")
        order = (cls.AUTO_ORDER or (cls.DEFAULT_STRATEGY,)) if asked == "auto" else (asked,)
        providers = _providers(profile, e.backend, pref)  # LiteRT on ["CPU"]: nothing packed
        size_mb, predicted, serving = e.path.stat().st_size / 2**20, {}, None
        sizes = {"dims": dict(e.dims)} if getattr(e, "dims", ()) else {}  # the lengths it runs at (edge.dims)
        if size_mb > budget:  # its weights alone: nothing of it is read to predict more
            needs = f"its file alone is {size_mb:.1f} MB"
        else:
            for s in order:  # lightest last: stop at the first that fits (each prediction parses the file)
                predicted[s] = cls.footprint_mb(e.path, s, providers, **sizes)
                if predicted[s] is None or predicted[s] <= budget:
                    serving = s
                    break
            needs = ", ".join(f"{s} {v:.1f} MB" for s, v in predicted.items()) + " (predicted)"
        if serving is not None and predicted[serving] is None:  # nothing predicted: the runtime's own checks decide
            kept.append(e)
            continue
        if serving is None:
            refused[e.backend] = (
                f"{e.path.name} does not fit the memory budget of {budget:g} MB of device profile {profile.name!r} "
                f"(budgets.memory_mb) under strategy {asked}: {needs}; not built, not measured"
            )
            log.warning("engine %s left out: %s", e.backend, refused[e.backend])
            continue
        kept.append(replace(e, strategy=FULL_SPEED if serving in ("hybrid", FULL_SPEED) else serving))
    skipped.update(refused)
    if not kept:
        raise ConfigError(
            f"no engine fits the memory budget of {budget:g} MB of device profile {profile.name!r}: "
            + "; ".join(f"{b}: {why}" for b, why in refused.items())
            + "; raise budgets.memory_mb in the device profile, or load a smaller or quantized model"
        )
    return kept


def _providers(profile, backend: str, pref) -> tuple[str, ...]:
    """The providers ``backend`` runs on under ``profile``: its fallback policy applied, as the runtime applies it
    (a GPU listed before the CPU, missing here, with ``fallback: cpu``: the CPU alone); the listed ones where the
    policy refuses (the prediction only: the load then says why)."""
    try:
        return profile.backend_options(backend, quiet=True).providers
    except EdgeError:
        return tuple(p.name for p in pref.providers) if pref else ()
