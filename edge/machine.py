"""What machine a measurement ran on, and the small timing helpers every measurement uses."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable

import numpy as np

__all__ = [
    "MAX_THREADS",
    "check_threads",
    "load_average",
    "machine",
    "p50",
    "peak_rss_mb",
    "reset_peak_rss",
    "status_mb",
    "time_calls",
]


#: the most intra-op threads a runtime or device profile asks for: onnxruntime hung building a session with 10**5
#: and overflowed its int at 10**30 (a device has a few cores; 256 leaves room for any board)
MAX_THREADS = 256


log = logging.getLogger("edge.machine")
_OVERSUBSCRIBED_LOGGED: set[int] = set()  # thread counts already reported above the core count


def check_threads(threads: object, what: str = "threads") -> None:
    """``threads`` is None (the backend's default) or an int in 1..:data:`MAX_THREADS`; else a ConfigError.

    More threads than this machine has cores is allowed (a profile may target a bigger board) but is
    logged once per count at INFO: the extra threads only contend for the same cores."""
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or not 0 < threads <= MAX_THREADS
    ):
        from edge.errors import ConfigError

        raise ConfigError(
            f"{what} must be a positive integer or null (backend default), at most {MAX_THREADS}, got {threads!r}"
        )
    cores = os.cpu_count()
    if threads is not None and cores and threads > cores and threads not in _OVERSUBSCRIBED_LOGGED:
        _OVERSUBSCRIBED_LOGGED.add(threads)
        log.info(
            "%s=%d is more than the %d cores of this machine: the extra threads contend for the same cores "
            "(usually slower); use at most %d here",
            what,
            threads,
            cores,
            cores,
        )


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "arch": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
    }
    from edge.cpu_int8 import u8s8_saturates

    info["u8s8_saturates"] = u8s8_saturates()  # onnxruntime's int8 kernels lose sums here (x86 without VNNI)
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        info["memory_gb"] = round(mem / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    for mod in ("numpy", "onnxruntime", "onnx"):
        version = _version(mod)
        if version is not None:
            info[mod] = version
    return info


def _version(mod: str) -> str | None:
    """The installed version of ``mod``: the imported module's, else its distribution's record, without importing it
    (``import onnx`` costs 0.7-1.2 s of a device's cold start: it imports ml_dtypes), or None if it is not there."""
    import sys
    from importlib import metadata, util

    if mod in sys.modules:
        return getattr(sys.modules[mod], "__version__", None)
    try:
        if util.find_spec(mod) is None:
            return None
        return metadata.version(mod)
    except (ImportError, ValueError, metadata.PackageNotFoundError):  # a build under another name: ask the module
        try:
            return __import__(mod).__version__
        except ImportError:
            return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux/macOS)."""
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``...) in MB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return None


def reset_peak_rss() -> None:
    """Reset this process's peak resident memory (``VmHWM``) to its current value (Linux; no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (rounded), or None where the OS has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def time_calls(fn: Callable[[], object], n: int, warmup: int = 3) -> list[float]:
    """Wall times of ``n`` calls of ``fn`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def p50(xs) -> float:
    """The median of ``xs`` (NaN when empty)."""
    return float(np.median(np.asarray(xs))) if len(xs) else float("nan")
