"""Keeping the graph's detector head in step with the router's detectors (:mod:`edge.route.router`
module doc, *Scoring in the graph*): fold a state's detector into head tensors, write them with
a switch, and write updated prototypes at most once per ``head_sync_s``."""

from __future__ import annotations

import logging
import time

from edge.route.fit import State
from edge.route.hdc import HDC
from edge.route.taps import Head

__all__ = ["HeadSync"]

log = logging.getLogger("edge.route.router")  # the router's log: where its users look for this warning


class HeadSync:
    """The detector head of a tapped model (``head``, ``None`` without one) and when it was last written.

    Falls back to numpy scoring for good (:attr:`in_graph` ``False``) when the known
    domains outgrow the head's capacity.
    """

    def __init__(self, head: Head | None, sync_s: float) -> None:
        self.head, self.sync_s = head, sync_s
        self.in_graph = head is not None  # False once the known domains outgrow the head
        self.written = 0.0  # perf_counter of the last head write

    def fold(self, det: HDC) -> dict | None:
        """The detector as graph-head tensors, or None (numpy scoring) when there is no head or it is too small."""
        if not self.in_graph:
            return None
        head = self.head
        if not det.fits_head(head):
            log.warning(
                "%d known domains with %d class prototypes outgrow the graph head (%d domains x %d classes); "
                "scoring in numpy from now on (slower). Tap the model with a larger Head to keep it in the graph",
                len(det.domain_keys),
                len(det.class_keys),
                head.domains,
                head.classes,
            )
            self.in_graph = False
            return None
        return det.head_values(head)

    def for_write(self, state: State) -> dict | None:
        """The head to write with ``state`` (None when scoring in numpy), refolded if stale; marks it written."""
        if not self.in_graph:
            return None
        if state.head_dirty:
            state.head = self.fold(state.detector)
        state.head_dirty = False
        self.written = time.perf_counter()
        return state.head if self.in_graph else None

    def due(self, state: State) -> bool:
        """Whether ``state``'s prototypes changed and the last write is at least ``sync_s`` old."""
        return state.head_dirty and time.perf_counter() - self.written >= self.sync_s
