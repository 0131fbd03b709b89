"""The router with many domains: work and memory that must not grow with the square of the domain count.

HDC bundling finds each input's prototype without scanning the list of known keys per input, and a calibrated
linear HDC keeps at most ``RECALIBRATE_ROWS`` of the rows it was calibrated on (a router's states are calibrated
on every domain's reservoir: keeping them all held n states x n reservoirs)."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edge.errors import ConfigError
from edge.route.hdc import HDC
from edge.route.router import Reconfigurator, RouterConfig


def _data(n, domains, classes=4, width=8, seed=0):
    rng = np.random.default_rng(seed)
    d = rng.integers(0, domains, n)
    y = rng.integers(0, classes, n)
    f = (rng.standard_normal((n, width)) + 3 * d[:, None] % 5 + y[:, None]).astype(np.float32)
    return f, np.zeros((n, 1), np.float32), y, d


class _CountingList(list):
    def __init__(self, items):
        super().__init__(items)
        self.scans = 0

    def __contains__(self, item):
        self.scans += 1
        return super().__contains__(item)

    def index(self, *args):
        self.scans += 1
        return super().index(*args)


def test_bundling_looks_up_keys_without_scanning_them_per_input():
    f, lg, y, d = _data(600, domains=6)
    det = HDC(dim=4096).fit(f, lg, y, d)
    det.class_keys, det.domain_keys = _CountingList(det.class_keys), _CountingList(det.domain_keys)
    det.update(f, labels=y, domains=d)  # 600 inputs, every key known
    assert det.class_keys.scans == 0 and det.domain_keys.scans == 0


def test_bundling_keeps_keys_in_first_appearance_order_and_sums_per_key():
    f, lg, y, d = _data(300, domains=5)
    det = HDC(dim=4096).fit(f, lg, y, d)
    pairs = list(zip(d.tolist(), y.tolist()))
    assert det.class_keys == list(dict.fromkeys(pairs))
    assert det.domain_keys == list(dict.fromkeys(d.tolist()))
    x = det.encode(f).astype(np.float64)
    for i, key in enumerate(det.class_keys):
        rows = [j for j, p in enumerate(pairs) if p == key]
        np.testing.assert_allclose(det._sums["class"][i], x[rows].sum(0), rtol=1e-12, atol=1e-9)
    # a new domain's keys are appended after the known ones, in the order they first appear
    g, _, y2, _ = _data(40, domains=1, seed=1)
    det.update(g, labels=y2, domains=np.full(40, 7))
    assert det.domain_keys[-1] == 7 and det.class_keys[-len(set(y2.tolist())) :] == [
        (7, k) for k in dict.fromkeys(y2.tolist())
    ]


def _held_bytes(det: HDC) -> int:
    """Bytes of every array the detector keeps (attributes, and inside its tuples and dicts)."""
    total = 0
    for v in vars(det).values():
        items = v.values() if isinstance(v, dict) else v if isinstance(v, tuple) else [v]
        total += sum(a.nbytes for a in items if isinstance(a, np.ndarray))
    return total


def test_calibrated_hdc_memory_does_not_grow_with_its_calibration_set():
    """Same domains and classes, calibrated on 2x and 8x RECALIBRATE_ROWS rows: the same bytes held."""
    held = []
    for n in (2 * HDC.RECALIBRATE_ROWS, 8 * HDC.RECALIBRATE_ROWS):
        f, lg, y, d = _data(n, domains=3)
        det = HDC(dim=4096).fit(f, lg, y, d)
        det.calibrate(f, lg, 0.95)
        held.append(_held_bytes(det))
    assert held[0] == held[1]


def test_bipolar_hdc_still_recalibrates_from_its_kept_rows():
    f, lg, y, d = _data(300, domains=2)
    det = HDC(dim=4096, encoding="bipolar").fit(f, lg, y, d)
    det.calibrate(f, lg, 0.9)
    det.update(f[:30], labels=y[:30], domains=d[:30])
    assert (det.score(f) >= det.threshold).mean() >= 0.9 - 1e-9


# -- growth: what a refit after growing domain n runs and fits ------------------------------------------
class _FakeRuntime:
    """A numpy stand-in for a tapped runtime: each state (base or adapter) maps inputs to features by its own
    matrix; counts runs and rows."""

    def __init__(self, adapters, width=6, classes=3):
        rng = np.random.default_rng(5)
        self.adapters = list(adapters)
        self.info = SimpleNamespace(inputs=("x",))
        self.heads: list[str] = []
        self._w = {
            a: rng.standard_normal((width, width)) * (0.3 if a else 0) + np.eye(width) for a in [None, *adapters]
        }
        self._cls = rng.standard_normal((width, classes))
        self.current, self.runs, self.rows = None, 0, 0

    def switch(self, adapter, head=None):
        self.current = adapter

    def wait_settled(self, timeout=None):
        return True

    def run(self, feeds, outputs=None):
        x = feeds["x"]
        self.runs, self.rows = self.runs + 1, self.rows + len(x)
        f = np.tanh(x @ self._w[self.current]).astype(np.float32)
        return {"edge.features": f, "logits": (f @ self._cls).astype(np.float32)}


def _domain(i, n=64, width=6, classes=3):
    rng = np.random.default_rng(100 + i)
    y = rng.integers(0, classes, n)
    centre = np.random.default_rng(i).normal(0, 1.5, width)
    x = centre + 0.4 * np.eye(width)[y] + rng.normal(0, 0.15, (n, width))
    return x.astype(np.float32), y


def _router(n, grow, reservoir=64):
    rt = _FakeRuntime([f"a{i}" for i in range(1, n)])
    tapped = SimpleNamespace(features="edge.features", head=None, path=Path("fake.onnx"))
    r = Reconfigurator(rt, tapped, RouterConfig(learn=False, reservoir=reservoir, grow=grow, refine_epochs=2))
    for i in range(n - 1):
        r.add_domain(f"d{i}", None if i == 0 else f"a{i}", *_domain(i))
    r.fit()
    rt.runs = rt.rows = 0
    return r, rt


@pytest.mark.parametrize("n", [4, 7])
def test_incremental_growth_runs_two_n_minus_one_reservoirs_and_fits_one_state(n, monkeypatch):
    fits = []
    real_fit = HDC.fit
    monkeypatch.setattr(HDC, "fit", lambda self, *a, **k: fits.append(1) or real_fit(self, *a, **k))
    for grow, reservoirs, fitted in (("refit", n * n, 3 * n), ("incremental", 2 * n - 1, 3)):
        r, rt = _router(n, grow)
        fits.clear()
        r.add_grown(f"d{n - 1}", f"a{n - 1}", *_domain(n - 1))
        assert rt.rows == reservoirs * 64, grow  # every reservoir holds 64 inputs
        assert len(fits) == fitted, grow  # two cross-fitting halves and the full fit per state refitted
        assert r.active == f"d{n - 1}" and r.domains[-1] == f"d{n - 1}"


def test_incremental_growth_routes_the_grown_domain_under_every_state():
    n = 5
    inc, _ = _router(n, "incremental")
    ref, _ = _router(n, "refit")
    kept = {s: len(inc.detector(s).kept_rows) for s in inc.domains}
    for r in (inc, ref):
        r.add_grown(f"d{n - 1}", f"a{n - 1}", *_domain(n - 1))
    x, _ = _domain(n - 1, n=128)  # the grown domain's inputs, scored under each state
    for state in inc.domains:
        got = {}
        for name, r in (("incremental", inc), ("refit", ref)):
            r.switch_to(state)
            score, dom = r.detector(state).route(r.features(x)[0])
            got[name] = np.where(score < r.detector(state).threshold, -1, dom)
        assert (got["incremental"] == n - 1).mean() >= 0.9, state
    assert {s: len(inc.detector(s).kept_rows) for s in kept} == kept  # the new domain took a share, no more
    # the grown domain's own state is fitted as a full refit fits it: the same detector, bit for bit
    a, b = inc.detector(f"d{n - 1}"), ref.detector(f"d{n - 1}")
    assert a.threshold == b.threshold and np.array_equal(a._sums["class"], b._sums["class"])


def test_incremental_growth_refits_everything_when_the_states_are_not_fitted_on_the_others():
    r, rt = _router(4, "incremental")
    r.add_domain("late", "a3", *_domain(3))  # added without a fit: the states know 3 of the 4 domains
    r.add_grown("d4", "a3", *_domain(4))
    assert rt.rows == 5 * 4 * 64  # 4 states (base, a1, a2, a3) x 5 reservoirs: a full refit


def test_router_config_refuses_an_unknown_grow_mode():
    with pytest.raises(ConfigError, match="grow must be one of"):
        RouterConfig(grow="lazy")
