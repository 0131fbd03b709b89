"""``lab.bench_quantized_timing`` and the int8 benches' goal verdicts: paired ratios judged with their interval."""

from __future__ import annotations

import time

import numpy as np
import pytest

import lab.bench_quantized_core as core
from lab.bench_quantized_timing import median_interval, paired_timings, spread


def test_the_median_interval_takes_the_binomial_ranks():
    # n = 11: P(B <= 1) = 12/2048 <= 0.025 < P(B <= 2) = 67/2048, so the 2nd smallest and 2nd largest values
    assert median_interval(range(1, 12)) == (2.0, 10.0)
    # n = 60: P(B <= 21) = 0.0136 <= 0.025 < P(B <= 22) = 0.0259: the 22nd smallest and 22nd largest
    x = np.arange(60.0)
    assert median_interval(x[::-1]) == (21.0, 38.0)  # order of the input does not matter
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few values for 95 %: the range
    with pytest.raises(ValueError):
        median_interval([])


def test_spread_reports_the_median_its_quartiles_and_interval():
    s = spread(np.arange(1.0, 12.0))
    assert s == {"median": 6.0, "iqr": [3.5, 8.5], "ci95": [2.0, 10.0], "n": 11}


def test_a_paired_goal_is_met_only_when_its_whole_interval_is_within_the_limit():
    def g(median, lo, hi):
        return core.judged(median, 1.0, {"median": median, "iqr": [lo, hi], "ci95": [lo, hi], "n": 60}, 2)

    assert g(0.94, 0.84, 0.98) == {
        "value": 0.94,
        "limit": 1.0,
        "met": True,
        "ci95": [0.84, 0.98],
        "iqr": [0.84, 0.98],
        "verdict": "met",
    }
    within = g(0.98, 0.91, 1.09)  # a median below the limit whose interval crosses it: not met, within noise
    assert not within["met"] and within["verdict"] == "within noise"
    assert g(1.02, 0.95, 1.10)["verdict"] == "within noise"  # a median over the limit, its interval across it
    assert g(1.08, 1.02, 1.15)["verdict"] == "NOT met" and not g(1.08, 1.02, 1.15)["met"]
    assert core.judged(0.97, 1.0, None, 2) == {"value": 0.97, "limit": 1.0, "met": True}  # an older row: no interval


def test_goals_and_their_lines_carry_the_interval_and_the_verdict():
    def row(base, switch, spread_=None):
        r = {"model": "m", "base": base, "infer_ms_p50": 1.0, "static_infer_ms_p50": 1.0, "switch_ms_p50": switch}
        if spread_:
            r.update(switch_x_fp32_paired=spread_["median"], switch_x_fp32_spread=spread_)
            r.update(infer_overhead_pct=0.5, infer_overhead_pct_spread=spread([0.1, 0.5, 0.9, 0.4, 0.6, 0.5, 0.7]))
        return r

    noisy = {"median": 0.98, "iqr": [0.9, 1.05], "ci95": [0.93, 1.06], "n": 60}
    goals = core.goals([row("fp32", 0.02), row("int8-static", 0.02, noisy)])
    g = goals["m/int8-static"]
    assert g["switch_x_fp32"]["verdict"] == "within noise" and not g["switch_x_fp32"]["met"]
    assert g["infer_overhead_pct"]["met"] and g["infer_overhead_pct"]["ci95"] == [0.1, 0.9]
    line = core.goal_lines(goals)[-1]
    assert "switch_x_fp32 0.98 [0.93, 1.06] (limit 1.0: within noise)" in line
    assert "infer_overhead_pct 0.5 [0.1, 0.9] (limit 3.0: met)" in line


class _FakeRuntime:
    """What :func:`paired_timings` calls on a runtime; a switch to "A" takes ``cost`` seconds of busy time."""

    def __init__(self, cost: float):
        self.cost, self.closed, self.switches = cost, False, 0

    def switch(self, spec, clip=False):
        if spec == "A":
            self.switches += 1
            t = time.perf_counter() + self.cost
            while time.perf_counter() < t:
                pass

    def wait_settled(self):
        return True

    def run(self, feeds):
        return {}

    def adapter(self, name):
        return type("A", (), {"nnz": 7})()

    def close(self):
        self.closed = True


def test_paired_timings_report_per_round_ratios_with_their_spread():
    rts = {"fp32": _FakeRuntime(2e-4), "int8-static": _FakeRuntime(4e-4)}
    out = paired_timings({b: (rt, lambda f: None, {}) for b, rt in rts.items()}, rounds=3, runs=2, switches=8)
    s = out["int8-static"]["switch_x_fp32_spread"]
    assert s["n"] == 8 and out["int8-static"]["switch_x_fp32_paired"] == s["median"]
    assert s["ci95"][0] <= s["median"] <= s["ci95"][1] and s["iqr"][0] <= s["median"] <= s["iqr"][1]
    assert 1.5 < s["median"] < 2.5  # twice the busy time, paired round by round
    assert "switch_x_fp32_spread" not in out["fp32"] and out["fp32"]["infer_overhead_pct_spread"]["n"] == 3
    assert all(rt.closed and rt.switches == 2 * 10 for rt in rts.values())  # (8 timed + 2 warm-up) x (settled, cold)


def test_median_interval_holds_for_long_runs():
    """The binomial ranks are computed in log space: 1,100 ratios (comb(n, k) / 2**n would overflow a float)."""
    import numpy as np

    from lab.bench_quantized_timing import median_interval

    x = np.random.default_rng(0).normal(1.0, 0.1, 1100)
    lo, hi = median_interval(x)
    assert lo < float(np.median(x)) < hi and hi - lo < 0.05
