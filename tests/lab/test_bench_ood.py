"""``edge bench ood`` and the stream's routing figures: paired overheads, routing as served, on tiny inputs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from test_router import make_prelm

from edge.errors import ConfigError
from lab.bench_ood import CNN_TAPS, GOALS, VIT_TAPS, cli, markdown
from lab.bench_overhead import encoder_overhead, paired_pct, time_rounds
from lab.stream import _row, _Votes


def test_paired_overhead_is_the_median_of_per_round_ratios():
    per_round = {"plain": [1.0, 2.0, 1.0, 4.0], "graph": [1.1, 2.4, 1.05, 4.0]}  # ratios 1.1, 1.2, 1.05, 1.0
    assert paired_pct(per_round, "graph") == pytest.approx(7.5)


def test_rounds_time_every_contestant_in_blocks():
    calls = {"a": 0, "b": 0}

    def bump(k):
        calls[k] += 1

    t, per_round = time_rounds({"a": lambda: bump("a"), "b": lambda: bump("b")}, runs=12, rounds=4)
    assert {k: len(v) for k, v in t.items()} == {"a": 12, "b": 12}
    assert {k: len(v) for k, v in per_round.items()} == {"a": 4, "b": 4}
    assert calls == {"a": 12 + 4 * 3, "b": 12 + 4 * 3}  # 3 untimed warm-up calls per block


def test_encoder_overhead_reports_batch_one_first_and_batch_16_beside_it(tmp_path):
    make_prelm(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)
    r = encoder_overhead(tmp_path / "m.onnx", {"x": x}, runs=16, rounds=2, threads=1)
    assert r["batch"] == 1 and set(r["per_batch"]) == {"batch1", "batch16"}
    assert r["overhead_pct"] == r["per_batch"]["batch1"]["overhead_pct"] and np.isfinite(r["overhead_pct"])
    assert r["taps"] == ["h0"] and r["rounds"] == 2
    # each contestant fetches what a served stream does: the encoder's own outputs, and the vote beside them
    assert r["fetched"] == {"plain": ["logits", "features"], "headed": ["logits", "features", "edge.vote"]}
    assert all(np.isfinite([v["taps_pct"], v["head_pct"]]).all() for v in r["per_batch"].values())  # the head apart


def test_the_vits_default_taps_are_one_normalised_tap(tmp_path):
    """``attn-in:1``: the first block's normalised input alone (one pooled tensor, no Concat)."""
    import onnx

    from edge.route.taps import tap_model
    from edge.route.tapsets import resolve_taps

    make_prelm(tmp_path / "m.onnx")
    assert resolve_taps(onnx.load(str(tmp_path / "m.onnx")), VIT_TAPS) == ["n0"]  # the first LayerNorm's output
    tapped = tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", VIT_TAPS)
    assert tapped.tensors == ("n0",) and tapped.width == 8
    assert CNN_TAPS == "first"


@pytest.mark.parametrize("taps", ["nope", "mlp-in:0", "attn:x"])
def test_bench_refuses_a_bad_tap_set_before_building_anything(tmp_path, taps):
    args = SimpleNamespace(cache=tmp_path / "never-built", model="vit", taps=taps, quiet=True)
    with pytest.raises(ConfigError, match="tap set"):
        cli(args)
    assert not (tmp_path / "never-built").exists()


def step(codes, names=("clean", "rotate")):
    return SimpleNamespace(codes=np.asarray(codes), names=names)


def test_stream_votes_count_an_ood_vote_on_a_known_domain_as_wrong():
    v = _Votes()
    v.add(step([1, 1, -1, 0]), "rotate")  # 2 right, 1 rejected, 1 routed to clean
    v.add(step([-1, -1]), "invert")  # not known yet: not counted
    assert v.as_dict() == {"known_inputs": 4, "routing_served": 0.5, "known_rejected": 0.25}
    w = _Votes()
    w.add(step([0, 0, 0, 0]), "clean")
    assert _Votes.pooled([v.as_dict(), w.as_dict(), _Votes().as_dict()]) == {
        "known_inputs": 8,
        "routing_served": 0.75,
        "known_rejected": 0.125,
    }
    assert _Votes().as_dict()["routing_served"] is None
    row = {"inputs": 8, "acc": 0.5, "base_acc": 0.25, "oracle_acc": 1.0, **_Votes().as_dict()}
    assert _row(row).split() == ["8", "50.0%", "25.0%", "100.0%", "-", "-"]


def fake_result() -> dict:
    m = {"auroc": 0.9, "auroc_near": 0.8, "auroc_far": 0.95, "fpr95": 0.3, "fpr98": 0.4}
    o = {
        "plain_ms": 0.3,
        "graph_ms": 0.33,
        "overhead_pct": 10.0,
        "overhead_pct_pooled_p50": 11.0,
        "overhead_pct_p10": 9.0,
        "taps_pct": 2.0,
        "numpy_overhead_pct": 20.0,
        "bipolar_overhead_pct": 40.0,
    }
    return {
        "taps": {"set": "attn", "tensors": ["a", "b"], "width": 128},
        "methods": {"hdc": m, "msp": m},
        "methods_final_features": {"hdc": m, "msp": m},
        "per_shift": {"rotate": {"hdc": m, "msp": m}},
        "near": [],
        "far": ["rotate"],
        "routing_served": 0.913,
        "known_rejected": 0.049,
        "routing_argmax": 0.957,
        "routing_served_unrefined": 0.9,
        "routing_argmax_unrefined": 0.95,
        "stream_routing_acc": 0.93,
        "serving_tpr": 0.98,
        "unknown_accepted": {"shift": 0.5},
        "mixed": {},
        "scoring": "graph",
        "batch": 16,
        "detect_overhead_pct": 10.0,
        "overhead": {"batch1": o, "batch16": {**o, "overhead_pct": 4.0}},
        "load_avg": [1.0, 1.0, 1.0],
        "goals": {
            "hdc_vs_best_auroc_pts": 0.0,
            "targets": GOALS,
            "met": {"auroc": True, "routing": False, "rejected": False, "overhead": False},
        },
    }


def test_markdown_shows_routing_as_served_rejections_and_argmax_and_batch_one_first():
    md = markdown(fake_result())
    assert "as served (the graph head's vote; a known input voted OOD counts as wrong) **91.3 %**" in md
    assert "known inputs rejected as OOD **4.9 %**" in md
    assert "argmax domain with the threshold ignored 95.7 %" in md
    assert "keeps 98 % of cross-fitted held-out known inputs and accepts, of the unknown near shifts" in md
    assert "shift 50.0 %" in md and "| 0.300 | 0.400 |" in md  # the serving threshold's FPR; FPR95, FPR98
    assert "routing as served 91.3 % (goal >= 95 %): **not met**" in md
    assert "detection overhead 10.0 % at batch 1 (goal <= 5 %): **not met**; at batch 16 4.0 %" in md
    assert md.index("| 1 | 0.300") < md.index("| 16 | 0.300")


def test_markdown_shows_minilm_at_batch_one_and_sixteen():
    r = fake_result()
    per = {f"batch{b}": {"plain_ms": 20.0 * b, "headed_ms": 20.5 * b, "overhead_pct": 2.5 / b} for b in (1, 16)}
    r["minilm"] = {"taps": ["t"] * 6, "width": 2304, "batch": 1, "rounds": 10, "per_batch": per, "overhead_pct": 2.5}
    r["goals"]["met"]["minilm_overhead"] = True
    md = markdown(r)
    assert "batch 1: plain 20.0 ms, with taps and head 20.5 ms, overhead **+2.50 %**" in md
    assert "batch 16: plain 320.0 ms, with taps and head 328.0 ms, overhead +0.16 %" in md
    assert "on MiniLM 2.5 % at batch 1 (goal <= 3 %): **met**" in md
