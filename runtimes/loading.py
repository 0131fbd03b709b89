"""Loading and memory helpers the backends share: the model's bytes or file, resident memory, heap trimming.

Re-exported by :mod:`runtimes.base`, where backends import them from.
"""

from __future__ import annotations

import mmap
import os
from contextlib import contextmanager

__all__ = ["model_buffer", "page_releaser", "release_pages", "rss_mb", "trim_heap"]


@contextmanager
def model_buffer(model: bytes | bytearray | memoryview | str | os.PathLike):
    """(buffer, read) over the model's bytes or its file. ``read(dst, offset)`` fills the writable byte
    view ``dst`` from ``offset``; given a path it reads from the file straight into ``dst`` (the buffer
    is then a read-only memory map: only the pages a reader touches become resident)."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        with memoryview(model) as view:
            view = view.cast("B") if view.format != "B" else view

            def copy(dst: memoryview, at: int) -> None:
                dst[:] = view[at : at + len(dst)]

            yield view, copy
        return
    from edge.errors import FormatError
    from edge.format.io import open_regular

    fd, _ = open_regular(model, what="model file")  # a FIFO must not hang us
    with os.fdopen(fd, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise FormatError(f"cannot read model file {model}: {e}") from e

        def read(dst: memoryview, at: int) -> None:
            while len(dst):
                f.seek(at)
                n = f.readinto(dst)
                if not n:
                    raise FormatError(f"model file {model} ends early (truncated)")
                dst, at = dst[n:], at + n

        with mm, memoryview(mm) as view:
            yield view, read


#: a memory map smaller than this is left whole: it can hold no more than this many bytes resident
RELEASE_STEP = 1 << 20


def page_releaser(buf, step: int = RELEASE_STEP):
    """``release(end)``: give back the pages of ``buf`` before byte ``end`` that a reader has walked past, each time
    it has passed another ``step`` bytes (one system call a step), when ``buf`` is :func:`model_buffer`'s view of a
    file's memory map; a no-op over bytes in memory.

    Each page a reader touches in the map stays resident in this process until the map closes, and the kernel maps
    a whole folio of the page cache at a time: walking the headers of ResNet-50's 265 initializers mapped 36-54 MB of
    its 94 MB file, BERT-base's 58-132 of 436 MB (as the page cache held it), on top of the arena being filled.
    Released pages stay in the page cache (clean, file-backed): a later touch maps them again."""
    mm = _mapped(buf)
    if mm is None:
        return _keep
    done = 0

    def release(end: int) -> None:
        nonlocal done
        end = min(end, len(mm))
        if end - done >= step or (end == len(mm) and end > done):
            _drop(mm, done, end)
            done = end

    return release


def release_pages(buf, start: int, end: int) -> None:
    """Give back the pages holding bytes ``[start, end)`` of ``buf`` (see :func:`page_releaser`), e.g. once a
    tensor's bytes were copied out of the map."""
    mm = _mapped(buf)
    if mm is not None and 0 <= start < end:
        _drop(mm, start, min(end, len(mm)))


def _mapped(buf) -> mmap.mmap | None:
    """The memory map ``buf`` views whole (as :func:`model_buffer` yields it), else None."""
    mm = getattr(buf, "obj", None)
    if isinstance(mm, mmap.mmap) and not mm.closed and buf.nbytes == len(mm) >= RELEASE_STEP:
        return mm if hasattr(mmap, "MADV_DONTNEED") else None
    return None


def _drop(mm: mmap.mmap, start: int, end: int) -> None:
    start -= start % mmap.PAGESIZE
    if start < end:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def _keep(end: int) -> None:
    """A walk over bytes in memory: nothing to give back."""


def rss_mb() -> float | None:
    """This process's resident memory in MB (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE / 2**20
    except (OSError, ValueError, IndexError):
        return None


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc otherwise keeps the buffers of dropped sessions)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None
