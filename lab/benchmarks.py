"""``edge bench``: measured side by side in one run, printed as JSON and recorded in BENCHMARKS.md."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np

from edge.machine import load_average, machine

__all__ = ["commit", "default_targets", "random_shira", "write_section"]


def default_targets(info, pattern: str | None = None) -> list[str]:
    """2-D weights matching ``pattern`` (default: every 2-D weight that is not an embedding table)."""
    names = [k for k, t in info.tensors.items() if len(t.shape) == 2]
    if pattern:
        return [k for k in names if re.search(pattern, k)]
    return [k for k in names if "embed" not in k]


def random_shira(info, targets: list[str], density: float, seed: int, name: str, scale: float = 1e-2):
    """A SHiRA adapter with a random mask and random deltas (for timing; accuracy needs training)."""
    from edge.format.adapter import Adapter, SparseDelta

    rng = np.random.default_rng(seed)
    tensors, shapes = {}, {}
    for t in targets:
        shape = tuple(info.tensors[t].shape)
        size = int(np.prod(shape))
        n = max(1, round(density * size))
        flat = np.sort(rng.choice(size, n, replace=False))
        tensors[t] = SparseDelta(
            np.stack(np.unravel_index(flat, shape)).astype(np.int32),
            (rng.standard_normal(n) * scale).astype(np.float32),
        )
        shapes[t] = shape
    return Adapter(name, info.fingerprint, tensors, shapes, info={"mask": "random", "density": density})


def commit() -> str:
    """The checked-out commit (short hash, ``+dirty`` when tracked files other than BENCHMARKS.md differ)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(  # the benchmark report itself does not count
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!BENCHMARKS.md"],
            cwd=root,
            capture_output=True,
        )
    except OSError:
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_section(path: str | Path, key: str, title: str, body: str, data: dict | None = None) -> None:
    """Replace (or append) the section ``key`` of BENCHMARKS.md with ``body``; keeps the others.

    The read and the write happen under ``PATH.lock`` (``filelock``): two benchmarks finishing at once both keep
    their sections (without it, each wrote back the file it had read, and one section was lost).
    """
    from filelock import FileLock, Timeout

    from edge.errors import WriteError

    path = Path(path)
    try:
        with FileLock(f"{path}.lock", timeout=600):
            _write_section(path, key, title, body, data)
    except Timeout as e:
        raise WriteError(
            f"cannot write {path}: {path}.lock held by another process for 600 s; remove it if stale"
        ) from e


def _write_section(path: Path, key: str, title: str, body: str, data: dict | None) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by `make bench` (`edge bench ...`).\n"
    m = machine()
    load = load_average()
    block = (
        f"<!-- bench:{key} -->\n## {title}\n\n"
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit {commit()} on {m['arch']}, "
        f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, onnxruntime {m.get('onnxruntime', '-')}, "
        f"numpy {m.get('numpy', '-')}; load average {load[0] if load else '-'} when written "
        "(1 min).\n\n"
        f"{body.rstrip()}\n"
    )
    if data is not None:
        block += f"\n<details><summary>JSON</summary>\n\n```json\n{json.dumps(data, indent=1)}\n```\n</details>\n"
    block += f"<!-- /bench:{key} -->\n"
    pat = re.compile(rf"<!-- bench:{re.escape(key)} -->.*?<!-- /bench:{re.escape(key)} -->\n", re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block
    from edge.format.io import atomic_write_bytes

    atomic_write_bytes(path, text.encode())
