"""OOD detectors (edge.route.ood: detectors, hdc, linalg) on small synthetic features: metrics, every
registered detector, HDC internals, the shared kernels."""

from __future__ import annotations

import numpy as np
import pytest

from edge.errors import ConfigError
from edge.route.linalg import SINGLE_THREAD_MNK, matmul
from edge.route.ood import DETECTORS, HDC, auroc, fpr_at_tpr, make_detector, threshold_at_tpr

# every registered detector needs a case here (options used in the table-driven tests)
CASES = {
    "hdc": {},
    "msp": {},
    "energy": {},
    "mahalanobis": {},
    "knn": {"k": 1},
}
VARIANTS = [(name, opts) for name, opts in CASES.items()] + [("hdc", {"encoding": "bipolar"})]


def test_every_detector_has_a_case():
    assert set(DETECTORS.names()) == set(CASES), "add a case (and options) for the new detector"


def clusters(seed=0, n=200, dim=16, classes=3, shift=0.0, scale=1.0):
    """Gaussian class clusters in ``dim`` dims and logits of a linear head that knows them."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 4, (classes, dim))
    y = rng.integers(0, classes, n)
    f = centres[y] + rng.normal(0, scale, (n, dim)) + shift
    logits = f @ centres.T / dim
    return f.astype(np.float32), logits.astype(np.float32), y


def ood_cloud(seed=1, n=200, dim=16):
    """Far-off inputs: no class structure, and logits of the same head (flat for MSP, low for energy)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 4, (3, dim))
    f = rng.normal(0, 1, (n, dim)) * 6.0 + 15.0 * np.eye(dim)[0]
    logits = np.zeros((n, 3)) + rng.normal(0, 0.1, (n, 3))
    return f.astype(np.float32), logits.astype(np.float32), centres


# -- metrics ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "id_scores, ood_scores, expected",
    [
        ([3, 4, 5], [0, 1, 2], 1.0),
        ([0, 1, 2], [3, 4, 5], 0.0),
        ([1, 1], [1, 1], 0.5),
        ([0.9, 0.4], [0.5, 0.1], 0.75),  # pairs: (0.9>0.5) (0.9>0.1) (0.4<0.5) (0.4>0.1)
        ([2, 1], [1, 0], 0.875),  # one tie counts one half
    ],
)
def test_auroc(id_scores, ood_scores, expected):
    assert auroc(np.array(id_scores), np.array(ood_scores)) == pytest.approx(expected)


def test_threshold_keeps_at_least_tpr_of_id():
    s = np.random.default_rng(0).normal(size=1001)
    for tpr in (0.5, 0.9, 0.95, 0.99, 1.0):
        t = threshold_at_tpr(s, tpr)
        assert (s >= t).mean() >= tpr
        assert (s > t).mean() < tpr or tpr == 1.0  # and it is the largest such threshold


def test_fpr_at_tpr():
    id_scores = np.arange(100, dtype=float)  # threshold at 95 % TPR = 5
    assert fpr_at_tpr(id_scores, np.array([4.0, 5.0, 6.0, -1.0])) == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [([], [1.0]), ([1.0], [])])
def test_metrics_reject_empty(bad):
    with pytest.raises(ConfigError):
        auroc(np.array(bad[0]), np.array(bad[1]))


# -- every detector -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, opts", VARIANTS, ids=lambda v: v if isinstance(v, str) else str(v or ""))
def test_detector_separates_and_calibrates(name, opts):
    f, lg, y = clusters(0)
    f_cal, lg_cal, _ = clusters(1)
    f_id, lg_id, _ = clusters(2)
    f_ood, lg_ood, _ = ood_cloud()
    det = make_detector(name, **opts).fit(f, lg, y)
    a = auroc(det.score(f_id, lg_id), det.score(f_ood, lg_ood))
    assert a > 0.95, f"{name} {opts}: AUROC {a:.3f}"
    t = det.calibrate(f_cal, lg_cal, tpr=0.9)
    assert det.threshold == t
    assert (~det.is_ood(f_cal, lg_cal)).mean() >= 0.9
    assert det.is_ood(f_ood, lg_ood).mean() > 0.8


@pytest.mark.parametrize("name", list(CASES))
def test_uncalibrated_is_ood_raises(name):
    f, lg, y = clusters(0)
    det = make_detector(name, **CASES[name]).fit(f, lg, y)
    with pytest.raises(ConfigError, match="calibrate"):
        det.is_ood(f, lg)


@pytest.mark.parametrize("name", list(CASES))
def test_update_recalibrates(name):
    f, lg, y = clusters(0)
    f_cal, lg_cal, _ = clusters(1)
    det = make_detector(name, **CASES[name]).fit(f[:100], lg[:100], y[:100])
    det.calibrate(f_cal, lg_cal, tpr=0.95)
    shifted, lg_s, y_s = clusters(3, shift=3.0)
    det.update(shifted, lg_s, y_s)
    expected = threshold_at_tpr(det.score(f_cal, lg_cal), 0.95)
    assert det.threshold == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_mahalanobis_update_equals_batch_fit():
    f, lg, y = clusters(0, n=300)
    batch = make_detector("mahalanobis").fit(f, lg, y)
    inc = make_detector("mahalanobis").fit(f[:150], lg[:150], y[:150])
    inc.update(f[150:], lg[150:], y[150:])
    q, lq, _ = clusters(5)
    np.testing.assert_allclose(inc.score(q, lq), batch.score(q, lq), rtol=1e-3, atol=1e-3)


def test_knn_bank_is_bounded():
    f, lg, y = clusters(0, n=100)
    det = make_detector("knn", k=2, max_bank=50).fit(f, lg, y)
    det.update(f, lg, y)
    assert det._bank.shape == (50, f.shape[1])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: make_detector("hdc", dim=5000), "power of two"),
        (lambda: make_detector("hdc", dim=2048), "power of two"),
        (lambda: make_detector("hdc", encoding="ternary"), "encoding"),
        (lambda: make_detector("knn", k=0), "k"),
        (lambda: make_detector("energy", temperature=0), "temperature"),
        (lambda: make_detector("hdc").fit(np.zeros((3, 4)), np.zeros((2, 3))), "rows"),
        (lambda: make_detector("hdc").fit(np.zeros((3, 4)), np.zeros((3, 3)), labels=[1, 2]), "one entry"),
        (lambda: make_detector("nope"), "unknown OOD detector"),
        (lambda: threshold_at_tpr(np.ones(3), 0.0), "tpr"),
    ],
)
def test_errors_say_what_is_wrong(call, match):
    with pytest.raises((ConfigError, KeyError), match=match):
        call()


# -- HDC internals ------------------------------------------------------------------------------
def fitted_hdc(**opts) -> tuple[HDC, np.ndarray]:
    f, lg, y = clusters(0, n=240)
    domains = np.arange(240) % 2
    f[domains == 1] += 5.0  # a second domain, shifted
    return HDC(**opts).fit(f, lg, y, domains), f


def test_projection_rows_are_orthogonal_bipolar():
    det, _ = fitted_hdc()
    p = det._projection()
    assert p.shape == (17, 4096) and set(np.unique(p)) == {-1.0, 1.0}
    np.testing.assert_array_equal(p @ p.T, 4096 * np.eye(17))


def test_folded_scores_equal_explicit_hypervector_cosines():
    det, f = fitted_hdc()
    h = det.hypervectors(f[:20])
    p = det.prototypes
    assert p.shape == (len(det.class_keys) + len(det.domain_keys), 4096)
    explicit = (h / np.linalg.norm(h, axis=1, keepdims=True)) @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T
    np.testing.assert_allclose(det.similarities(f[:20]), explicit, rtol=1e-4, atol=1e-5)


def test_assess_route_and_score_agree():
    det, f = fitted_hdc()
    s, dom, dsim = det.assess(f)
    r_s, r_dom = det.route(f)
    np.testing.assert_allclose(s, det.score(f), rtol=1e-5)
    np.testing.assert_allclose(r_s, s, rtol=1e-5)
    np.testing.assert_array_equal(r_dom, dom)
    assert (dom == np.arange(len(f)) % 2).mean() > 0.95  # the two domains are told apart
    assert np.all(dsim <= 1.0 + 1e-5)


def test_update_bundles_a_new_domain_into_the_prototypes():
    det, f = fitted_hdc()
    det.calibrate(f[:100])
    new, lg, y = clusters(7, shift=-6.0)
    det.update(new, lg, y, domains=np.full(len(new), 2))
    assert 2 in det.domain_keys and len(det.class_keys) == 9
    assert (det.route(new)[1] == 2).mean() > 0.95
    assert det.threshold == pytest.approx(threshold_at_tpr(det.score(f[:100]), 0.95), rel=1e-5)


@pytest.mark.parametrize("encoding", ["linear", "bipolar"])
def test_cross_fitted_threshold_keeps_its_offset_through_updates(encoding):
    """calibrate(held_out=...): the threshold comes from held-out scores; updates rescore the fit inputs (in-sample)
    and keep the same correction, so they agree with a detector calibrated without one, shifted by the offset."""
    det, f = fitted_hdc(encoding=encoding)
    plain, _ = fitted_hdc(encoding=encoding)
    held_out = det.score(f[:100]) - 0.05  # held-out inputs score lower than the fit inputs
    assert det.calibrate(f[:100], held_out=held_out, tpr=0.98) == threshold_at_tpr(held_out, 0.98)
    inside = plain.calibrate(f[:100], tpr=0.98)
    assert inside - det.threshold == pytest.approx(0.05, abs=1e-6)
    new, lg, y = clusters(7, shift=-6.0)
    for d in (det, plain):
        d.update(new, lg, y, domains=np.full(len(new), 2))
    assert plain.threshold - det.threshold == pytest.approx(inside - threshold_at_tpr(held_out, 0.98), abs=1e-6)


def test_refine_retrains_class_prototypes_for_routing_and_keeps_their_norms():
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 0.5, (2, 3, 16))  # two domains x three classes, overlapping
    y, d = rng.integers(0, 3, 900), rng.integers(0, 2, 900)
    f = (centres[d, y] + rng.normal(0, 1.2, (900, 16))).astype(np.float32)
    lg = np.eye(3, dtype=np.float32)[y]
    det = HDC().fit(f[:600], lg[:600], y[:600], d[:600])
    before = det.prototypes.copy()
    plain = (det.route(f[600:])[1] == d[600:]).mean()
    norms = np.linalg.norm(det._sums["class"], axis=1)
    kept = det.refine(f[:600], y[:600], d[:600], epochs=20, lr=3.0, check=(f[600:], d[600:]))
    assert kept == pytest.approx((det.route(f[600:])[1] == d[600:]).mean())
    assert kept >= plain  # epoch 0 (plain bundling) stays unless a later epoch routes the check data better
    np.testing.assert_allclose(np.linalg.norm(det._sums["class"], axis=1), norms, rtol=1e-6)
    np.testing.assert_array_equal(det.prototypes[len(det.class_keys) :], before[len(det.class_keys) :])
    score, dom = det.route(f[600:])  # route, assess and the explicit similarities still agree
    np.testing.assert_array_equal(det.assess(f[600:])[1], dom)
    np.testing.assert_allclose(det.similarities(f[600:])[:, :6].max(1), score, rtol=1e-5)
    fit_kept = HDC().fit(f[:600], lg[:600], y[:600], d[:600]).refine(f[:600], y[:600], d[:600], epochs=20, lr=3.0)
    assert fit_kept >= (HDC().fit(f[:600], lg[:600], y[:600], d[:600]).route(f[:600])[1] == d[:600]).mean()
    with pytest.raises(ConfigError, match="not fitted on"):
        det.refine(f[:10], np.full(10, 2), np.full(10, 5))
    with pytest.raises(ConfigError, match="epochs"):
        det.refine(f[:10], y[:10], d[:10], epochs=-1)


def test_bipolar_prototypes_are_stored_in_full_width():
    det, f = fitted_hdc(encoding="bipolar")
    assert det.prototypes.shape[1] == 4096
    assert set(np.unique(det.hypervectors(f[:3]))) == {-1.0, 1.0}


@pytest.mark.parametrize("m, k, n", [(4, 8, 8), (300, 256, 256), (17, 1, 40000), (3, 70000, 5)])
def test_chunked_matmul_equals_plain_product(m, k, n):
    """The first case runs in one product, the others in single-thread chunks."""
    assert (m * k * n <= SINGLE_THREAD_MNK) == (m == 4)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32)
    np.testing.assert_allclose(matmul(a, b), a @ b, rtol=1e-4, atol=1e-3)
