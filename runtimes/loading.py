"""Loading and memory helpers the backends share: the model's bytes or file, resident memory, heap trimming.

Re-exported by :mod:`runtimes.base`, where backends import them from.
"""

from __future__ import annotations

import mmap
import os
from contextlib import contextmanager

__all__ = ["model_buffer", "rss_mb", "trim_heap"]


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
