"""Detectors and feature widths: HDC refuses features of another width than it was fitted on with a ConfigError on
every path (no raw numpy ValueError): the bipolar encoding's score, and update on a calibrated linear detector (its
cached fast path); the width check does not make the stateless detectors (MSP, energy) need a fit to update."""

import numpy as np
import pytest

from edge.errors import ConfigError
from edge.route.hdc import HDC


def _data(n=64, d=8, k=3):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)


@pytest.mark.parametrize("encoding", ["bipolar", "linear"])
def test_score_of_wrong_width_is_config_error(encoding):
    f, lg = _data()
    det = HDC(dim=4096, encoding=encoding).fit(f, lg)
    with pytest.raises(ConfigError, match="9 wide but detector 'hdc' was fitted on 8"):
        det.score(np.zeros((4, 9), np.float32))
    assert det.score(f[:4]).shape == (4,)  # the right width still scores


def test_update_of_calibrated_linear_refuses_wrong_width():
    f, lg = _data()
    det = HDC(dim=4096).fit(f, lg)
    det.calibrate(f, lg)
    before = det.threshold
    with pytest.raises(ConfigError, match="9 wide"):
        det.update(np.zeros((4, 9), np.float32), lg[:4])
    assert det.threshold == before  # nothing changed
    det.update(f[:4], lg[:4])  # the right width is still taken


@pytest.mark.parametrize("name", ["msp", "energy"])
def test_stateless_detector_updates_without_fit(name):
    """MSP and energy need no fit (``_fit`` does nothing for them): calibrate then update keeps working."""
    from edge.route.detectors import DETECTORS

    f, lg = _data()
    det = DETECTORS.get(name)()
    det.calibrate(f, lg)
    det.update(f[:8], lg[:8])
    assert det.threshold is not None and det.is_ood(f[:4], lg[:4]).shape == (4,)


@pytest.mark.parametrize("name", ["mahalanobis", "knn"])
def test_stateful_detector_update_before_fit_is_config_error(name):
    from edge.route.detectors import DETECTORS

    f, lg = _data()
    with pytest.raises(ConfigError, match="not fitted"):
        DETECTORS.get(name)().update(f, lg)
