"""Wide features (issue 17): the HDC detector whitens at a capped rank (probabilistic PCA) and the graph head reads
``d x (rank + 1 + n_v)`` floats per input instead of ``d x (d + 1)``; features up to ``rank`` wide are unchanged."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edge.route.linalg as linalg
from edge.errors import ConfigError
from edge.format.modelinfo import META_KEY, ModelInfo, TensorInfo, fingerprint
from edge.route.hdc import HDC
from edge.route.head import HEAD_E, HEAD_M, HEAD_MU, HEAD_P, Head
from edge.route.taps import FEATURES, VOTE, tap_model
from edge.runtime import Runtime

WIDTH, CLASSES = 96, 3


def make_mlp(path: Path, width: int = WIDTH) -> None:
    """x[B, width] -> MatMul -> Tanh ("hidden", tapped: [B, width]) -> MatMul -> logits[B, CLASSES]."""
    rng = np.random.default_rng(0)
    w = {
        "fc1.weight": (np.eye(width) + rng.standard_normal((width, width)) * 0.05).astype(np.float32),
        "fc2.weight": (rng.standard_normal((width, CLASSES)) * 0.3).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "fc2.weight"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "wide-mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    info = ModelInfo(
        name="wide-mlp",
        fingerprint=fingerprint(w),
        tensors={k: TensorInfo(k, v.shape) for k, v in w.items()},
        inputs=("x",),
        outputs=("logits",),
    )
    helper.set_model_props(model, {META_KEY: info.to_json()})
    onnx.save(model, str(path))


CENTRES = np.random.default_rng(7).standard_normal((4, CLASSES, WIDTH)).astype(np.float32) * 0.5
SPREAD = np.linspace(0.4, 0.02, WIDTH).astype(np.float32)  # a decaying spectrum: the cap binds


def inputs(domain: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs of ``domain`` (0-2 known, 3 unseen): class centres plus anisotropic noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = CENTRES[domain, y] + rng.standard_normal((n, WIDTH)).astype(np.float32) * SPREAD
    return x.astype(np.float32), y


def fitted(features, y, domains, **kw) -> HDC:
    return HDC(**kw).fit(features, np.zeros((len(features), 1), np.float32), y, domains)


def synthetic(width: int, n_per: int, domains: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    spread = np.linspace(1.0, 0.01, width)
    f = np.concatenate([rng.standard_normal((n_per, width)) * spread + k for k in range(domains)])
    y = rng.integers(0, CLASSES, len(f))
    return f.astype(np.float32), y, np.repeat(np.arange(domains), n_per)


def test_rank_at_or_above_the_width_is_the_full_whitening_bit_for_bit():
    f, y, d = synthetic(WIDTH, 200)
    full = fitted(f, y, d, rank=WIDTH)
    assert full._low is None
    x = f.astype(np.float64)
    centred = x - np.stack([x[d == k].mean(0) for k in range(3)])[d]
    want = linalg.whitener(linalg.matmul(np.ascontiguousarray(centred.T), centred) / len(x), full.floor)
    np.testing.assert_array_equal(full._w, want / np.float32(np.sqrt(WIDTH)))  # the arithmetic before the cap
    other = fitted(f, y, d, rank=4 * WIDTH)
    for a, b in zip(full.route(f), other.route(f)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(full.score(f), other.score(f))
    # one direction left over: its variance is its own mean, so the capped whitening is the full one (up to float32:
    # the capped |z|^2 is |g|^2 / s2 less the kept part, which cancels by about the spectrum's range, 1e4 here)
    near = fitted(f, y, d, rank=WIDTH - 1)
    assert near._low is not None and near._low.rank == WIDTH - 1
    np.testing.assert_allclose(near.score(f), full.score(f), atol=1e-3)
    np.testing.assert_array_equal(near.route(f)[1], full.route(f)[1])


def test_capped_scores_are_the_folded_hypervector_cosines():
    f, y, d = synthetic(WIDTH, 150)
    det = fitted(f, y, d, rank=16)
    assert det._low is not None and det._low.rank == 16
    h, p = det.hypervectors(f[:40]), det.prototypes
    explicit = (h @ p.T) / np.linalg.norm(h, axis=1, keepdims=True) / np.linalg.norm(p, axis=1)
    np.testing.assert_allclose(det.similarities(f[:40]), explicit, atol=2e-5)
    z = det.encode(f[:40])[:, :-1]  # the whitened vector is a linear map of f: its norm is the folded one
    np.testing.assert_allclose(det._low.sqnorm(f[:40] - det._mu), (z * z).sum(1), rtol=1e-4)


@pytest.mark.parametrize("strategy", ["hybrid", "bound", "rebuild"])
def test_wide_graph_head_votes_as_the_detector(tmp_path, strategy):
    make_mlp(tmp_path / "m.onnx")
    head = Head(domains=4, classes=CLASSES, rank=16)
    tapped = tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", ["hidden"], head=head)
    model = onnx.load(str(tapped.path))
    ops = [n.op_type for n in model.graph.node if n.name.startswith("edge.head") or n.output[0] == VOTE]
    assert ops == ["Sub", "Gemm", "ReduceSumSquare", "Mul", "Gemm", "Sqrt", "Gemm", "ArgMax", "Gather"]
    info = ModelInfo.from_json({p.key: p.value for p in model.metadata_props}[META_KEY])
    n_v = 1 + 4 * CLASSES
    assert info.tensors[HEAD_M].shape == (WIDTH, 16 + 1 + n_v) and HEAD_P not in info.tensors
    assert all(info.tensors[k].head for k in (HEAD_M, HEAD_MU, HEAD_E)) and info.extra["edge.head"]["rank"] == 16
    with Runtime(tapped.path, strategy=strategy) as rt:
        assert rt.info.fingerprint == info.fingerprint
        fit = [inputs(k, 300, seed=k) for k in range(3)]
        feats = np.concatenate([rt.run({"x": x})[FEATURES] for x, _ in fit])
        det = fitted(feats, np.concatenate([y for _, y in fit]), np.repeat(np.arange(3), 300), rank=16)
        held = np.concatenate([rt.run({"x": inputs(k, 100, seed=10 + k)[0]})[FEATURES] for k in range(3)])
        det.calibrate(held)
        assert (rt.run({"x": inputs(0, 8, seed=20)[0]})[VOTE] == -1).all()  # until the head is written
        rt.set_head(det.head_values(tapped.head))
        rt.wait_settled()
        test = {k: rt.run({"x": inputs(k, 200, seed=30 + k)[0]}) for k in range(4)}
        small = fitted(feats, np.concatenate([y for _, y in fit]), np.repeat(np.arange(3), 300), rank=8)
        small.calibrate(held)
        rt.set_head(small.head_values(tapped.head))  # a lower rank fits the head (its spare columns are zero)
        rt.wait_settled()
        lower = rt.run({"x": inputs(1, 200, seed=31)[0]})
    for k, out in test.items():
        score, dom = det.route(out[FEATURES])
        clear = np.abs(score - det.threshold) > 1e-5
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(out[VOTE][clear], np.where(score < det.threshold, -1, dom)[clear])
        assert (out[VOTE] == (k if k < 3 else -1)).mean() > 0.8  # known domains routed home, the unseen one out
    score, dom = small.route(lower[FEATURES])
    clear = np.abs(score - small.threshold) > 1e-5
    np.testing.assert_array_equal(lower[VOTE][clear], np.where(score < small.threshold, -1, dom)[clear])


def test_router_refuses_a_rank_its_head_cannot_hold(tmp_path):
    from edge.route.router import Reconfigurator, RouterConfig

    make_mlp(tmp_path / "m.onnx")
    tapped = tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", ["hidden"], head=Head(2, CLASSES, rank=16))
    with Runtime(tapped.path) as rt:
        with pytest.raises(ConfigError, match=r"hdc_rank 8 differs from the rank of the head.*\(16\)"):
            Reconfigurator(rt, tapped, RouterConfig(hdc_rank=8))
        router = Reconfigurator(rt, tapped, RouterConfig(learn=False, refine_epochs=0))
        assert router.config.hdc_rank == 16  # unset: the head's
        for k in range(2):
            router.add_domain(f"d{k}", None, *inputs(k, 200, seed=k))
        router.fit()  # fits rank-16 detectors and folds one into the wide head
        det = router.detector("d0")
        assert det._low is not None and det._low.rank == 16 and router.scoring == "graph"
        out = rt.run({"x": inputs(1, 100, seed=5)[0]})
    score, dom = det.route(out[FEATURES])
    clear = np.abs(score - det.threshold) > 1e-5
    np.testing.assert_array_equal(out[VOTE][clear], np.where(score < det.threshold, -1, dom)[clear])
    assert (out[VOTE] == 1).mean() > 0.8


def test_narrow_head_is_unchanged_below_the_rank(tmp_path):
    make_mlp(tmp_path / "m.onnx")
    tapped = tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", ["hidden"], head=Head(domains=2, classes=CLASSES))
    ops = [n.op_type for n in onnx.load(str(tapped.path)).graph.node if n.name.startswith("edge.head")]
    assert ops == ["Gemm", "LpNormalization", "Gemm", "ArgMax"]  # then the Gather into edge.vote
    assert Head().columns(WIDTH) == (WIDTH + 1, 1 + 8 * 10) and Head().route_table(WIDTH)[:2] == [-1, 0]


def test_detector_and_head_of_other_forms_are_refused():
    f, y, d = synthetic(WIDTH, 100)
    capped, full = fitted(f, y, d, rank=16), fitted(f, y, d)
    for det in (capped, full):
        det.calibrate(f)
    with pytest.raises(ConfigError, match=r"HDC rank=16.*at rank 16.*Head rank=128.*narrow form"):
        capped.head_values(Head(domains=3, classes=CLASSES, rank=128))
    with pytest.raises(ConfigError, match=r"HDC rank=256.*in full.*Head rank=16.*wide form of rank 16"):
        full.head_values(Head(domains=3, classes=CLASSES, rank=16))
    with pytest.raises(ConfigError, match=r"at rank 16.*Head rank=8"):
        capped.head_values(Head(domains=3, classes=CLASSES, rank=8))
    with pytest.raises(ConfigError, match="rank must be >= 1"):
        HDC(rank=0)
    with pytest.raises(ConfigError, match="rank >= 1"):
        Head(rank=0)


def test_the_fit_never_forms_width_squared(monkeypatch):
    # fewer inputs than features: the Gram matrix; its peak (a few N x d copies) stays far below one float64 d x d
    width = 4096
    f, y, d = synthetic(width, 40)
    tracemalloc.start()
    det = fitted(f, y, d, rank=32)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert det._low is not None and peak < width * width * 8 / 4, peak
    # more inputs than features: randomized subspace iteration; no product or eigenproblem is d x d
    products, problems, eigh, real = [], [], np.linalg.eigh, linalg.matmul
    monkeypatch.setattr(linalg, "matmul", lambda a, b: products.append((a.shape[0], b.shape[1])) or real(a, b))
    monkeypatch.setattr(np.linalg, "eigh", lambda a: problems.append(a.shape) or eigh(a))
    width = 200
    f, y, d = synthetic(width, 300)
    det = fitted(f, y, d, rank=16)
    assert (len(f), width) in products and (width, width) not in products  # N x d outputs, never d x d
    assert problems and max(max(s) for s in problems) < width
    c = f.astype(np.float64)
    c -= np.stack([c[d == k].mean(0) for k in range(3)])[d]
    true = eigh(c.T @ c / len(c))[0][::-1]
    monkeypatch.undo()
    v, ev, trace = linalg.top_eigen(c, 16)
    # the kept directions are the top eigenpairs, to the subspace iteration's accuracy on a slowly decaying spectrum
    np.testing.assert_allclose(ev, true[:16], rtol=2e-2)
    assert ev.sum() / true[:16].sum() > 0.995 and (ev <= true[:16] * (1 + 1e-9)).all()  # Ritz values from below
    np.testing.assert_allclose(trace, true.sum(), rtol=1e-9)
    np.testing.assert_allclose(v.T @ v, np.eye(16), atol=1e-8)


def test_bert_wide_features_get_a_dim_by_default():
    f, y, d = synthetic(9216, 24, domains=2)
    with pytest.raises(ConfigError, match=r"feature width 9216 needs dim > 9216.*leave it unset"):
        fitted(f, y, d, dim=4096)
    det = fitted(f, y, d)
    assert det.dim == 16384 and det._low is not None and det._low.rank <= 256
    score, dom = det.route(f)
    assert np.isfinite(score).all() and (dom == d).mean() > 0.9
    assert fitted(*synthetic(64, 50), rank=256).dim == 4096  # narrow features keep the old default
