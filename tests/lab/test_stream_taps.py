"""The tap set the stream serves (``StreamConfig.taps``, the bench's on the ViT) and the bench's novel-domain figure:
each adapted domain left out of the router, the share of its inputs voted into a known domain."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_bench_ood import fake_result
from test_router import CLASSES, _setup, domain

from edge.errors import ConfigError
from edge.route.taps import Head
from lab.bench_ood import VIT_TAPS, _novel_accepted, markdown
from lab.stream import StreamConfig, stream_taps


@pytest.mark.parametrize("taps, match", [("nope", "unknown tap set 'nope'"), ("attn-in:0", "attn-in:1")])
def test_stream_config_refuses_a_bad_tap_set_naming_what_is_allowed(taps, match):
    with pytest.raises(ConfigError, match=match):
        StreamConfig(taps=taps)


def test_the_stream_serves_the_benchs_vit_taps_and_auto_on_the_cnn():
    assert StreamConfig().taps == "auto"  # run_stream on any model: the model's auto set
    assert stream_taps("vit") == VIT_TAPS == "attn-in:1"  # edge demo --stream on the ViT: what the bench serves
    assert stream_taps("cnn") == "auto"


def test_each_adapted_domain_left_out_is_mostly_voted_out_of_distribution(tmp_path):
    _, _, tapped, rt = _setup(tmp_path, Head(domains=4, classes=CLASSES))
    try:
        domains = {}
        for i, name in enumerate(("clean", "a", "b")):
            (x, y), (xt, _) = domain(name, 300, seed=i), domain(name, 200, seed=50 + i)
            domains[name] = SimpleNamespace(x_train=x, y_train=y, x_test=xt)
        got = _novel_accepted(rt, tapped, {"a": None, "b": None}, domains, seed=0)
    finally:
        rt.close()
    assert set(got) == {"a", "b"}
    assert all(0.0 <= v < 0.2 for v in got.values()), got  # the synthetic domains are far apart


def test_markdown_shows_novel_domains_accepted_when_measured():
    r = fake_result()
    assert "left out of the router" not in markdown(r)
    r["novel_accepted"] = {"invert": 0.0, "blur": 0.579}
    md = markdown(r)
    assert "each adapted domain left out of the router" in md and "invert 0.0 %, blur 57.9 %" in md
