"""What an engine choice is (:class:`EngineChoice`, :data:`MARGIN`), apart from the measuring.

:mod:`edge.engines` finds, measures and decides; :mod:`edge.engine_cache` keeps the choice. A ``Runtime`` given a
backend or a file's suffix (:func:`edge.engine_cache.explicit_engine`) needs only this type, so loading a model
never imports the measuring code, nor :class:`edge.engines.EngineFile` (each dataclass costs 0.4-0.9 ms to
create on import); both are re-exported by :mod:`edge.engines`, where they were defined before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MARGIN", "EngineChoice"]

MARGIN = 0.03  # an engine earlier in the profile's order wins when at most this much slower (paired p50)


@dataclass(frozen=True)
class EngineChoice:
    """The engine chosen for a model, why, the figures behind it and what was left out."""

    backend: str
    path: Path
    reason: str
    comparison: dict | None = None  # compare_engines' result; None when only one engine could run
    skipped: Mapping[str, str] = field(default_factory=dict)  # backend -> why it was not a candidate
    twins: tuple[str, ...] = ()  # fingerprints of the candidates exported from the same weights: their adapters fit
