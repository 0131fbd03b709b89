"""Digits domains: determinism, shapes, ranges, the shift registry and the warp helper."""

from __future__ import annotations

import numpy as np
import pytest

from edge.errors import ConfigError
from lab.datasets import SHIFTS, Domain, load_domains, register_shift, warp

ALL_SHIFTS = tuple(SHIFTS)


@pytest.fixture(scope="module")
def domains() -> dict[str, Domain]:
    return load_domains(ALL_SHIFTS, seed=0)


def _arrays(d: Domain) -> list[np.ndarray]:
    return [d.x_train, d.y_train, d.x_test, d.y_test]


def test_default_targets_and_clean_source():
    names = list(load_domains(seed=0))
    assert names == ["clean", "rotate", "noise", "invert", "blur"]


def test_shapes_dtypes_ranges(domains):
    assert set(domains) == {"clean", *ALL_SHIFTS}
    clean = domains["clean"]
    n_train, n_test = len(clean.y_train), len(clean.y_test)
    assert n_train + n_test == 1797
    assert n_test == pytest.approx(0.3 * 1797, abs=10)
    for name, d in domains.items():
        assert d.name == name
        assert d.x_train.shape == (n_train, 1, 8, 8) and d.x_test.shape == (n_test, 1, 8, 8)
        assert d.x_train.dtype == np.float32 and d.x_test.dtype == np.float32
        assert d.y_train.dtype == np.int64 and d.y_test.dtype == np.int64
        for x in (d.x_train, d.x_test):
            assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0
        # one shared split: labels are identical across domains
        np.testing.assert_array_equal(d.y_train, clean.y_train)
        np.testing.assert_array_equal(d.y_test, clean.y_test)
    assert clean.x_train.max() == 1.0 and set(np.unique(clean.y_test)) == set(range(10))


def test_split_is_stratified(domains):
    clean = domains["clean"]
    counts_test = np.bincount(clean.y_test, minlength=10)
    counts_all = counts_test + np.bincount(clean.y_train, minlength=10)
    np.testing.assert_allclose(counts_test / counts_all, 0.3, atol=0.01)


@pytest.mark.parametrize("name", ALL_SHIFTS)
def test_each_shift_changes_images(domains, name):
    clean, shifted = domains["clean"], domains[name]
    for a, b in ((clean.x_train, shifted.x_train), (clean.x_test, shifted.x_test)):
        per_image = np.abs(a - b).mean(axis=(1, 2, 3))
        assert per_image.mean() > 0.05
        assert (per_image > 0).mean() > 0.99


def test_deterministic_under_seed(domains):
    again = load_domains(ALL_SHIFTS, seed=0)
    for name in domains:
        for a, b in zip(_arrays(domains[name]), _arrays(again[name]), strict=True):
            np.testing.assert_array_equal(a, b)
    other = load_domains(("noise",), seed=1)
    assert not np.array_equal(other["noise"].y_train, domains["noise"].y_train)


def test_shift_does_not_depend_on_other_targets(domains):
    alone = load_domains(("noise",), seed=0)
    np.testing.assert_array_equal(alone["noise"].x_test, domains["noise"].x_test)


def test_unknown_shift_names_the_known_ones():
    with pytest.raises(ConfigError, match="rotate") as info:
        load_domains(("rotate", "sepia"))
    assert "sepia" in str(info.value)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1])
def test_bad_test_fraction(bad):
    with pytest.raises(ConfigError, match="test_fraction"):
        load_domains(("noise",), test_fraction=bad)


def test_duplicate_shift_registration_rejected():
    with pytest.raises(ConfigError, match="already registered"):
        register_shift("rotate")(lambda x, rng: x)
    assert SHIFTS["rotate"].__name__ == "_rotate"


def test_register_new_shift_is_usable():
    name = "_test_darken"
    try:
        register_shift(name)(lambda x, rng: 0.5 * x)
        d = load_domains((name,), seed=0)
        np.testing.assert_allclose(d[name].x_test, 0.5 * d["clean"].x_test)
    finally:
        SHIFTS.pop(name, None)


def test_warp_identity_rot90_and_translation():
    x = np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32)
    zeros, ones = np.zeros(3), np.ones(3)
    np.testing.assert_allclose(warp(x, zeros, ones, zeros, zeros), x, atol=1e-6)
    # positive angles turn clockwise as displayed (row 0 at the top)
    np.testing.assert_allclose(
        warp(x, np.full(3, np.pi / 2), ones, zeros, zeros), np.rot90(x, -1, axes=(2, 3)), atol=1e-5
    )
    moved = warp(x, zeros, ones, ones, zeros)  # one pixel down, zeros enter at the top
    np.testing.assert_allclose(moved[:, :, 1:], x[:, :, :-1], atol=1e-6)
    assert np.all(moved[:, :, 0] == 0)
