"""``edge bench quantized``: goals and the BENCHMARKS.md table from its figures (no models run here)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from lab.bench_quantized import BASES, goals, markdown  # noqa: E402


def _row(base, acc, infer, plain, switch, rss, plain_rss):
    return {
        "model": "digits-vit",
        "base": base,
        "bytes": 1000,
        "mean_acc_base": 0.3,
        "mean_acc_adapted": acc,
        "infer_ms_p50": infer,
        "static_infer_ms_p50": plain,
        "infer_overhead_pct": 100 * (infer / plain - 1),
        "switch_ms_p50": switch,
        "rss_mb": rss,
        "plain_rss_mb": plain_rss,
        "load_1m": 1.0,
    }


def test_goals_compare_each_int8_base_with_fp32_of_the_same_model():
    rows = [
        _row("fp32", 0.850, 1.00, 0.99, 0.10, 9.0, 6.0),
        _row("int8-dynamic", 0.845, 1.02, 1.00, 0.09, 5.0, 3.0),
        _row("int8-static", 0.830, 1.10, 1.00, 0.12, 7.0, 4.0),
    ]
    g = goals(rows)
    assert set(g) == {"digits-vit/int8-dynamic", "digits-vit/int8-static"}
    dyn, st = g["digits-vit/int8-dynamic"], g["digits-vit/int8-static"]
    assert dyn["acc_gap_points"]["value"] == 0.5 and dyn["acc_gap_points"]["met"]
    assert not st["acc_gap_points"]["met"] and st["acc_gap_points"]["value"] == 2.0
    assert dyn["infer_overhead_pct"]["met"] and not st["infer_overhead_pct"]["met"]
    assert dyn["rss_below_fp32_plain"]["met"] and not st["rss_below_fp32_plain"]["met"]  # 7.0 is not below 6.0
    assert dyn["switch_x_fp32"]["met"] and not st["switch_x_fp32"]["met"]
    text = markdown({"rows": rows, "goals": g})
    assert "| digits-vit | int8-static |" in text and "NOT met" in text


def test_every_base_has_options_for_every_model_family():
    assert set(BASES) == {"fp32", "int8-dynamic", "int8-static"}
    for options in BASES.values():
        assert set(options) == {"demo", "minilm"}


def test_the_memory_cell_shows_a_plain_session_with_the_runtimes_options_where_the_bench_measured_one():
    from lab.bench_quantized_core import rss_cell

    row = _row("fp32", 0.85, 1.0, 1.0, 0.1, 3.2, 1.8)
    assert rss_cell(row) == "3.2 (1.8)"
    assert rss_cell({**row, "plain_options_rss_mb": 1.75}) == "3.2 (1.8; 1.8 no arena)"
    assert rss_cell({**row, "rss_mb": None}) == "not measured"
