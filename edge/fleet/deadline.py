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

Name resolution is bounded too: ``socket.getaddrinfo`` takes no timeout and cannot be interrupted (a dead DNS
server or a captive portal holds it for 5 s x attempts x servers, or longer), and urllib3 has no resolver to plug
in (urllib3/urllib3#1334, #3588), so each new connection (lookup and TCP connect: urllib3's ``_new_conn``) runs
in a daemon thread the caller waits for until the deadline; a lookup given up on finishes there, and the socket
it may still open is closed. Such threads are bounded per process, for a device that syncs every minute against
a dead name server: one per ``host:port`` at a time (a later connection waits for it, within its own deadline, then
makes its own) and :data:`MAX_LOOKUPS` in all (one more fails at once, offline, saying why).
The host's push and release (:mod:`edge.fleet.publish`) use the same :class:`Deadline` (:func:`bound_session`)
with their own wording. A :class:`Deadline` is a context manager; one never closed still stops its timer and
leaves nothing on urllib3's logger once it is garbage (one shared filter, :func:`_quiet`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import weakref
from urllib.parse import urlsplit

from edge.fleet.oci import DEFAULT_DEADLINE, OciClient, RegistryUnreachableError

__all__ = [
    "DEFAULT_DEADLINE",
    "MAX_LOOKUPS",
    "Deadline",
    "DeadlineExceededError",
    "bound_session",
    "client",
    "mount",
]

MAX_LOOKUPS = 4  # connections of this process whose name lookup may hang at once (each holds a thread)
_pending: dict[str, threading.Event] = {}  # "host:port" -> set when that connection's thread has returned
_pending_lock = threading.Lock()


class DeadlineExceededError(RegistryUnreachableError, TimeoutError):
    """The whole sync (or push, or release) took longer than its deadline (a slow or dripping registry, a hung
    name lookup): retry later; a sync resumes, a push skips the blobs already uploaded."""


class Deadline:
    """``seconds`` from now. :meth:`check` before a request, :meth:`remaining` to bound its timeouts; sockets
    given to :meth:`watch` are shut down when the time is up. A context manager: leaving it (or :meth:`close`)
    stops the timer; one never closed stops it once it is garbage. ``action`` and ``then`` word the error: what
    stopped, and what the user is left with."""

    def __init__(
        self,
        seconds: float,
        flag: str = "--deadline",
        action: str = "sync",
        then: str = "what was downloaded is kept and the next sync resumes it",
    ):
        if not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 < seconds < 1e9):
            raise ValueError(f"deadline must be a number of seconds > 0, got {seconds!r}")
        self.seconds, self.flag, self.action, self.then = float(seconds), flag, action, then
        self.stuck = ""  # what a connection was doing when time ran out (see _connect)
        self.refused = ""  # why _connect would not start a connection (too many name lookups hung)
        self._end = time.monotonic() + self.seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._timer = threading.Timer(self.seconds, _expire_ref, (weakref.ref(self),))  # no reference: a lost
        self._timer.daemon = True  # deadline is garbage, and its finalizer stops the timer thread
        self._stop = weakref.finalize(self, self._timer.cancel)
        self._timer.start()

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def expired(self) -> bool:
        return self._expired or time.monotonic() >= self._end - 0.005  # a timeout capped at remaining() fired

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def error(self, doing: str, then: str | None = None) -> DeadlineExceededError:
        stuck = f" ({self.stuck})" if self.stuck else ""
        return DeadlineExceededError(
            f"{self.action} stopped at its deadline of {self.seconds:g} s ({self.flag}) while {doing}{stuck}: the "
            f"registry, the name server or the link is too slow; {then or self.then}"
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
        self._stop()  # cancels the timer (once)
        with _mounted_lock:
            _mounted.discard(self)


def _expire_ref(ref: weakref.ref) -> None:
    deadline = ref()
    if deadline is not None:
        deadline._expire()


_mounted: weakref.WeakSet[Deadline] = weakref.WeakSet()  # deadlines whose sessions may be cut (see mount)
_mounted_lock = threading.Lock()  # a WeakSet changed by another thread while it is copied raises


def _quiet(record: logging.LogRecord) -> bool:
    """The one filter on urllib3's connection logger (added once, whatever the number of deadlines): drop its
    warning (and traceback) about the headers of a response that a deadline cut in the middle of a line; that
    deadline's error says what happened. Deadlines closed, or garbage, no longer count."""
    if not record.getMessage().startswith("Failed to parse headers"):
        return True
    with _mounted_lock:
        live = list(_mounted)
    return not any(d.expired for d in live)


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


def _connect(new_conn, conn, deadline: Deadline):
    """``new_conn(conn)`` (name lookup, then TCP connect) in a daemon thread, waited for until ``deadline``.

    Past it, the lookup is left to finish in its thread (no API can cancel ``getaddrinfo``) and raises nothing
    further; a socket it connects after all is closed there. urllib3 reports the raised error as a dropped
    connection, which the caller turns into ``deadline.error`` (the deadline has passed by then).

    One such thread per ``host:port`` at a time in this process: while one runs (perhaps given up on by an earlier
    sync, its lookup still hung), a new connection there waits for it until its own deadline, then makes its own.
    With :data:`MAX_LOOKUPS` hosts' threads running, a connection to another one fails at once
    (``deadline.refused`` says why): a long-running process against a dead name server holds a few threads, not
    one more per sync."""
    where = f"{getattr(conn, 'host', '?')}:{getattr(conn, 'port', '?')}"
    while True:
        with _pending_lock:
            ahead = _pending.get(where)
            if ahead is None:
                if len(_pending) >= MAX_LOOKUPS:
                    deadline.refused = (
                        f"{len(_pending)} connections of this process ({', '.join(sorted(_pending)[:MAX_LOOKUPS])}) "
                        f"are still waiting for the name server, the most allowed ({MAX_LOOKUPS}): no new lookup "
                        f"for {where}; check the device's DNS and sync again"
                    )
                    raise RegistryUnreachableError(deadline.refused)
                finished = _pending[where] = threading.Event()
                break
        if not ahead.wait(max(deadline.remaining(), 0.001)) and deadline.expired:
            deadline.stuck = f"waiting for the name lookup of {where} that an earlier connection started"
            raise deadline.error(deadline.stuck)
    lock, done, box = threading.Lock(), threading.Event(), []

    def run() -> None:
        try:
            out = (new_conn(conn), None)
        except BaseException as e:  # noqa: BLE001  (raised again in the caller's thread)
            out = (None, e)
        with lock:
            box.append(out)
            abandoned = len(box) > 1
        if abandoned and out[0] is not None:
            out[0].close()
        with _pending_lock:
            del _pending[where]
        finished.set()
        done.set()

    try:
        threading.Thread(target=run, name=f"edge-connect-{where}", daemon=True).start()
    except BaseException:  # no thread (a process at its limit): nothing will free the slot but us
        with _pending_lock:
            del _pending[where]
        finished.set()
        raise
    while not done.wait(max(deadline.remaining(), 0.001)):
        if deadline.expired:
            with lock:
                if not box:
                    box.append((None, None))  # the thread finds this and knows it was given up on
                    err = deadline.error(f"looking up and connecting to {where}")
                    deadline.stuck = f"looking up and connecting to {where}"  # the caller's error says it too
                    raise err
            break
    sock, error = box[0]
    if error is not None:
        raise error
    return sock


def bound_session(session, timeout: float, deadline: Deadline) -> None:
    """Bound every request of ``session`` (a ``requests.Session``, e.g. oras-py's) by ``deadline`` as well as by
    ``timeout`` seconds per connect and read: checked before each request, its timeouts capped at the time left,
    its sockets watched and its connections' name lookups cut (:func:`mount`)."""
    request = session.request

    def bounded(method, url, *args, **kwargs):
        path = urlsplit(url).path
        deadline.check(f"sending {method} {path if len(path) <= 120 else '...' + path[-117:]}")
        t = min(timeout, max(deadline.remaining(), 0.01))
        kwargs["timeout"] = (min(3.0, t), t)
        return request(method, url, *args, **kwargs)

    session.request = bounded  # requests' get/put/head... and oras-py's auth all call session.request
    mount(session, deadline)


def mount(session, deadline: Deadline) -> None:
    """Make every connection ``session`` opens (HTTP, HTTPS, through a proxy) register its socket with
    ``deadline`` as soon as it is connected, before TLS and before a byte of the request."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def watched(conn_cls, pool_cls):
        def _new_conn(self):
            sock = _connect(conn_cls._new_conn, self, deadline)  # urllib3's one place a TCP socket is made
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

    with _mounted_lock:
        _mounted.add(deadline)
    logging.getLogger("urllib3.connection").addFilter(_quiet)  # a no-op once it is there
    adapter = _Adapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
