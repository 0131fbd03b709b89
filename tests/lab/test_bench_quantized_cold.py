"""``lab.bench_quantized_timing``: the switch timed from one cache state on every base (issue 18's switch goal)."""

from __future__ import annotations

import types

import lab.bench_quantized_core as core
import lab.bench_quantized_timing as timing


class _Machine:
    """A clock a switch advances, and fake caches: a runtime's settle leaves its ``residue`` seconds of extra cost
    on the next switch (a larger rebuild evicts more), an eviction leaves every runtime the same extra cost."""

    EVICTED = 2e-4

    def __init__(self):
        self.now, self.extra, self.evictions = 0.0, 0.0, 0

    def perf_counter(self) -> float:
        return self.now

    def evict(self, buf) -> None:
        assert buf.nbytes == timing.EVICT_BYTES  # the real buffer is handed over, not a stand-in
        self.evictions += 1
        self.extra = self.EVICTED


class _Runtime:
    """What :func:`paired_timings` calls on a runtime; a switch to "A" costs ``cost`` plus what the caches add."""

    def __init__(self, machine: _Machine, cost: float, residue: float):
        self.machine, self.cost, self.residue, self.closed = machine, cost, residue, False

    def switch(self, spec, clip=False):
        if spec == "A":
            self.machine.now += self.cost + self.machine.extra

    def wait_settled(self):
        self.machine.extra = self.residue
        return True

    def run(self, feeds):
        self.machine.now += 1e-3
        return {}

    def adapter(self, name):
        return types.SimpleNamespace(nnz=7)

    def close(self):
        self.closed = True


def test_paired_timings_time_the_switch_from_one_cache_state_on_every_base(monkeypatch):
    """The same switch work on both bases, but the int8 base's own rebuild leaves the caches colder: the settled
    ratio shows the rebuild's residue (3x), the evicted one the switch's own cost (1x); both reported and judged."""
    m = _Machine()
    monkeypatch.setattr(timing, "time", m)  # paired_timings reads time.perf_counter
    rts = {"fp32": _Runtime(m, 2e-4, 0.0), "int8-static": _Runtime(m, 2e-4, 4e-4)}
    out = timing.paired_timings({b: (rt, lambda f: None, {}) for b, rt in rts.items()}, 2, 2, 8, evict=m.evict)
    o = out["int8-static"]
    assert abs(o["switch_x_fp32_paired"] - 3.0) < 1e-6  # settled: 6e-4 against 2e-4 s
    assert abs(o["switch_cold_x_fp32_paired"] - 1.0) < 1e-6  # evicted: 4e-4 against 4e-4 s
    assert o["switch_cold_x_fp32_spread"]["n"] == 8 and m.evictions == 2 * 10  # 8 timed + 2 warm-up, per base
    assert abs(out["fp32"]["switch_cold_ms_p50"] - 0.4) < 1e-9 and abs(out["fp32"]["switch_ms_p50"] - 0.2) < 1e-9
    assert "switch_cold_x_fp32_spread" not in out["fp32"] and all(rt.closed for rt in rts.values())
    fp32 = {"model": "m", "base": "fp32", "infer_ms_p50": 1.0, "static_infer_ms_p50": 1.0, **out["fp32"]}
    g = core.goals([fp32, {"model": "m", "base": "int8-static", **o}])["m/int8-static"]
    assert g["switch_x_fp32"]["verdict"] == "NOT met" and g["switch_cold_x_fp32"]["value"] == 1.0
    assert "switch_cold_x_fp32 1.0 [1.0, 1.0] (limit 1.0: met)" in core.goal_lines({"m/int8-static": g})[-1]


def test_the_tables_show_the_evicted_switch_beside_the_settled_one():
    import lab.bench_quantized as bq
    import lab.bench_quantized_litert as bl

    row = {"model": "m", "base": "fp32", "bytes": 1, "infer_ms_p50": 1.0, "static_infer_ms_p50": 1.0}
    row.update(switch_ms_p50=0.027, switch_cold_ms_p50=0.052, mean_acc_base=0.3, mean_acc_adapted=0.8, load_1m=1.0)
    for render in (bq.markdown, bl.markdown):
        table = render({"rows": [row], "goals": {}})
        assert "| switch ms p50 (evicted) |" in table and "| 0.027 (0.052) |" in table
    older = {k: v for k, v in row.items() if k != "switch_cold_ms_p50"}  # a row of a run before the evicted timing
    assert "| 0.027 |" in bq.markdown({"rows": [older], "goals": {}})
