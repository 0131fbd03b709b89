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

An arena of at least :data:`HUGE_MIN` bytes lives on transparent huge pages (:func:`huge_empty`): a
switch touches lines all over it, and with 4 KiB pages nearly every line is a TLB miss (a two-level
page walk under a hypervisor). Measured on MiniLM's arena, restore A + apply B with cold caches
(block4 masks, load average 4 on 2 cores): 0.33 ms on 4 KiB pages, 0.20 ms on huge pages. numpy
advises huge pages itself for allocations of 4 MiB and more
(``numpy._core.multiarray._get_madvise_hugepage``), but only from its block's first 2 MiB boundary
and only while that switch is on; here the arena asks for them itself, 2 MiB-aligned, and says so in
the log when the system refuses.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import threading
import weakref
from collections.abc import Mapping, Sequence

import numpy as np

from edge.errors import ConfigError

__all__ = [
    "LINE_BYTES",
    "UNIT_BYTES",
    "advise_huge",
    "aligned_empty",
    "aligned_offsets",
    "arena_group",
    "compile_write",
    "fold_narrow",
    "HUGE_BYTES",
    "HUGE_MIN",
    "huge_empty",
    "huge_resident",
    "merge_positions",
    "MIN_SAVED",
    "RUN_MIN",
    "SHARE_SAMPLE",
    "share_positions",
    "touch",
]

LINE_BYTES = 64  # one cache line: the alignment :func:`aligned_offsets` gives each tensor
UNIT_BYTES = (16, 8, 4, 2)  # unit sizes tried, largest first (16: numpy's fastest item copy)
#: a unit size is used only when it saves at least this many index operations (a unit of u entries saves
#: u - 1): each extra fancy-index call costs a few microseconds, about what this many operations cost
MIN_SAVED = 2048
RUN_MIN = 128  # a tensor's entries that form one run at least this long are a slice copy (one call of its own)

HUGE_BYTES = 2 << 20  # one transparent huge page (x86-64, and arm64 with 4 KiB base pages)
#: arenas this large or larger go on huge pages. Below it at most one huge page fits, and the TLB covers such an
#: arena in 4 KiB pages anyway (1,024-3,072 second-level entries: 4-12 MiB on Cortex-A72 .. Zen)
HUGE_MIN = 4 << 20
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"

log = logging.getLogger("edge.runtimes.lines")
_said: set[str] = set()  # the refusals already logged (once per process each)

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


def aligned_empty(n: int, dtype, align: int = LINE_BYTES, huge: bool = True) -> np.ndarray:
    """An uninitialised 1-D array of ``n`` items whose first item starts on an ``align``-byte boundary (numpy's
    allocator promises 16 bytes; a large block from glibc starts 16 bytes into a page). With ``huge``, from
    :data:`HUGE_MIN` bytes on, on transparent huge pages, 2 MiB-aligned (:func:`huge_empty`) where the system
    allows."""
    dt = np.dtype(dtype)
    if huge and n * dt.itemsize >= HUGE_MIN and HUGE_BYTES % align == 0:
        raw = huge_empty(n * dt.itemsize)
        if raw is not None:
            return raw.view(dt)
    raw = np.empty(n * dt.itemsize + align, np.uint8)
    skip = -raw.ctypes.data % align
    return raw[skip : skip + n * dt.itemsize].view(dt)


def arena_group(sizes: Mapping, align: int = LINE_BYTES, huge: bool = True) -> dict[np.dtype, np.ndarray]:
    """One arena per element type (``sizes``: dtype -> items), all carved from one buffer (:func:`aligned_empty`), each
    starting on an ``align``-byte boundary, widest type first. One buffer lets :func:`fold_narrow` write the few
    entries a switch has in a wider arena (the float heads of an int8 model) in the same call as its int8 entries."""
    kinds = sorted((np.dtype(d) for d in sizes), key=lambda d: (-d.itemsize, d.str))
    starts, at = {}, 0
    for d in kinds:
        starts[d] = at
        at += -(-int(sizes[d]) * d.itemsize // align) * align
    raw = aligned_empty(at, np.uint8, align, huge)
    return {d: raw[starts[d] : starts[d] + int(sizes[d]) * d.itemsize].view(d) for d in kinds}


def huge_empty(nbytes: int) -> np.ndarray | None:
    """``nbytes`` uninitialised bytes starting on a 2 MiB boundary of a private anonymous map advised
    ``MADV_HUGEPAGE``, or None where the system refuses (no such advice, a failed map or advice; logged once
    each). Only the whole huge pages inside the array are advised: its last partial one stays on 4 KiB pages,
    so (in the kernel's ``madvise`` mode) the resident size is never more than ``nbytes`` rounded to 4 KiB.
    The map is unmapped when the array and every view of it are gone. Whether the kernel really backs it with
    huge pages depends on its setting (``always`` or ``madvise``; ``never`` is logged) and on free contiguous
    memory: :func:`huge_resident` says."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):  # not Linux, or a Python built without it
        _say("nomadvise", "transparent huge pages are not available here (no MADV_HUGEPAGE); arenas use 4 KiB pages")
        return None
    _check_thp_setting()
    length = -(-nbytes // HUGE_BYTES) * HUGE_BYTES + HUGE_BYTES  # room to start on a 2 MiB boundary
    try:
        m = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:
        _say("mmap", f"could not map {length} bytes for a huge-page arena ({e}); using 4 KiB pages")
        return None
    whole = np.frombuffer(m, np.uint8)  # holds the map: it is unmapped when this and its views are gone
    skip = -whole.ctypes.data % HUGE_BYTES
    advised = nbytes // HUGE_BYTES * HUGE_BYTES
    if advised:
        try:
            m.madvise(mmap.MADV_HUGEPAGE, skip, advised)
        except OSError as e:  # EINVAL: a kernel without transparent huge pages
            _say("madvise", f"the kernel refused MADV_HUGEPAGE ({e}); arenas use 4 KiB pages")
            return None
    return whole[skip : skip + nbytes]


def advise_huge(buf: np.ndarray) -> int:
    """Advise ``MADV_HUGEPAGE`` on the whole 2 MiB pages inside a buffer this module did not map (a ``bytes``
    object LiteRT reads in place, say: large ones come zeroed from fresh anonymous memory), before its pages are
    first written. Returns the bytes advised; 0 where none fit or the system refuses (logged once)."""
    lo = buf.__array_interface__["data"][0]
    start, end = -(-lo // HUGE_BYTES) * HUGE_BYTES, (lo + buf.nbytes) // HUGE_BYTES * HUGE_BYTES
    if end <= start:
        return 0
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        _say("nomadvise", "transparent huge pages are not available here (no MADV_HUGEPAGE); arenas use 4 KiB pages")
        return 0
    import ctypes

    _check_thp_setting()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_HUGEPAGE) != 0:
        err = ctypes.get_errno()
        _say("madvise", f"the kernel refused MADV_HUGEPAGE ({os.strerror(err)}); arenas use 4 KiB pages")
        return 0
    return end - start


def huge_resident(array: np.ndarray) -> tuple[int, int]:
    """(bytes of ``array`` on huge pages, bytes of it resident) from ``/proc/self/smaps``: the mappings that
    overlap it, whole (so a mapping shared with other data counts that too); (0, 0) where there is no smaps."""
    lo = array.__array_interface__["data"][0]
    hi = lo + array.nbytes
    huge = rss = 0
    inside = False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's first line: "start-end perms ..."
                    start, end = (int(x, 16) for x in head.split("-"))
                    inside = start < hi and end > lo
                elif inside and head == "AnonHugePages:":
                    huge += int(line.split()[1]) * 1024
                elif inside and head == "Rss:":
                    rss += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0, 0
    return huge, rss


def _check_thp_setting() -> None:
    try:
        with open(_THP_ENABLED) as f:
            setting = f.read(256)
    except OSError:
        return
    if "[never]" in setting:
        _say("never", f"transparent huge pages are off ({_THP_ENABLED}: {setting.strip()}); arenas use 4 KiB pages")


def _say(key: str, message: str) -> None:
    if key not in _said:
        _said.add(key)
        log.warning(message)


def _one_run(pos: np.ndarray | None) -> bool:
    """A whole tensor (``None``) or one long run of positions: a slice copy, a part of its own."""
    return pos is None or (pos.size >= RUN_MIN and int(pos[-1]) - int(pos[0]) == pos.size - 1)


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _buffer(a: np.ndarray) -> np.ndarray:
    """The array at the root of ``a``'s chain of views (its buffer, when that is a one-dimensional array)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def fold_narrow(writes: Sequence[tuple[np.ndarray, list]]) -> list[tuple[np.ndarray, list]]:
    """``writes`` (arena, its pieces as :func:`compile_write` takes them) with fewer fancy-index calls: where arenas
    are views of one buffer (:func:`arena_group`; LiteRT's model bytes viewed as float32 and int8) and one of them
    has one-byte items, the entry-by-entry pieces of them all become pieces of one byte view of that buffer (an entry
    of a wider arena as its bytes), so their write is one call, not one per arena. Only while the extra byte
    positions (``itemsize - 1`` per wider entry) stay under :data:`MIN_SAVED`, what a call costs; slices stay apart.
    The bytes written are the same, bit for bit."""
    groups: dict[int, list[tuple[np.ndarray, list]]] = {}
    for arena, pieces in writes:
        groups.setdefault(id(_buffer(arena)), []).append((arena, pieces))
    out: list[tuple[np.ndarray, list]] = []
    for group in groups.values():
        root = _buffer(group[0][0])
        entrywise = [(a, [p for p in ps if not _one_run(p[1])]) for a, ps in group]
        entrywise = [(a, ps) for a, ps in entrywise if ps]
        extra = sum(p[1].size * (a.dtype.itemsize - 1) for a, ps in entrywise for p in ps)
        narrow = any(a.dtype.itemsize == 1 for a, _ in entrywise)
        if len(entrywise) < 2 or not narrow or extra > MIN_SAVED or root.ndim != 1 or not root.flags.c_contiguous:
            out += group
            continue
        whole = root.view(np.uint8)
        folded = []
        for arena, pieces in group:
            rest = [p for p in pieces if _one_run(p[1])]
            if rest:
                out.append((arena, rest))
            size, at = arena.dtype.itemsize, _address(arena) - _address(whole)
            for off, pos, val in pieces:
                if _one_run(pos):
                    continue
                if size > 1:  # an entry's bytes, in order: positions stay strictly increasing
                    pos = (pos[:, None] * size + np.arange(size)).reshape(-1)
                folded.append((at + off * size, pos, np.ascontiguousarray(val, arena.dtype).view(np.uint8)))
        out.append((whole, folded))
    return out


def compile_write(arena: np.ndarray, pieces: Sequence[tuple[int, np.ndarray | None, np.ndarray]]) -> list[Part]:
    """Parts ``view[index] = values`` that together write each piece's ``values`` at ``offset + positions``.

    ``pieces`` are ``(offset, positions, values)`` with strictly increasing ``positions`` (``None``: the
    ``values.size`` entries from ``offset``) inside disjoint tensors, ``values`` already of ``arena.dtype``.
    """
    parts: list[Part] = []
    rest = []
    for off, pos, val in pieces:
        if _one_run(pos):
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


#: positions arrays compiled writes hold, by content: (dtype, size, digest) -> one read-only array (weakly: it goes
#: with the last prepared write holding it)
_held: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
SHARE_SAMPLE = 1024  # positions hashed to find an equal array (equal ones are then compared in full)
_held_lock = threading.Lock()


def share_positions(parts: Sequence[Part]) -> tuple[Part, ...]:
    """``parts`` with each positions array replaced by an equal one a prepared write already holds, if any.

    An adapter's apply and its undo write the same entries, and so do all the adapters on one mask (SHiRA-WM):
    their compiled positions are equal, and one read-only array serves them all (8 bytes an entry each saved).
    The switch itself is unchanged: the same ``intp`` positions, no cast (numpy converts an index array of
    another integer type on every fancy-index call). The cost, at prepare time: a hash of at most
    :data:`SHARE_SAMPLE` positions and, when an array with that hash is held, a comparison of the two (a full hash
    of MiniLM's 450k positions took 7.7 ms, a quarter of a fused switch; the comparison 0.2 ms).
    """
    out = []
    for view, pos, val in parts:
        if isinstance(pos, np.ndarray) and pos.size:
            sample = np.ascontiguousarray(pos[:: -(-pos.size // SHARE_SAMPLE)])
            key = (pos.dtype.str, pos.size, int(pos[-1]), hashlib.blake2b(sample, digest_size=16).digest())
            with _held_lock:
                held = _held.get(key)
                if held is None or not np.array_equal(held, pos):  # unequal arrays on one key: the newer is held
                    pos.setflags(write=False)
                    _held[key] = held = pos
            pos = held
        out.append((view, pos, val))
    return tuple(out)


def touch(parts: Sequence[Part]) -> None:
    """Read what writing ``parts`` reads and stores to: the arena lines (a gather, which reads the index arrays
    too) and the values, so they are in the cache for the write. Reads only: racing with a write is harmless."""
    for view, pos, val in parts:
        if isinstance(pos, slice):
            np.count_nonzero(view[pos].view(np.uint8))  # a view of the arena: read in place
        else:
            view[pos]
        np.count_nonzero(val.view(np.uint8))


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
