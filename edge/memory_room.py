"""How much memory this process can still take: the smaller of the kernel's ``MemAvailable`` and what the cgroup's
memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``, the tightest on the way to the root) leaves.

A step that allocates in proportion to what a file declares (:mod:`edge.convert.onnx_densify`) checks its need against
this before it allocates, so a hostile file is refused in one line instead of the kernel's OOM killer ending the
process (a Raspberry Pi or a phone has 1-8 GB, a container often less than the machine). Linux only: elsewhere, or
when nothing is readable, :func:`memory_room` returns None and only the caller's explicit caps apply.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["memory_room"]

_UNLIMITED = 1 << 60  # cgroup v1 writes 2**63 - 4096 (page-rounded) for "no limit"; v2 writes "max"


def memory_room(
    meminfo: str | os.PathLike = "/proc/meminfo",
    cgroup: str | os.PathLike = "/proc/self/cgroup",
    root: str | os.PathLike = "/sys/fs/cgroup",
) -> tuple[int, str] | None:
    """``(bytes, where the figure comes from)`` this process may still allocate, or None when no figure is readable.
    The paths are the kernel's; tests point them at files of their own."""
    found = []
    avail = _meminfo_kb(Path(meminfo), "MemAvailable")
    if avail is not None:
        found.append((avail * 1024, f"MemAvailable in {meminfo}"))
    for limit, used, where in _cgroup_limits(Path(cgroup), Path(root)):
        left = max(limit - used, 0)
        found.append((left, f"the cgroup memory limit {where}: {limit >> 20:,} MB, {used >> 20:,} MB used"))
    return min(found) if found else None


def _meminfo_kb(path: Path, field: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_limits(cgroup: Path, root: Path) -> list[tuple[int, int, str]]:
    """``(limit, used, limit file)`` of each memory limit set on this process's cgroup and its ancestors (v2 and v1).
    Used memory leaves out the page cache on the file LRU lists, active and inactive: clean file pages the kernel
    reclaims (dirty ones it writes back first) before its OOM killer runs, as ``MemAvailable`` counts them. (K20 left
    out the inactive ones only: a container that had just copied the model, its pages still active, was told its
    cache was used.) tmpfs and shared memory are not on those lists (swap-backed: on the anon ones) and stay used,
    which ``file`` in memory.stat would not say."""
    try:
        lines = cgroup.read_text().splitlines()[:64]
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":  # v2: memory.max, memory.current, memory.stat's file LRU lists
            out += _limits(root, parts[2], ("memory.max", "memory.current"), ("active_file", "inactive_file"))
        elif "memory" in parts[1].split(","):  # v1
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
            out += _limits(root / "memory", parts[2], files, ("total_active_file", "total_inactive_file"))
    return out


def _limits(base: Path, rel: str, files: tuple[str, str], cache: tuple[str, str]) -> list[tuple[int, int, str]]:
    """The limits set in ``base``/``rel`` and each folder above it up to ``base`` (in a container the path the
    kernel gives may not exist under the mount: then ``base`` alone, the container's own cgroup)."""
    folder = base / rel.strip("/") if rel.strip("/") else base
    if not folder.is_dir():
        folder = base
    out = []
    while True:
        limit = _number(folder / files[0])
        if limit is not None and limit < _UNLIMITED:
            used = _number(folder / files[1]) or 0
            reclaimable = _stat(folder / "memory.stat", cache)
            out.append((limit, max(used - reclaimable, 0), str(folder / files[0])))
        if folder == base or base not in folder.parents:
            return out
        folder = folder.parent


def _number(path: Path) -> int | None:
    try:
        text = path.read_text()[:64].strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: Path, fields: tuple[str, ...]) -> int:
    """The sum of ``fields`` in a memory.stat file (0 for any not read)."""
    found = dict.fromkeys(fields, 0)
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key in found:
                    found[key] = max(int(value), 0)
    except (OSError, ValueError):
        pass
    return sum(found.values())
