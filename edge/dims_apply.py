"""Which fixed sizes (:mod:`edge.dims`) apply where: a caller's ``dims`` are strict, a device profile's apply per model.

A device profile serves every model on the device, so its ``dims`` apply to a model by the names its file declares,
on a backend that takes dims (``Backend.TAKES_DIMS``); the rest are skipped, logged once per process at INFO
(``Runtime.dims`` shows what applies). The caller's ``dims=`` (``--dim``) win per name and are strict: a name the
model does not declare is refused by the backend, and dims given to a backend that takes none are a
:class:`~edge.errors.ConfigError` naming it, so no backend ignores them silently. :func:`with_dims` applies the same
rule to the engines ``backend="auto"`` weighs (:mod:`edge.engine_cache`) and ``edge profile`` compares.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from edge.dims import check_dims, declared
from edge.engine_feeds import file_specs
from edge.errors import ConfigError

__all__ = ["applying", "with_dims"]

log = logging.getLogger("edge.dims")
_said: set = set()  # (file, backend, names) skipped from a profile's dims, logged once per process


def applying(backend: str, path, profile: Mapping[str, int] | None, given: Mapping[str, int] | None, *, refuse=True):
    """The dims a ``backend`` session of ``path`` runs with: ``given`` (the caller's, checked; strict: a name the
    model lacks is refused by the backend) over the ``profile``'s that apply, the names ``path`` declares on a backend
    that takes dims (``TAKES_DIMS``); the profile's others are skipped, logged once (INFO). ``given`` to a backend
    that takes none is a :class:`ConfigError` naming it (``refuse=False``: None, the engine is left out)."""
    from runtimes import get_backend

    given = check_dims(given)
    if not given and not profile:  # the common case: nothing to apply, nothing imported or read
        return {}
    takes = bool(getattr(get_backend(backend), "TAKES_DIMS", False))
    if given and not takes:
        if not refuse:
            return None
        raise ConfigError(
            f"dims {given} given, but backend {backend!r} takes none ({Path(path).name}: its input shapes are fixed "
            "in the file, its dimensions have no names): drop dims, or run the model's .onnx file "
            "(backend='onnxruntime' or 'auto')"
        )
    rest = {k: v for k, v in (profile or {}).items() if k not in given}
    if not rest:
        return given
    names: set[str] = set()
    if takes:
        names = {d for ds in declared(file_specs(backend, path)[0] or {}).values() for d in ds}
    used = {k: v for k, v in rest.items() if k in names}
    left = tuple(sorted(set(rest) - set(used)))
    said = (str(path), backend, left)
    if left and refuse and said not in _said and len(_said) < 1024:
        _said.add(said)
        why = "declares no such named dimension" if takes else f"runs on {backend}, which takes no dims"
        log.info("the device profile's dims %s do not apply to %s: it %s", list(left), Path(path).name, why)
    return {**used, **given}


def with_dims(found: list, skipped: dict, profile: Mapping[str, int] | None, given: Mapping[str, int] | None) -> list:
    """``found`` with the dims that apply to each engine (:func:`applying`: ``given`` over the ``profile``'s
    its file declares) on it (:attr:`~edge.engines.EngineFile.dims`: sessions built, footprints predicted and feeds
    generated with them). When dims apply to any, an engine whose backend takes none is moved to ``skipped``, saying
    why, rather than measured at other sizes, or chosen and then refused at load."""
    from runtimes import get_backend

    given = check_dims(given)
    if not given and not profile:
        return found
    kept, without = [], []  # the engines that take dims, with those that apply; those that take none
    for e in found:
        dims = applying(e.backend, e.path, profile, given, refuse=False)  # None: given, and it takes none
        if dims is None or not getattr(get_backend(e.backend), "TAKES_DIMS", False):
            without.append(e)
        else:
            kept.append(replace(e, dims=tuple(sorted(dims.items()))))
    applied = {k: v for e in kept for k, v in e.dims}
    if not applied and not given:  # none applies (a profile's names no file here declares): each at its own sizes
        return found
    whose = "given" if given else f"(the device profile's) apply to {', '.join(e.path.name for e in kept if e.dims)}"
    for e in without:
        skipped[e.backend] = (
            f"dims {given or applied} {whose}: {e.path.name} on {e.backend} takes none (its shapes are fixed when it "
            "is exported, its dimensions have no names); not measured: drop dims to weigh it"
        )
    return kept
