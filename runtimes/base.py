"""The backend contract: load, run, and the sparse weight write that fused switching needs.

Everything crossing this boundary is numpy. Native handles (IOBinding, sessions,
interpreters, delegates) stay inside the backend.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge.modelinfo import ModelInfo
from edge.registry import Registry

__all__ = ["Backend", "BackendOptions", "BACKENDS", "WeightWrite"]


@dataclass(frozen=True)
class BackendOptions:
    """What the caller (or a device profile) asks of a backend."""

    threads: int | None = None  # intra-op threads; None = the backend's default (all cores)
    strategy: str = "auto"  # how weight writes reach the kernels; see each backend's STRATEGIES
    providers: tuple[str, ...] = ()  # execution providers / delegates in order of preference; () = CPU
    extra: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class WeightWrite:
    """Overwrite ``values`` at flat positions ``index`` of stored tensor ``tensor`` (stored layout)."""

    tensor: str
    index: np.ndarray  # int64, flat positions in the stored tensor
    values: np.ndarray  # same dtype as the stored tensor


class Backend(ABC):
    """One inference engine holding one model whose weights can be rewritten in place."""

    name: str = ""
    STRATEGIES: tuple[str, ...] = ()
    DEFAULT_STRATEGY: str = ""

    info: ModelInfo  # read from the model file by the backend

    @abstractmethod
    def __init__(self, model: bytes, options: BackendOptions) -> None:
        """Load ``model`` (file bytes) and its :class:`ModelInfo`; verify its fingerprint.

        Every stored tensor named in ``info.tensors`` must be writable afterwards.
        Raises :class:`~edge.errors.FormatError` for an unreadable or tampered file.
        """

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; returns every model output by name. Safe to call from several threads."""

    @abstractmethod
    def read(self, tensor: str) -> np.ndarray:
        """The current contents of a writable stored tensor (read-only view; do not modify)."""

    def prepare(self, writes: Sequence[WeightWrite]) -> object:
        """Compile writes into the backend's fastest form (done once per adapter, ahead of switching).

        Inputs are already validated by the caller (indices in range, dtypes right).
        The default keeps the list as is.
        """
        return list(writes)

    @abstractmethod
    def write(self, *prepared: object) -> None:
        """Apply prepared writes, in order, atomically with respect to :meth:`run`.

        When this returns, the next :meth:`run` uses the new weights.
        """

    def wait_settled(self, timeout: float | None = None) -> bool:
        """Block until any background work after a write is done (True if settled)."""
        return True

    @property
    @abstractmethod
    def strategy(self) -> str:
        """The weight-update strategy actually in use."""

    @property
    @abstractmethod
    def providers(self) -> list[str]:
        """Execution providers / delegates actually running the model."""

    def close(self) -> None:
        """Release native resources (optional)."""


#: Backends by name; each backend module registers itself on import.
BACKENDS: Registry[type[Backend]] = Registry("backend")


#: backends with a background thread still possibly running; closed at interpreter exit
_LIVE: weakref.WeakSet = weakref.WeakSet()


def start_background(backend: Backend, target, name: str) -> threading.Thread:
    """Start ``backend``'s background thread (a session rebuild loop) and close the backend at exit.

    The thread is a daemon so it never keeps a process alive, but a daemon killed at
    interpreter shutdown in the middle of building a native session aborts the process
    ("terminate called without an active exception"): the exit hook closes every live
    backend first, and ``close()`` waits for its thread.
    """
    t = threading.Thread(target=target, name=name, daemon=True)
    _LIVE.add(backend)
    t.start()
    return t


def join_background(thread: threading.Thread | None, timeout: float = 60.0) -> None:
    """Wait for a background thread that was told to stop (no-op from the thread itself)."""
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout)


@atexit.register
def _close_live() -> None:
    for backend in list(_LIVE):
        try:
            backend.close()
        except Exception:  # exiting anyway; a failing close must not hide the others
            pass
