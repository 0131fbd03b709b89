"""``lab.bench_quantized_litert``: its goals, table and the entry ``edge bench quantized --backend tflite`` calls."""

from __future__ import annotations

import lab.bench_quantized_litert as bl


def _row(base, acc, infer, plain, switch, rss=None):
    row = {
        "model": "digits-vit",
        "base": base,
        "bytes": 1000,
        "mean_acc_base": 0.3,
        "mean_acc_adapted": acc,
        "infer_ms_p50": infer,
        "static_infer_ms_p50": plain,
        "infer_overhead_pct": 100.0 * (infer / plain - 1.0),
        "switch_ms_p50": switch,
        "load_1m": 1.0,
        "rss_mb": rss,
        "plain_rss_mb": rss and rss - 4,
    }
    if base != "fp32":
        row.update(mean_acc_requantized=0.8, requantized_clipped_per_adapter=3.0, requantized_nnz=662)
        row["mean_acc_adapted_builtin"] = 0.79
    return row


def test_goals_and_table_judge_each_int8_base_against_fp32_of_the_same_run():
    rows = [_row("fp32", 0.85, 1.0, 1.0, 0.10, rss=9.0), _row("int8-dynamic", 0.845, 1.05, 1.0, 0.08, rss=4.0)]
    g = bl.goals(rows)["digits-vit/int8-dynamic"]
    assert g["acc_gap_points"] == {"value": 0.5, "limit": 1.0, "met": True}
    assert g["infer_overhead_pct"]["value"] == 5.0 and not g["infer_overhead_pct"]["met"]
    assert g["switch_x_fp32"]["value"] == 0.8 and g["switch_x_fp32"]["met"]
    assert g["rss_below_fp32_plain"] == {"value": 4.0, "limit": 5.0, "met": True}
    table = bl.markdown({"rows": rows, "goals": bl.goals(rows)})
    assert (
        "| digits-vit | int8-dynamic | 1,000 | 1.050 (1.000) | 4.0 (0.0) | 0.080 | 0.3000 | 0.8450 (0.7900) |" in table
    )
    assert "0.800 (3 of 662)" in table and "infer_overhead_pct 5.0 (limit 3.0: NOT met)" in table


def test_minilm_rows_are_judged_without_an_accuracy_goal_and_shown_by_cosine():
    rows = []
    for base, cos in (("fp32", 1.0), ("int8-dynamic", 0.997)):
        r = _row(base, 0.0, 10.0, 10.0, 1.0)
        del r["mean_acc_base"], r["mean_acc_adapted"]
        r.pop("mean_acc_adapted_builtin", None)
        r.update(model="all-MiniLM-L6-v2", cosine_base=cos, cosine_adapted=cos - 0.001)
        rows.append(r)
    g = bl.goals(rows)["all-MiniLM-L6-v2/int8-dynamic"]
    assert "acc_gap_points" not in g and g["switch_x_fp32"]["value"] == 1.0
    assert "| 0.9970 | 0.9960 |" in bl.markdown({"rows": rows, "goals": bl.goals(rows)})
    assert bl.SECTION == "quantized:tflite"


def test_the_switch_goal_takes_the_ratio_paired_within_rounds_when_the_row_has_it():
    rows = [_row("fp32", 0.85, 1.0, 1.0, 0.10), _row("int8-dynamic", 0.845, 1.0, 1.0, 0.12)]
    assert bl.goals(rows)["digits-vit/int8-dynamic"]["switch_x_fp32"]["value"] == 1.2  # p50 over p50
    rows[1]["switch_x_fp32_paired"] = 0.97  # the median of per-round ratios (lab.bench_quantized_timing)
    assert bl.goals(rows)["digits-vit/int8-dynamic"]["switch_x_fp32"] == {"value": 0.97, "limit": 1.0, "met": True}
