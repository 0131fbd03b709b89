"""The router's window policy: when to switch domains, when the stream is novel, and the
novel inputs it collects for growth (:mod:`edge.route.router` module doc, *Window policy*)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Decision", "NovelBuffer", "Window", "WindowPolicy"]


class Window:
    """The last ``size`` votes (domain index, -1 = OOD) in a ring buffer."""

    def __init__(self, size: int) -> None:
        self.codes = np.zeros(size, np.int64)
        self.seen = 0

    @property
    def full(self) -> bool:
        return self.seen >= len(self.codes)

    def add(self, codes: np.ndarray) -> None:
        codes = codes[-len(self.codes) :]
        at = (self.seen + np.arange(len(codes))) % len(self.codes)
        self.codes[at] = codes
        self.seen += len(codes)

    def counts(self, domains: int) -> np.ndarray:
        return np.bincount(self.codes + 1, minlength=domains + 1)

    def clear(self) -> None:
        self.seen = 0


class NovelBuffer:
    """OOD inputs and their labels (-1 where none were given), kept for growing an adaptor."""

    def __init__(self) -> None:
        self._x: list[np.ndarray] = []
        self._y: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(b) for b in self._x)

    def __bool__(self) -> bool:
        return bool(self._x)

    def add(self, x: np.ndarray, labels: np.ndarray | None, ood: np.ndarray) -> None:
        """Keep the inputs of ``x`` flagged in ``ood`` (with their ``labels``, if given)."""
        if ood.any():
            self._x.append(np.asarray(x)[ood])
            self._y.append(np.full(int(ood.sum()), -1) if labels is None else np.asarray(labels)[ood])

    def clear(self) -> None:
        self._x, self._y = [], []

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """Everything collected, as ``(inputs, int64 labels)``; empties the buffer."""
        if not self._x:
            return np.zeros((0,), np.float32), np.zeros(0, np.int64)
        x, y = np.concatenate(self._x), np.concatenate(self._y).astype(np.int64)
        self.clear()
        return x, y


@dataclass(frozen=True)
class Decision:
    """What the policy decided at a batch boundary: a domain to switch to and the event to report."""

    switch: str | None = None
    event: str | None = None  # "switch:<domain>", "novel", "known"


class WindowPolicy:
    """Votes of the last ``window`` inputs -> switch, novelty, or nothing; with dwell-time hysteresis.

    ``config`` is the router's :class:`~edge.route.router.RouterConfig` (``window``,
    ``switch_share``, ``novel_share``, ``dwell``). The caller performs a decided switch
    and then calls :meth:`restart`.
    """

    def __init__(self, config) -> None:
        self.config = config
        self.window = Window(config.window)
        self.since_switch = 0  # inputs since the last switch (dwell)
        self.novel = False  # the stream is in an unknown domain
        self.buffer = NovelBuffer()

    def add(self, codes: np.ndarray, x: np.ndarray, labels: np.ndarray | None) -> None:
        """Record a batch's votes (domain index, -1 = OOD) and keep its OOD inputs."""
        self.window.add(codes)
        self.since_switch += len(codes)
        self.buffer.add(x, labels, codes < 0)

    def restart(self) -> None:
        """After a switch: the window's votes came from the other state's features."""
        self.window.clear()
        self.since_switch = 0

    def decide(self, domains: Sequence[str], active: str, base: str | None) -> Decision:
        """The decision on the current window for the ``domains`` (vote order), serving ``active``.

        ``base`` is the domain the base model serves (``None`` if none), where a novel
        stream is routed.
        """
        cfg, w = self.config, self.window
        if not w.full:
            return Decision()
        counts = w.counts(len(domains))  # [OOD, domain 0, domain 1, ...]
        ood_share = counts[0] / cfg.window
        if ood_share < cfg.novel_share / 2 and self.buffer:
            self.buffer.clear()
        if ood_share >= cfg.novel_share:
            event = None if self.novel else "novel"
            self.novel = True
            if base is not None and active != base and self.since_switch >= cfg.dwell:
                return Decision(base, f"switch:{base}")
            return Decision(None, event)
        event = "known" if self.novel else None
        self.novel = False
        top, count = domains[int(counts[1:].argmax())], int(counts[1:].max())
        known = cfg.window - counts[0]  # OOD flags are the novelty rule's business, not votes against a switch
        if top != active and count >= cfg.switch_share * known and self.since_switch >= cfg.dwell:
            return Decision(top, f"switch:{top}")
        return Decision(None, event)
