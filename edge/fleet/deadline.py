"""A total deadline for one ``edge sync``: every request and every byte of it, however slowly a server sends.

A read timeout bounds the gap between two packets, not a transfer: a server (or a proxy, or a cellular link
that keeps a connection half alive) that sends one byte every few seconds never trips it, and a 64 KiB read
then takes days (python-tuf dropped its slow-retrieval protection for that reason: theupdateframework/
specification#111). A blocked ``recv`` cannot be cut from the thread that waits in it, so a :class:`Deadline`
keeps the sockets its client opened (:func:`mount`: a ``requests`` adapter whose connections register the
socket they open) and, when time is up, a timer shuts them down: the blocked read returns at once, in the
status line, the headers or the body, and the client reports :class:`DeadlineExceededError`. Nothing else is
interrupted: what sync writes to disk happens between reads, so a cut leaves a partial download to resume
and never a half-installed adapter.
"""

from __future__ import annotations

import socket
import threading
import time

from edge.fleet.oci import DEFAULT_DEADLINE, OciClient, RegistryUnreachableError

__all__ = ["DEFAULT_DEADLINE", "Deadline", "DeadlineExceededError", "client", "mount"]


class DeadlineExceededError(RegistryUnreachableError, TimeoutError):
    """The whole sync took longer than its deadline (a slow or dripping registry): retry later, it resumes."""


class Deadline:
    """``seconds`` from now. :meth:`check` before a request, :meth:`remaining` to bound its timeouts; sockets
    given to :meth:`watch` are shut down when the time is up. :meth:`close` stops the timer."""

    def __init__(self, seconds: float, flag: str = "--deadline"):
        if not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 < seconds < 1e9):
            raise ValueError(f"deadline must be a number of seconds > 0, got {seconds!r}")
        self.seconds, self.flag = float(seconds), flag
        self._end = time.monotonic() + self.seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    @property
    def expired(self) -> bool:
        return self._expired or time.monotonic() >= self._end - 0.005  # a timeout capped at remaining() fired

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def error(self, doing: str) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"sync stopped at its deadline of {self.seconds:g} s ({self.flag}) while {doing}: the registry or the "
            "link is too slow; what was downloaded is kept and the next sync resumes it"
        )

    def check(self, doing: str) -> None:
        if self.expired:
            raise self.error(doing)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets = [s for s in self._sockets if s.fileno() >= 0]  # forget closed ones
            self._sockets.append(sock)
            late = self._expired
        if late:  # connected just as time ran out
            _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self._expired = True
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            _shut(s)

    def close(self) -> None:
        self._timer.cancel()


def client(base_url: str, repository: str, timeout: float, deadline: Deadline) -> OciClient:
    """An :class:`~edge.fleet.oci.OciClient` whose every request and byte ends by ``deadline``."""
    c = OciClient(base_url, repository, timeout, deadline)
    mount(c.session, deadline)
    return c


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked in another thread; close() alone would not
    except OSError:
        pass  # already closed or never connected


def mount(session, deadline: Deadline) -> None:
    """Make every connection ``session`` opens (HTTP, HTTPS, through a proxy) register its socket with
    ``deadline`` as soon as it is connected, before TLS and before a byte of the request."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def watched(conn_cls, pool_cls):
        def _new_conn(self):
            sock = conn_cls._new_conn(self)  # urllib3's one place a connection's TCP socket is made
            deadline.watch(sock)
            return sock

        conn = type(f"Watched{conn_cls.__name__}", (conn_cls,), {"_new_conn": _new_conn})
        return type(f"Watched{pool_cls.__name__}", (pool_cls,), {"ConnectionCls": conn})

    pools = {
        "http": watched(HTTPConnection, HTTPConnectionPool),
        "https": watched(HTTPSConnection, HTTPSConnectionPool),
    }

    class _Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, proxy, **kwargs):
            manager = super().proxy_manager_for(proxy, **kwargs)
            if proxy.lower().startswith("socks"):  # its pools connect through the proxy (PySocks): watch those
                from urllib3.contrib import socks

                manager.pool_classes_by_scheme = {
                    "http": watched(socks.SOCKSConnection, socks.SOCKSHTTPConnectionPool),
                    "https": watched(socks.SOCKSHTTPSConnection, socks.SOCKSHTTPSConnectionPool),
                }
            else:
                manager.pool_classes_by_scheme = pools
            return manager

    adapter = _Adapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
