"""A ``.tflite`` file's tensor table read without reading its weights: the file mapped, pages read as touched.

The LiteRT backend decides its memory-budget refusal (and its precision and tensor-size refusals) from the
tensor table alone (:mod:`runtimes.litert_footprint`); a path given to it with a memory budget or a device's
precision is parsed here first, so a model over its budget is refused before its weights are read, as
onnxruntime's backend refuses one from its graph (:mod:`runtimes.ort_footprint`).
:func:`edge.format.tflite.read_tflite` visits the flatbuffer's tables, each buffer's 4-byte length and the
metadata entries, and never a weight: only the pages holding those are read in
(measured on MiniLM-L6's 86 MB fp32 file, VmHWM of a fresh process: a load refused by its budget peaks 3.3 MB above
the interpreter's import, 88 MB when the file was read first; ``LiteRTBackend.footprint_mb`` of the path 2.6 MB
against 88 MB). Without a budget or a precision the load needs the whole file anyway: it is read at once (bounded)
and parsed once, and a tensor of an impossible size is refused from that parse, before LiteRT allocates it (a second
parse of a path under a budget costs 20-35 ms on MiniLM-L6, 1-7 ms on the digits encoders).

The map is read-only, of a regular file opened as :func:`edge.format.io.open_regular` opens one (a
FIFO, device or folder is refused before anything is mapped). A file truncated by another process while it is
parsed would end this one with SIGBUS, as any mapped read would; the files this project writes are replaced by an
atomic rename, never truncated in place, and the backend re-reads and re-checks the whole file after this pass.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

from edge.format.io import open_regular

__all__ = ["mapped"]


@contextlib.contextmanager
def mapped(path: str | os.PathLike, *, what: str = "model file") -> Iterator[bytes | mmap.mmap]:
    """The regular file ``path`` as a read-only buffer whose pages are read only when touched (``b""`` when
    empty). Nothing taken from it may outlive the block: slices of it are copies, and a ``memoryview`` of it must
    be released before the block ends."""
    fd, st = open_regular(Path(path), what=what)
    try:
        if st.st_size == 0:  # mmap refuses an empty file; the parser names what it is not
            yield b""
            return
        with mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ) as view:
            yield view
    finally:
        os.close(fd)
