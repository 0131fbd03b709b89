"""Sparse arena writes as copies of aligned units: what makes a structured adapter's switch cheap.

numpy's fancy-index assignment costs about the same per *index* whatever the item size, and
its 16-byte items have a specialised copy loop. So a write whose entries come in aligned runs
(a structured SHiRA mask: blocks of 4 or 16 floats, whole stored rows) is compiled, once per
adapter at load, into a fancy index over 16-byte units of the arena (4 float32 or 16 int8
entries per index), viewed as ``numpy.void`` items, plus 8-, 4- and 2-byte units where those
cover enough entries, plus the entries left over, written one by one as before; one
long contiguous run (a whole tensor) is a slice copy. Void items copy raw bytes: bit-exact, and
the assignments of one compiled write touch disjoint entries, so their order does not
matter. Measured on a MiniLM-sized arena (106,176 entries in 16-float blocks, restore A then
apply B): 0.065 ms against 0.206 ms per entry (cache warm), 0.16 against 0.35 ms (cold).

Units are aligned relative to each tensor's start (the ``phase``: its arena offset modulo the
unit), as masks are; a backend that lays tensors out at :func:`aligned_offsets` has one phase
per arena and units that never straddle a cache line.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge.errors import ConfigError

__all__ = [
    "LINE_BYTES",
    "UNIT_BYTES",
    "aligned_empty",
    "aligned_offsets",
    "compile_write",
    "merge_positions",
    "MIN_SAVED",
    "RUN_MIN",
]

LINE_BYTES = 64  # one cache line: the alignment :func:`aligned_offsets` gives each tensor
UNIT_BYTES = (16, 8, 4, 2)  # unit sizes tried, largest first (16: numpy's fastest item copy)
#: a unit size is used only when it saves at least this many index operations (a unit of u entries saves
#: u - 1): each extra fancy-index call costs a few microseconds, about what this many operations cost
MIN_SAVED = 2048
RUN_MIN = 128  # a tensor's entries that form one run at least this long are a slice copy (one call of its own)

Part = tuple[np.ndarray, "np.ndarray | slice", np.ndarray]  # (arena or a view of it, index or slice, values)


def aligned_offsets(sizes: Sequence[int], itemsize: int, align: int = LINE_BYTES) -> tuple[list[int], int]:
    """Offsets (in items) that start each tensor of ``sizes`` items on an ``align``-byte boundary, and the
    arena size in items. For an arena whose buffer starts on such a boundary (numpy's large allocations do)."""
    if align <= 0 or itemsize <= 0 or align % itemsize:
        raise ConfigError(
            f"alignment {align} bytes is not a multiple of the item size {itemsize} bytes; pass a multiple"
        )
    step = align // itemsize
    offsets, at = [], 0
    for n in sizes:
        offsets.append(at)
        at += -(-int(n) // step) * step
    return offsets, at


def aligned_empty(n: int, dtype, align: int = LINE_BYTES) -> np.ndarray:
    """An uninitialised 1-D array of ``n`` items whose first item starts on an ``align``-byte boundary (numpy's
    allocator promises 16 bytes; a large block from glibc starts 16 bytes into a page)."""
    dt = np.dtype(dtype)
    raw = np.empty(n * dt.itemsize + align, np.uint8)
    skip = -raw.ctypes.data % align
    return raw[skip : skip + n * dt.itemsize].view(dt)


def compile_write(arena: np.ndarray, pieces: Sequence[tuple[int, np.ndarray | None, np.ndarray]]) -> list[Part]:
    """Parts ``view[index] = values`` that together write each piece's ``values`` at ``offset + positions``.

    ``pieces`` are ``(offset, positions, values)`` with strictly increasing ``positions`` (``None``: the
    ``values.size`` entries from ``offset``) inside disjoint tensors, ``values`` already of ``arena.dtype``.
    """
    parts: list[Part] = []
    rest = []
    for off, pos, val in pieces:
        if pos is None or (pos.size >= RUN_MIN and int(pos[-1]) - int(pos[0]) == pos.size - 1):  # one long run
            start = off + (0 if pos is None else int(pos[0]))
            parts.append((arena, slice(start, start + val.size), val))
        elif pos.size:
            rest.append((off, pos, val))
    if not rest:
        return parts
    rest.sort(key=lambda r: r[0])  # disjoint tensors in arena order: positions increase across the whole write
    pos = np.concatenate([off + p for off, p, _ in rest])
    val = np.concatenate([v for _, _, v in rest])
    # a unit of u entries saves u - 1 index operations and needs u - 1 adjacent pairs: the pairs bound any saving
    adjacent = np.flatnonzero(pos[1:] - pos[:-1] == 1)  # i: entry i + 1 follows entry i in the arena
    if adjacent.size >= MIN_SAVED:
        widest = max(UNIT_BYTES) // arena.dtype.itemsize
        offs = np.array([off for off, _, _ in rest], np.int64) % max(widest, 1)
        # units are aligned within each tensor, so at its offset modulo u in the arena: one phase when all agree
        eoff = None if (offs == offs[0]).all() else np.repeat(offs, [p.size for _, p, _ in rest])[adjacent]
        covered = np.zeros(pos.size, bool)
        for size in UNIT_BYTES:
            u = size // arena.dtype.itemsize
            if u < 2 or u & (u - 1):  # a power of two: positions modulo u by a mask
                continue
            phase = np.full(adjacent.size, offs[0] % u) if eoff is None else eoff % u
            ok = ((pos[adjacent] - phase) & (u - 1)) == 0
            first, phase = adjacent[ok], phase[ok]
            ok = first + u - 1 < pos.size
            first, phase = first[ok], phase[ok]
            ok = (pos[first + u - 1] - pos[first] == u - 1) & ~covered[first]  # whole, and not in a wider unit
            first, phase = first[ok], phase[ok]
            if first.size * (u - 1) < MIN_SAVED:
                continue
            at = first[:, None] + np.arange(u)
            covered[at] = True
            unit = np.dtype((np.void, size))
            for q in np.unique(phase).tolist():
                sel = phase == q
                view = arena[q : q + (arena.size - q) // u * u].view(unit)
                parts.append((view, (pos[first[sel]] - q) // u, np.ascontiguousarray(val[at[sel]]).view(unit)[:, 0]))
        if covered.any():
            pos, val = pos[~covered], val[~covered]
    if pos.size:
        parts.append((arena, pos, val))
    return parts


def merge_positions(writes: Sequence[tuple[np.ndarray | None, np.ndarray]]) -> tuple[np.ndarray | None, np.ndarray]:
    """One tensor's writes ``(positions or None for all, values)``, applied in order, as one write with strictly
    increasing positions (a later write of an entry wins), or ``(None, values)`` for one whole-tensor write."""
    if len(writes) == 1:
        pos, val = writes[0]
        if pos is None:
            return None, val
        pos = np.asarray(pos, np.int64)
        if pos.size < 2 or bool(np.all(pos[1:] > pos[:-1])):
            return pos, val
    pos = np.concatenate(
        [np.arange(v.size, dtype=np.int64) if p is None else np.asarray(p, np.int64) for p, v in writes]
    )
    val = np.concatenate([v for _, v in writes])
    order = np.argsort(pos, kind="stable")
    pos, val = pos[order], val[order]
    last = np.append(pos[1:] != pos[:-1], True)
    return pos[last], val[last]
