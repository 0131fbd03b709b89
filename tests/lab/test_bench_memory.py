"""``edge bench memory``: every contestant in a fresh child, above a baseline child that did the same bench work;
ready times paired within rounds whose order rotates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import _tiny
import numpy as np
import pytest

import lab.bench_run
from edge.errors import EdgeError
from lab.bench_memory import GOALS, bench_memory, markdown, spread
from lab.bench_run import fresh_child, rotated

ROOT = Path(__file__).resolve().parents[2]
X = {"x": np.random.default_rng(0).standard_normal((1, 10)).astype(np.float32)}


def test_each_strategy_and_the_plain_session_measured_in_fresh_children(tmp_path):
    _tiny.make_mlp(tmp_path / "m.onnx", seed=3)
    r = bench_memory(tmp_path / "m.onnx", X, repeat=1, rounds=2, progress=False)
    assert set(r["strategies"]) == {"hybrid", "bound", "rebuild"} and r["model"] == "tiny-mlp"
    assert r["baseline_rss_mb"] > 0 and r["params"] == 10 * 20 + 20 + 20 * 2 + 2  # weights and biases
    assert r["rounds"] == 2 and r["repeat"] == 1 and r["wall_s"] > 0
    for name, f in [("plain", r["plain"]), *r["strategies"].items()]:
        assert f["peak_mb"] >= f["rss_mb"] and f["ready_ms"] > 0, name
        if sys.platform.startswith("linux"):  # the kernel's part of the main thread's CPU, per round (per thread)
            assert f["ready_sys_ms"] >= 0 and f["ready_cpu_ms"] > 0, name
            rounds = r["ready_rounds_sys_ms"][name]
            assert len(rounds) == 2 and abs(np.median(rounds) - f["ready_sys_ms"]) <= 0.01, name
    for name, f in r["strategies"].items():
        x = f["ready_x"]
        assert f["strategy"] == name and f["predicted_mb"] > 0
        assert 0 < x["min"] <= x["q1"] <= x["median"] <= x["q3"] <= x["max"], name
        assert x["min"] <= x["ci_low"] <= x["median"] <= x["ci_high"] <= x["max"], name
        assert f["ready_cpu_ms"] > 0 and f["ready_cpu_x"]["median"] > 0, name
        assert r["goals"][f"{name}_ready_x"] == {
            "value": x["median"],
            "limit": GOALS["ready_x"],
            "met": x["median"] <= GOALS["ready_x"],
            "ci": [x["ci_low"], x["ci_high"]],
            "cpu": f["ready_cpu_x"]["median"],
        }
    assert list(r["ready_rounds_ms"]) == ["plain", "hybrid", "bound", "rebuild"]
    assert all(len(v) == 2 for v in r["ready_rounds_ms"].values())
    assert r["goals"]["bound_rss_x"]["limit"] == GOALS["bound_rss_x"]
    assert r["goals"]["bound_rss_x"]["value"] == round(r["strategies"]["bound"]["rss_mb"] / r["plain"]["rss_mb"], 3)
    md = markdown(r)
    assert "| plain session |" in md and "| hybrid |" in md and "| bound_rss_x |" in md
    assert "2 rounds of fresh processes" in md
    lean = r["plain_options"]  # a tiny model: the runtime's prepacked sessions have no CPU arena
    assert lean["cpu_arena"] is False and lean["peak_mb"] >= lean["rss_mb"]
    assert "| plain session, the runtime's options (no CPU arena) |" in md


def test_ready_ratios_are_paired_within_rounds_and_the_order_rotates(tmp_path, monkeypatch):
    """Children faked: the machine slows down round after round, each strategy keeps its ratio to plain."""
    _tiny.make_mlp(tmp_path / "m.onnx", seed=3)
    factor = {"plain": 1.0, "hybrid": 1.25, "bound": 2.0, "rebuild": 0.5}
    calls: list[tuple[str, bool]] = []

    def child(target, spec, *, what, timeout=900.0):
        assert target == "lab.bench_memory:_child" and spec["kind"] in what
        calls.append((spec["kind"], spec["memory"]))
        timed = sum(k in factor for k, _ in calls)
        slow = 10.0 * (1 + (timed - 1) // 4)  # 10 ms in round 0, 20 in round 1...
        out = {"rss_mb": 100.0, "peak_mb": 110.0}
        if spec["kind"] == "plain_options":  # memory only: a plain session with the runtime's options
            out.update(rss_mb=120.0, peak_mb=125.0, ready_ms=1.0, ready_cpu_ms=1.0)
        if spec["kind"] in factor:
            out.update(ready_ms=slow * factor[spec["kind"]], ready_cpu_ms=slow, rss_mb=150.0, peak_mb=160.0)
            out.update(model="tiny-mlp")
            out.update(strategy=spec["kind"], predicted_mb=40.0, weights_mb=0.1)
        return out

    monkeypatch.setattr(lab.bench_run, "fresh_child", child)
    r = bench_memory(tmp_path / "m.onnx", X, repeat=2, rounds=5, progress=False)
    kinds = ["plain", "hybrid", "bound", "rebuild"]
    rounds = [[k for k, _ in calls[i : i + 6] if k in factor] for i in (0, 6)]
    rounds += [[k for k, _ in calls[12 + 4 * i : 16 + 4 * i]] for i in range(3)]
    assert rounds == [rotated(kinds, i) for i in range(5)]
    memory = ["baseline", "plain_options", *kinds, "baseline", "plain_options", *rotated(kinds, 1)]
    assert [k for k, m in calls if m] == memory  # a tiny model: its prepacked sessions have no CPU arena
    assert sum(m for _, m in calls) == 12 and len(calls) == 12 + 3 * 4
    assert r["plain_options"] == {"rss_mb": 20.0, "peak_mb": 25.0, "cpu_arena": False}
    for name, f in r["strategies"].items():
        assert f["ready_x"] == {k: factor[name] for k in ("min", "q1", "median", "q3", "max", "ci_low", "ci_high")}
        assert f["ready_cpu_x"]["median"] == 1.0 and f["ready_cpu_ms"] == 30.0
        assert f["rss_mb"] == 50.0 and f["peak_mb"] == 60.0
        assert r["goals"][f"{name}_ready_x"]["met"] == (factor[name] <= GOALS["ready_x"])
    assert r["plain"]["ready_ms"] == 30.0 and "ready_x" not in r["plain"]  # the median round's plain session
    md = markdown(r)
    assert "| bound | 50.0 | 60.0 | 40.0 | 60 | 2.00 | 2.00-2.00 | 2.00-2.00 | 2.00-2.00 | 30.0 | - | 1.00 |" in md
    assert "| plain session, the runtime's options (no CPU arena) | 20.0 | 25.0 | - | - | - | - | - | - | - | - |" in md
    assert (
        "| bound_ready_x | 2.00x | 2.00-2.00 | 1.00x | 1.5x | no |" in md
        and "| bound_rss_x | 1.00x | - | - | 1.2x | yes |" in md
    )


def test_the_interval_of_the_median_ratio_narrows_with_rounds():
    rng = np.random.default_rng(1)
    few, many = (spread(np.exp(rng.normal(0.2, 0.3, n))) for n in (9, 81))
    for x in (few, many):
        assert x["min"] <= x["q1"] <= x["median"] <= x["q3"] <= x["max"]
        assert x["min"] <= x["ci_low"] <= x["median"] <= x["ci_high"] <= x["max"]
    assert many["ci_high"] - many["ci_low"] < 0.6 * (few["ci_high"] - few["ci_low"])
    assert many["ci_low"] < np.exp(0.2) < many["ci_high"]  # the true median ratio


def test_rounds_and_repeat_are_checked():
    with pytest.raises(EdgeError, match="--rounds >= 1"):
        bench_memory("m.onnx", X, rounds=0, progress=False)


def test_a_failing_child_is_an_error_naming_it_with_its_stderr():
    with pytest.raises(EdgeError, match=r"(?s)probe x failed \(exit code 1\).*KeyError"):
        fresh_child("lab.bench_memory:_child", {"kind": "plain"}, what="probe x")
    with pytest.raises(EdgeError, match="function of a lab module"):
        fresh_child("os:system", {}, what="probe y")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps")
def test_every_child_holds_its_libraries_whole_before_it_measures():
    """A page of library code is resident only once something ran it: the bench maps them all in every child, the
    baseline too, so the code a contestant runs is not counted as its memory (a plain session on the digits ViT ran
    9.6 MB of onnxruntime's that the baseline never ran)."""
    code = "import onnxruntime, lab.bench_memory as b; b._map_libraries(); print(open('/proc/self/smaps').read())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    kb: dict[str, int] = {"Size": 0, "Rss": 0}
    library = False
    for line in out.splitlines():
        head = line.split()
        if len(head) >= 6 and "-" in head[0] and ":" in head[3]:  # a mapping: range, perms, offset, device, inode, path
            library = "onnxruntime" in head[5] and head[1][0] == "r"
        elif library and head[0][:-1] in kb:
            kb[head[0][:-1]] += int(head[1])
    # every page resident, though no session ran (but a few past the end of the file, which cannot be, and the odd
    # page the kernel reclaims before smaps is read: 200 KB of 39 MB once in CI here). Unmapped, the code no session
    # ran is tens of per cent of it (9.6 MB a plain session runs), so 1 % still tells mapped from not
    assert kb["Size"] > 10_000 and kb["Size"] - kb["Rss"] < max(64, kb["Size"] // 100), kb
