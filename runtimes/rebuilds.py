"""A fast session rebuilt after writes of weights, in the writing thread or in the background.

:class:`Rebuilds` is the part of :class:`runtimes.base.ArenaBackend` that keeps its fast session (e.g. prepacked)
current. ``_static`` serves while ``_static_gen == _generation``; every write of constant weights bumps the
generation. Strategy ``rebuild`` builds in the writing thread; ``hybrid`` has :meth:`Rebuilds._rebuild_loop` build
in the background (after :meth:`Rebuilds._start_rebuilds`), while the backend serves its immediately consistent
session, and after each build reads what the last :attr:`Rebuilds.WARM_RECENT` switches wrote back into the cache
(:meth:`Rebuilds._warm`), on the CPU the writing thread last ran on. Measured on MiniLM (106k entries, load average
4-5 on 2 cores, paired in one run), the next switch took 0.190/0.137/0.111 ms against 0.244/0.186/0.186 ms without
(block4/block16/rows masks), for 1.3 ms p50 of the rebuild thread's time after each build.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque

from runtimes.lines import touch

__all__ = ["Rebuilds"]

#: backends with a background thread still possibly running; closed at interpreter exit
_LIVE: weakref.WeakSet = weakref.WeakSet()


class Rebuilds:
    """Mixin of :class:`runtimes.base.ArenaBackend`: the rebuild state and thread. The backend calls
    :meth:`_init_rebuilds` before building sessions and provides :meth:`_build_fresh` (a fast session over the
    current arena) and ``close`` (which stops the thread: :func:`_close_live` calls it at interpreter exit)."""

    REBUILD_FAILED = "background rebuild failed; staying on the immediately consistent session"
    WATCH_S = 1.0  # hybrid: how long after a build the rebuild thread polls for writes (see _rebuild_loop) ...
    WATCH_STEP_S = 5e-3  # ... and how often at most (every rebuild_delay when that is longer)
    FREE_STALE_BEFORE_BUILD = False  # drop the stale fast session before building (frees its packed weights)
    WARM_RECENT = 2  # hybrid: after a build, re-read what the last this many writes of weights touched (_warm) ...
    WARM_BESIDE_WRITER = True  # ... on the CPU the writing thread last ran on

    def _init_rebuilds(self, options) -> None:
        """Set up the lock, the write generation and the rebuild state (``options``: the backend's
        :class:`~runtimes.base.BackendOptions`, for ``rebuild_delay_ms``)."""
        self._lock = threading.RLock()  # guards run vs write and the serving session
        self._generation = 0  # bumped by every write of constant weights
        self._static = None  # the fast session, valid while _static_gen == _generation
        self._static_gen = -1
        self._wake = threading.Condition(self._lock)  # tells the rebuild thread a write happened
        self._watching = False  # the rebuild thread polls _generation: a write need not wake it (see _rebuild_loop)
        self._closed = False
        self._rebuild_delay = float(options.rebuild_delay_ms) / 1e3
        self._rebuilder: threading.Thread | None = None  # the hybrid strategy's rebuild thread
        self._settled = threading.Event()
        self._settled.set()
        self.last_build_ms: float | None = None
        self._recent: deque[list[weakref.ref]] = deque(maxlen=self.WARM_RECENT)  # prepared writes, newest last
        self.last_warm_ms: float | None = None  # background time of the last _warm

    def _start_rebuilds(self, name: str) -> None:
        """Start the rebuild thread. It is a daemon so it never keeps a process alive, but a daemon
        killed at interpreter shutdown in the middle of building a native session aborts the process
        ("terminate called without an active exception"): the exit hook closes every live backend
        first, and :meth:`close` waits for the thread."""
        self._rebuilder = threading.Thread(target=self._rebuild_loop, name=name, daemon=True)
        _LIVE.add(self)
        self._rebuilder.start()

    def _build_fresh(self):
        raise NotImplementedError

    def _warm(self) -> None:
        """Read what the recent writes of weights read and store to back into the cache (:func:`touch`).

        A build reads the whole arena and writes a packed copy of it, so a switch right after one finds every
        line it touches, and its own indices and values, in DRAM; after this, a switch among the recently
        used adapters finds them in a cache. Its background cost is :attr:`last_warm_ms`.
        """
        t0 = time.perf_counter()
        live, seen = [], set()
        for refs in list(self._recent):
            for ref in refs:
                if (w := ref()) is not None and id(w) not in seen:
                    seen.add(id(w))
                    live.append(w)
        mask = self._beside_writer() if live and self.WARM_BESIDE_WRITER else None
        try:
            for w in live:
                touch(w.parts)
        finally:
            if mask is not None:
                try:
                    os.sched_setaffinity(0, mask)
                except OSError as e:  # the mask this thread had: only a cpuset changed meanwhile refuses it
                    log = logging.getLogger(f"edge.{type(self).__module__}")
                    log.warning("rebuild thread affinity not restored: %s", e)
        self.last_warm_ms = (time.perf_counter() - t0) * 1e3

    def _beside_writer(self) -> set[int] | None:
        """Move this thread to the CPU the last writing thread ran on (its caches are the ones the next switch
        uses; Linux ``/proc``), returning the affinity to restore; None where that cannot be done."""
        try:
            native = next(t.native_id for t in threading.enumerate() if t.ident == self._writer)
            with open(f"/proc/self/task/{native}/stat") as f:  # field 39: the CPU it last ran on
                cpu = int(f.read(1024).rsplit(")", 1)[1].split()[36])
            mask = os.sched_getaffinity(0)
            if cpu not in mask or len(mask) < 2:
                return None
            os.sched_setaffinity(0, {cpu})
        except (OSError, ValueError, IndexError, AttributeError, StopIteration):  # no procfs, a thread gone, not Linux
            return None
        return mask

    def _rebuild_loop(self) -> None:
        """Hybrid: after each write, build a fast session from the current arena and swap it in.

        Waking a sleeping thread costs the writer a futex call and a GIL handover (10-30 us measured on MiniLM,
        the write itself 0.14 ms with cold caches). So for :attr:`WATCH_S` after a build the thread polls
        ``_generation`` every ``rebuild_delay`` instead, and a write in a burst of switches wakes nobody; after
        that it sleeps on ``_wake`` until a write notifies it. Either way the build starts at least
        ``rebuild_delay`` after the write it serves, so bursts still coalesce.
        """
        watch_until = 0.0
        while True:
            while self._static_gen == self._generation and not self._closed and time.monotonic() < watch_until:
                time.sleep(max(self._rebuild_delay, self.WATCH_STEP_S))
            with self._lock:
                self._watching = False  # under the lock: a write from here on notifies
                while not self._closed and self._static_gen == self._generation:
                    self._wake.wait()
                if self._closed:
                    return
                self._watching = True
                if self.FREE_STALE_BEFORE_BUILD:
                    self._static = None
            time.sleep(self._rebuild_delay)  # let the switching thread return and bursts coalesce into one build
            with self._lock:
                gen = self._generation
            try:
                sess = self._build_fresh()
            except Exception:  # keep serving on the consistent session, and say so
                logging.getLogger(f"edge.{type(self).__module__}").exception(self.REBUILD_FAILED)
                with self._lock:
                    self._static_gen = self._generation  # do not retry in a loop
                    self._static = None
                self._settled.set()
                continue
            with self._lock:
                if self._closed:
                    return
                current = gen == self._generation  # no write while building: the fast copy is current
                if current:
                    self._static, self._static_gen = sess, gen
            # otherwise a write came while building (it may have hit the buffers mid-pack): go again
            del sess  # this frame must not keep a session alive through the next build
            if current:
                self._warm()  # serving fast already; settled once the next switch's lines are in a cache
                with self._lock:
                    if self._static_gen == self._generation:  # no write meanwhile (a write clears it)
                        self._settled.set()
            watch_until = time.monotonic() + self.WATCH_S


@atexit.register
def _close_live() -> None:
    for backend in list(_LIVE):
        try:
            backend.close()
        except Exception:  # exiting anyway; a failing close must not hide the others
            pass
