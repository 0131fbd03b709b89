"""Switch and inference timings of the int8 benches (:func:`lab.bench_quantized_core.timings`, for onnxruntime's
:mod:`lab.bench_quantized` and LiteRT's :mod:`lab.bench_quantized_litert`): every base's runtime and plain run
interleaved within rounds."""

from __future__ import annotations

import math
import time

import numpy as np

from edge.machine import p50, time_calls
from edge.runtime import Runtime
from lab.benchmarks import default_targets, random_shira

__all__ = ["EVICT_BYTES", "evict_caches", "median_interval", "paired_timings", "spread", "switchable"]


def median_interval(x, conf: float = 0.95) -> tuple[float, float]:
    """A distribution-free ``conf`` interval of the median of ``x`` (order statistics, binomial ranks): the k-th
    smallest and k-th largest values with ``P(Binomial(n, 1/2) <= k - 1) <= (1 - conf) / 2``. Below 6 values no
    rank qualifies at 95 %: the interval is then the range (which covers less than ``conf``)."""
    xs = np.sort(np.asarray(x, float).reshape(-1))
    n = xs.size
    if n == 0:
        raise ValueError("median_interval of no values")

    def pmf(k: int) -> float:  # P(Binomial(n, 1/2) = k), in log space: comb(n, k) / 2**n overflows a float at n >= 1024
        return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2.0))

    tail, cdf, k = (1.0 - conf) / 2, 0.0, 0
    while k < n and cdf + pmf(k) <= tail:
        cdf += pmf(k)
        k += 1
    k = max(k, 1)
    return float(xs[k - 1]), float(xs[n - k])


def spread(x) -> dict:
    """The median of paired per-round ratios ``x``, its quartiles and its 95 % interval (:func:`median_interval`)."""
    q1, med, q3 = (float(v) for v in np.percentile(np.asarray(x, float), [25, 50, 75]))
    return {"median": med, "iqr": [q1, q3], "ci95": list(median_interval(x)), "n": int(np.size(x))}


def switchable(path, **runtime_kw) -> Runtime:
    """A settled-hybrid runtime on ``path`` with one random SHiRA adapter "A" loaded (density 1 %, the same entries
    on every base; an int8 base takes it through its float twin's fingerprint, requantized and clipped at load)."""
    rt = Runtime(path, strategy="hybrid", **runtime_kw)
    info = rt.info
    a = random_shira(info, default_targets(info), 0.01, seed=1, name="A")
    if info.float_fingerprint is not None:
        a = type(a)("A", info.float_fingerprint, a.tensors, a.shapes, info=a.info)
    rt.load_adapter(a, clip=True)
    return rt


#: bytes :func:`evict_caches` reads: twice a 32 MiB last-level cache (the EPYC this bench runs on), so it evicts
#: the caches of any smaller CPU too
EVICT_BYTES = 64 << 20


def evict_caches(buf: np.ndarray) -> None:
    """Read all of ``buf`` (:data:`EVICT_BYTES`): whatever the caller touched before leaves every cache level, so
    the next timing starts from the same state whatever ran before it (e.g. a larger model's rebuild)."""
    np.count_nonzero(buf)


def paired_timings(contestants: dict, rounds: int, runs: int, switches: int, evict=evict_caches) -> dict:
    """``contestants``: base -> (runtime from :func:`switchable`, plain run ``fn(feeds)``, feeds). Switch base -> A
    and inference (the settled runtime and the plain run) per base, both interleaved within rounds: each round
    switches every base once, in a rotated order, and times every base's runs, so the ratios to fp32
    (``switch_x_fp32_paired``: the median of per-round ratios; ``switch_x_fp32_spread``: its quartiles and 95 %
    interval, :func:`spread`) are paired; so is ``infer_overhead_pct`` (the median of per-round ratios of the
    runtime's p50 to the plain run's, the two timed back to back in an order alternated every round; its spread in
    ``infer_overhead_pct_spread``, in percent). Closes the runtimes.

    Each round also times the same switch once more with every base in the same cache state: settled, then the
    caches evicted (``evict(buffer)``, :func:`evict_caches`) right before it (``switch_cold_ms_p50``,
    ``switch_cold_x_fp32_paired`` and ``switch_cold_x_fp32_spread``). The settled switch alone starts from what the
    base's own rebuild left in the caches, and a larger build leaves them colder: on onnxruntime's digits-vit
    int8-static (a 10.8 ms build against fp32's 5.5 ms) every part of the switch, its pure Python as much as its
    writes, took 4-13 % longer than fp32's after settling, while the same switch repeated warm took 1.035x and
    after an eviction 1.00x (2026-12-01, load average 1.6-2.0, 150 paired rounds)."""
    names = list(contestants)
    sw: dict[str, list[float]] = {b: [] for b in names}
    cold: dict[str, list[float]] = {b: [] for b in names}
    buf = np.ones(EVICT_BYTES, np.uint8)  # ones, not zeros: its pages are all resident, read from DRAM
    for i in range(switches + 2):
        for k in range(len(names)):  # rotated: no base always runs first after the others' rebuilds
            b = names[(i + k) % len(names)]
            rt = contestants[b][0]
            for timed in (sw, cold):
                rt.switch(None)
                rt.wait_settled()
                if timed is cold:
                    evict(buf)
                t0 = time.perf_counter()
                rt.switch("A", clip=True)
                t1 = time.perf_counter()
                rt.wait_settled()
                if i >= 2:
                    timed[b].append((t1 - t0) * 1e3)
    del buf
    times = {b: {"rt": [], "plain": []} for b in names}
    ratio: dict[str, list[float]] = {b: [] for b in names}  # per round: runtime p50 / plain p50, paired
    for r in range(rounds):
        for b, (rt, plain, feeds) in contestants.items():
            pair = [("plain", lambda p=plain, f=feeds: p(f)), ("rt", lambda q=rt, f=feeds: q.run(f))]
            per = {}
            for k, fn in pair if r % 2 == 0 else pair[::-1]:  # alternated: neither side always runs first
                ts = time_calls(fn, runs)
                times[b][k] += ts
                per[k] = float(np.median(ts))
            ratio[b].append(per["rt"] / per["plain"])
    out = {}
    for b, (rt, _, _) in contestants.items():
        o = out[b] = {
            "switch_ms_p50": p50(sw[b]),
            "switch_cold_ms_p50": p50(cold[b]),
            "adapter_nnz": rt.adapter("A").nnz,
        }
        if "fp32" in sw and b != "fp32":
            for key, t in (("switch", sw), ("switch_cold", cold)):
                o[f"{key}_x_fp32_spread"] = spread(np.asarray(t[b]) / np.asarray(t["fp32"]))
                o[f"{key}_x_fp32_paired"] = o[f"{key}_x_fp32_spread"]["median"]
        o["infer_ms_p50"], o["static_infer_ms_p50"] = p50(times[b]["rt"]), p50(times[b]["plain"])
        pct = spread(100.0 * (np.asarray(ratio[b]) - 1.0))
        o["infer_overhead_pct"], o["infer_overhead_pct_spread"] = pct["median"], pct  # of the per-round ratios
        rt.close()
    return out
