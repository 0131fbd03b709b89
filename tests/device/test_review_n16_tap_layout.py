"""``edge update --tap-layout`` given twice for one tap with two layouts is refused (review N, session 16).

Before: ``dict(...)`` of the flags kept the last one silently (exit 0, the tap pooled over whichever axis came last);
the same layout given twice is still accepted.
"""

from __future__ import annotations

import json

from test_update_lead15_taplayout import _update, model  # noqa: F401 (the module-scoped model fixture)


def test_two_layouts_for_one_tap_exit_2_naming_both(model, capsys):  # noqa: F811
    extra = ["--taps", "h", "--tap-layout", "h=channels-first", "--tap-layout", "h=channels-last"]
    assert _update(model, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--tap-layout gives tap 'h' two layouts (channels-first and channels-last); give it one" in err, err


def test_the_same_layout_twice_is_one_layout(model, capsys, tmp_path):  # noqa: F811
    extra = ["--taps", "h", "--tap-layout", "h=channels-last", "--tap-layout", "h=channels-last"]
    assert _update(model, *extra, "--json", str(tmp_path / "r.json")) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples_seen"] == 12 and sorted(report["classes"]) == [0, 1, 2], report
