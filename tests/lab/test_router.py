"""Taps, the reconfigurator (routing, hysteresis, novelty, growth hand-off) and growth, on a tiny pre-LN model."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.errors import AdapterMismatchError, ConfigError, FormatError
from edge.format.adapter import Adapter, SparseDelta
from edge.format.modelinfo import META_KEY, ModelInfo, TensorInfo, fingerprint
from edge.learn.growth import GrowthJob, grow
from edge.learn.space import BYTES_PER_ENTRY, SEARCH_SPACE, Arch, Budget, candidates, select
from edge.route.router import Reconfigurator, RouterConfig
from edge.route.taps import FEATURES, HEAD_C, HEAD_M, HEAD_P, HEAD_T, VOTE, Head, resolve_taps, tap_model
from edge.runtime import Runtime

T, C, CLASSES = 4, 8, 3
WEIGHTS = ("blocks.0.attn.q.weight", "blocks.1.mlp.fc1.weight")


def make_prelm(path: Path, seed: int = 0) -> ModelInfo:
    """x[B,4,8] -> two pre-LN residual blocks (one MatMul each) -> final LN -> mean -> head[3]."""
    rng = np.random.default_rng(seed)
    w = {k: (rng.standard_normal((C, C)) * 0.4).astype(np.float32) for k in WEIGHTS}  # torch layout [out, in]
    stored = {k: v.T.copy() for k, v in w.items()}
    stored["head.weight"] = (rng.standard_normal((C, CLASSES)) * 0.5).astype(np.float32)
    for i in range(3):
        stored[f"ln{i}.weight"] = np.ones(C, np.float32)
    nodes = []
    h = "x"
    for i, name in enumerate(WEIGHTS):
        nodes += [
            helper.make_node("LayerNormalization", [h, f"ln{i}.weight"], [f"n{i}"], axis=-1),
            helper.make_node("MatMul", [f"n{i}", name], [f"m{i}"]),
            helper.make_node("Add", [h, f"m{i}"], [f"h{i}"]),
        ]
        h = f"h{i}"
    axes = helper.make_tensor("axes_value", TensorProto.INT64, [1], [1])
    nodes += [
        helper.make_node("LayerNormalization", [h, "ln2.weight"], ["n2"], axis=-1),
        helper.make_node("Constant", [], ["axes"], value=axes),
        helper.make_node("ReduceMean", ["n2", "axes"], ["features"], keepdims=0),
        helper.make_node("MatMul", ["features", "head.weight"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-prelm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", T, C])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", C]),
        ],
        [numpy_helper.from_array(v, k) for k, v in stored.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    info = ModelInfo(
        name="tiny-prelm",
        fingerprint=fingerprint(stored),
        tensors={k: TensorInfo(k, (C, C), transposed=True) for k in WEIGHTS},
        inputs=("x",),
        outputs=("logits", "features"),
    )
    helper.set_model_props(model, {META_KEY: info.to_json()})
    onnx.save(model, str(path))
    return info


def adapter(info: ModelInfo, name: str, seed: int, scale: float = 1.5) -> Adapter:
    """A dense-ish delta on both weights: changes the features a lot (the point of per-state detectors)."""
    rng = np.random.default_rng(seed)
    idx = np.stack(np.unravel_index(np.arange(C * C), (C, C))).astype(np.int32)
    tensors = {k: SparseDelta(idx, (rng.standard_normal(C * C) * scale).astype(np.float32)) for k in WEIGHTS}
    return Adapter(name, info.fingerprint, tensors, {k: (C, C) for k in WEIGHTS})


PATTERNS = {  # domain -> (offset pattern seed, scale)
    "clean": (None, 1.0),
    "a": (1, 1.0),
    "b": (2, 1.0),
    "novel": (3, 3.0),
}


def domain(name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs of a synthetic domain: class templates, then a domain-specific offset and scale."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(42).normal(0, 1, (CLASSES, T, C))
    y = rng.integers(0, CLASSES, n)
    x = templates[y] + rng.normal(0, 0.3, (n, T, C))
    pat, scale = PATTERNS[name]
    if pat is not None:
        x = x * scale + np.random.default_rng(pat).normal(0, 2.0, (T, C))
    return x.astype(np.float32), y


def _setup(tmp_path, head):
    src = tmp_path / "m.onnx"
    info = make_prelm(src)
    tapped = tap_model(src, tmp_path / "m.tapped.onnx", "all", head=head)
    rt = Runtime(tapped.path, strategy="bound")
    for i, name in enumerate(("a", "b")):
        rt.load_adapter(adapter(info, name, seed=10 + i))
    return src, info, tapped, rt


@pytest.fixture(params=["numpy", "graph"])
def setup(tmp_path, request):
    """The tiny model tapped, loaded with two adapters; scored in numpy, or by an in-graph detector head."""
    s = _setup(tmp_path, Head(domains=4, classes=CLASSES) if request.param == "graph" else None)
    yield s
    s[3].close()


@pytest.fixture
def headed(tmp_path):
    s = _setup(tmp_path, Head(domains=4, classes=CLASSES))
    yield s
    s[3].close()


def router_for(rt, tapped, **cfg) -> Reconfigurator:
    r = Reconfigurator(rt, tapped, RouterConfig(**{"window": 24, "dwell": 32, "reservoir": 400, **cfg}))
    for i, name in enumerate(("clean", "a", "b")):
        r.add_domain(name, None if name == "clean" else name, *domain(name, 400, seed=i))
    r.fit()
    return r


def stream(router, names, n=96, batch=8, labels=False, seed=100):
    served, events = [], []
    for j, name in enumerate(names):
        x, y = domain(name, n, seed=seed + j)
        for s in range(0, n, batch):
            step = router.process(x[s : s + batch], y[s : s + batch] if labels else None)
            served += [step.served_by] * len(step.logits)
            if step.event:
                events.append(step.event)
    return served, events


# -- taps ---------------------------------------------------------------------------------------
def test_tap_sets_pick_norm_inputs(tmp_path):
    make_prelm(tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    assert resolve_taps(m, "attn") == ["h0"]
    assert resolve_taps(m, "blocks") == ["h1"]
    assert resolve_taps(m, "all") == ["h0", "h1"]
    assert resolve_taps(m, ["n2"]) == ["n2"]
    assert resolve_taps(m, "first") == ["h0"]  # auto (attn here) cut to its first tap
    assert resolve_taps(m, "mlp-in") == ["n1"]  # attn's taps, normalised (the LayerNorm reading h0)
    assert resolve_taps(m, "attn-in") == ["n0"]  # each block's first norm output (n2 is the final norm)
    # every registered set has a case: tests/device/test_taps.py::test_every_tap_set_has_a_case


def test_tapped_model_keeps_fingerprint_and_adds_pooled_features(setup):
    src, info, tapped, rt = setup
    assert tapped.width == 2 * C and tapped.tensors == ("h0", "h1")
    x, _ = domain("clean", 5, 0)
    out = rt.run({"x": x})  # loading verified the fingerprint; adapters applied fine
    assert out[FEATURES].shape == (5, 2 * C)
    with Runtime(src) as plain:
        np.testing.assert_allclose(plain.run({"x": x})["logits"], out["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "taps, match", [(["nope"], "names no tensor"), ("heads", "unknown tap set")], ids=["tensor", "set"]
)
def test_tap_errors(tmp_path, taps, match):
    make_prelm(tmp_path / "m.onnx")
    with pytest.raises((ConfigError, KeyError), match=match):
        tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", taps)


def test_tapping_twice_is_refused(setup, tmp_path):
    _, _, tapped, _ = setup
    with pytest.raises(ConfigError, match="already has"):
        tap_model(tapped.path, tmp_path / "tt.onnx", "all")


# -- routing ------------------------------------------------------------------------------------
def test_routes_each_domain_to_its_adapter(setup):
    _, _, tapped, rt = setup
    router = router_for(rt, tapped, learn=False)
    served, events = stream(router, ["clean", "a", "b", "a", "clean"])
    truth = np.repeat(["clean", "a", "b", "a", "clean"], 96)
    assert (np.array(served) == truth).mean() >= 0.75  # each of 4 transitions costs about one window (24)
    assert events == ["switch:a", "switch:b", "switch:a", "switch:clean"]
    assert rt.active == {} and router.active == "clean"


def test_per_state_detectors_tell_domains_apart_under_every_state(setup):
    _, _, tapped, rt = setup
    router = router_for(rt, tapped, learn=False)
    for state in ("clean", "a", "b"):
        router.switch_to(state)
        det = router.detector(state)
        for i, name in enumerate(("clean", "a", "b")):
            f, _ = router.features(domain(name, 100, seed=50 + i)[0])
            assert (det.route(f)[1] == i).mean() > 0.9, (state, name)


def test_mixed_stream_does_not_thrash(setup):
    _, _, tapped, rt = setup
    router = router_for(rt, tapped, learn=False)
    xa, _ = domain("a", 400, 7)
    xb, _ = domain("b", 400, 8)
    pick = np.random.default_rng(0).random(400) < 0.5
    x = np.where(pick[:, None, None], xa, xb)
    for s in range(0, 400, 8):
        router.process(x[s : s + 8])
    assert router.stats["switches"] <= 2


def test_labels_never_change_routing(setup):
    _, _, tapped, rt = setup
    r1 = router_for(rt, tapped, learn=False)
    served1, _ = stream(r1, ["clean", "a", "b"])
    r2 = router_for(rt, tapped, learn=False)
    served2, _ = stream(r2, ["clean", "a", "b"], labels=True)
    assert served1 == served2


def test_learning_updates_prototypes_and_threshold(setup):
    _, _, tapped, rt = setup
    router = router_for(rt, tapped, learn=True, learn_every=32)
    det = router.detector("clean")
    before = det.prototypes.copy()
    stream(router, ["clean"], labels=True)
    assert not np.allclose(det.prototypes[: len(before)], before)


# -- the in-graph detector head ------------------------------------------------------------------
def assert_votes_match(out, det, tol=1e-5):
    """The graph's votes are the numpy detector's route + threshold (inputs within float noise of it excepted)."""
    score, dom = det.route(out[FEATURES])
    clear = np.abs(score - det.threshold) > tol
    np.testing.assert_array_equal(out[VOTE][clear], np.where(score < det.threshold, -1, dom)[clear])
    assert clear.mean() > 0.9


def test_graph_head_matches_numpy_scoring_under_every_state_and_after_learning(headed):
    _, _, tapped, rt = headed
    router = router_for(rt, tapped, learn=True, learn_every=32, head_sync_s=0.0)
    assert router.scoring == "graph"
    x = np.concatenate([domain("a", 64, seed=70)[0], domain("novel", 64, seed=71)[0]])
    for state in ("clean", "a", "b", "clean"):
        router.switch_to(state)
        out = rt.run({"x": x})
        det = router.detector(state)
        assert_votes_match(out, det)
        assert (out[VOTE][:64] == 1).mean() > 0.8 and (out[VOTE][64:] == -1).mean() > 0.8  # "a" is domain 1
    router.switch_to("a")
    before = rt.weights(HEAD_P)  # the prototypes' Gemm (the whitening one never changes between fits)
    stream(router, ["a"], n=96, labels=True)  # prototype updates are written into the head
    det = router.detector("a")
    assert not np.allclose(rt.weights(HEAD_P), before)
    assert_votes_match(rt.run({"x": x}), det)


@pytest.mark.parametrize("learn", [False, True])
def test_process_fetches_only_what_the_step_needs(setup, learn, monkeypatch):
    """Serving fetches the logits and the vote (graph) or the features (numpy); learning adds the features."""
    _, _, tapped, rt = setup
    router = router_for(rt, tapped, learn=learn, learn_every=16)
    graph = router.scoring == "graph"
    want = ["logits", *([VOTE] if graph else []), *([FEATURES] if learn or not graph else [])]
    assert sorted(router.fetches) == sorted(want)
    asked, run = [], rt.run
    monkeypatch.setattr(rt, "run", lambda feeds, outputs=None: asked.append(outputs) or run(feeds, outputs))
    x, y = domain("a", 64, seed=5)
    full = run({"x": x[:8]})  # every output, under the state that serves the first batch
    steps = [router.process(x[s : s + 8], y[s : s + 8]) for s in range(0, 64, 8)]
    assert len(asked) == 8 and all(sorted(o) == sorted(want) for o in asked)
    np.testing.assert_array_equal(steps[0].logits, full["logits"])
    if graph:  # the vote served is the graph's
        np.testing.assert_array_equal(steps[0].codes, full[VOTE])
    assert (np.concatenate([st.codes for st in steps]) == 1).mean() > 0.8  # "a" is domain 1


def test_learned_prototypes_reach_the_head_at_most_once_per_sync_interval(headed):
    _, _, tapped, rt = headed
    router = router_for(rt, tapped, learn=True, learn_every=16, head_sync_s=3600.0)
    router.switch_to("a")
    written = rt.weights(HEAD_P)
    stream(router, ["a"], n=96, labels=True)  # several prototype updates, none written yet
    np.testing.assert_array_equal(rt.weights(HEAD_P), written)
    steps = [router.process(domain("a", 8, seed=90)[0])]
    assert steps[0].ood.dtype == bool  # scored against the threshold that goes with the written head
    router.switch_to("b")
    router.switch_to("a")  # a switch writes the learned prototypes
    x, _ = domain("a", 32, seed=91)
    assert_votes_match(rt.run({"x": x}), router.detector("a"))


def test_head_outgrown_falls_back_to_numpy_with_a_warning(headed, caplog):
    _, _, tapped, rt = headed
    small = Head(domains=2, classes=CLASSES)
    router = Reconfigurator(rt, replace(tapped, head=small), RouterConfig(window=24, dwell=32, learn=False))
    for i, name in enumerate(("clean", "a", "b")):
        router.add_domain(name, None if name == "clean" else name, *domain(name, 200, seed=i))
    with caplog.at_level("WARNING", logger="edge.route.router"):
        router.fit()
    assert router.scoring == "numpy" and "outgrow the graph head" in caplog.text
    served, _ = stream(router, ["clean", "a"])
    assert served[-48:] == ["a"] * 48


def test_head_tensors_are_runtime_state_not_weights(headed, tmp_path):
    src, info, tapped, rt = headed
    assert rt.heads == [HEAD_C, HEAD_M, HEAD_P, HEAD_T] and rt.info.fingerprint == info.fingerprint
    m = rt.info.tensors[HEAD_M].shape
    with pytest.raises(ConfigError, match="shape"):
        rt.set_head({HEAD_M: np.zeros((1, 1), np.float32)})
    with pytest.raises(ConfigError, match="non-finite"):
        rt.set_head({HEAD_M: np.full(m, np.nan, np.float32)})
    with pytest.raises(ConfigError, match="not a detector-head tensor"):
        rt.set_head({WEIGHTS[0]: np.zeros((C, C), np.float32)})
    with pytest.raises(ConfigError, match="non-finite"):  # a bad head leaves the switch undone
        rt.switch("a", head={HEAD_M: np.full(m, np.inf, np.float32)})
    assert rt.active == {}
    idx = np.zeros((2, 1), np.int32)
    bad = Adapter("bad", info.fingerprint, {HEAD_M: SparseDelta(idx, np.ones(1, np.float32))}, {HEAD_M: m})
    with pytest.raises(AdapterMismatchError, match="detector-head"):
        rt.load_adapter(bad)
    model = onnx.load(str(tapped.path))  # the fingerprint still guards the real weights of a headed model
    w = next(t for t in model.graph.initializer if t.name == WEIGHTS[0])
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) + 1, WEIGHTS[0]))
    onnx.save(model, str(tmp_path / "tampered.onnx"))
    with pytest.raises(FormatError, match="fingerprint"):
        Runtime(tmp_path / "tampered.onnx")


def test_graph_head_is_prepacked_by_the_hybrid_strategy(headed):
    _, info, tapped, _ = headed
    with Runtime(tapped.path, strategy="hybrid") as rt:
        for i, name in enumerate(("a", "b")):
            rt.load_adapter(adapter(info, name, seed=10 + i))
        router = router_for(rt, tapped, learn=False)
        router.switch_to("b")
        rt.wait_settled()
        x, _ = domain("b", 32, seed=71)
        assert_votes_match(rt.run({"x": x}), router.detector("b"))


# -- novelty and growth hand-off ----------------------------------------------------------------
def test_novel_stream_goes_to_base_and_buffers_for_growth(setup):
    _, info, tapped, rt = setup
    router = router_for(rt, tapped, learn=False, novel_buffer=64)
    router.switch_to("a")
    served, events = stream(router, ["novel"], n=160, labels=True)
    assert events[:2] == ["novel", "switch:clean"]
    assert router.novel and router.growth_ready
    x, y = router.take_buffer()
    assert len(x) >= 64 and (y >= 0).all()
    rt.load_adapter(adapter(info, "grown", seed=30))
    router.add_grown("novel-1", "grown", x, y)
    assert router.active == "novel-1" and not router.novel and rt.active == {"grown": 1.0}
    served, _ = stream(router, ["novel"], n=64, seed=300)
    assert served.count("novel-1") == len(served)


def test_known_domain_after_false_alarms_drops_the_buffer(setup):
    _, _, tapped, rt = setup
    router = router_for(rt, tapped, learn=False)
    stream(router, ["clean"] * 3)
    assert not router.novel and len(router.take_buffer()[0]) < 16


def test_stream_config_errors():
    from lab.stream import StreamConfig

    with pytest.raises(ConfigError, match="rate"):
        StreamConfig(rate=0.0)
    with pytest.raises(ConfigError, match="grow_on"):
        StreamConfig(grow_on="cloud")


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"switch_share": 0.0}, "switch_share"),
        ({"tpr": 1.5}, "tpr"),
        ({"window": 0}, "window"),
        ({"dwell": -1}, "dwell"),
    ],
)
def test_router_config_errors(cfg, match):
    with pytest.raises(ConfigError, match=match):
        RouterConfig(**cfg)


def test_router_refuses_unknown_adapter_and_duplicate_domain(setup):
    _, _, tapped, rt = setup
    r = Reconfigurator(rt, tapped)
    with pytest.raises(ConfigError, match="not loaded"):
        r.add_domain("z", "zz", *domain("a", 10, 0))
    r.add_domain("clean", None, *domain("clean", 10, 0))
    with pytest.raises(ConfigError, match="already known"):
        r.add_domain("clean", None, *domain("clean", 10, 0))
    with pytest.raises(ConfigError, match="not fitted"):
        r.process(domain("clean", 4, 0)[0])


# -- growth -------------------------------------------------------------------------------------
DEVICE = {"infer_ms": 1.0, "switch_ns_per_entry": 100.0}


def test_candidates_cost_and_budget(tmp_path):
    info = make_prelm(tmp_path / "m.onnx")
    cands = candidates(info, Budget(memory_mb=60 * BYTES_PER_ENTRY / 2**20, latency_ms=10.0), DEVICE)
    by = {str(c.arch): c for c in cands}
    assert by["shira/attn@0.1"].targets == ("blocks.0.attn.q.weight",)
    assert by["shira/all@0.1"].nnz == 2 * round(0.1 * 64)
    assert all(c.fits == (c.nnz <= 60) for c in cands)
    assert {c.arch.layers for c in cands} == {"attn", "mlp", "all", "late"}


def test_candidate_memory_is_what_the_runtime_keeps_of_it(tmp_path):
    """Growth costs a candidate with the runtime's own per-entry figures (edge.fusion.entry_bytes), so the memory it
    plans is what the runtime then holds for the adapter (before: 52 bytes an entry; the runtime keeps 40 of a
    float32 matrix, at least 28 by the bound it checks before preparing a load)."""
    from edge.fusion import entry_bytes

    info = make_prelm(tmp_path / "m.onnx")
    assert BYTES_PER_ENTRY == entry_bytes(4, 2)
    for c in candidates(info, Budget(), DEVICE):
        with Runtime(tmp_path / "m.onnx", strategy="bound") as rt:
            rt.load_adapter(FakeTrainer(info).train(c.arch, None, None, "g"))
            held = rt.adapter_bytes["g"]
        assert held >= c.nnz * entry_bytes(4, 2, prepared=False)
        assert held == c.memory_mb * 2**20, c.arch  # at most, in general; exactly here (no aligned run of entries)


class FakeTrainer:
    """Numpy stand-in for the host trainer: saliency = |weight|, training = random deltas at the mask."""

    def __init__(self, info):
        self.info, self.trained = info, []

    def saliency(self, x, y, params):
        rng = np.random.default_rng(0)
        return {p: np.abs(rng.standard_normal((C, C))) * (3.0 if "attn" in p else 1.0) for p in params}

    def train(self, arch, x, y, name):
        self.trained.append(arch)
        rng = np.random.default_rng(1)
        tensors = {}
        for t in arch.targets(self.info):
            n = max(1, round(arch.density * C * C))
            flat = np.sort(rng.choice(C * C, n, replace=False))
            tensors[t] = SparseDelta(np.stack(np.unravel_index(flat, (C, C))).astype(np.int32), np.ones(n, np.float32))
        return Adapter(name, self.info.fingerprint, tensors, {t: (C, C) for t in tensors})


def test_grow_picks_within_budget_by_proxy_and_trains(setup):
    _, info, _, rt = setup
    trainer = FakeTrainer(info)
    x, y = domain("novel", 32, 0)
    res = grow(
        rt, x, y, trainer=trainer, budget=Budget(memory_mb=10 * BYTES_PER_ENTRY / 2**20), name="g", device=DEVICE
    )
    assert res.chosen.fits and res.chosen.nnz <= 10
    assert trainer.trained == [res.chosen.arch]
    assert res.adapter.name == "g" and rt.load_adapter(res.adapter) == "g"
    fit = [c for c in res.candidates if c.fits]
    assert res.chosen.proxy >= 0.9 * max(c.proxy for c in fit)
    assert res.as_dict()["chosen"]["arch"] == str(res.chosen.arch)


def test_select_takes_cheapest_near_the_best_proxy():
    from edge.learn.space import Candidate

    def cand(d, nnz, proxy, fits=True):
        return Candidate(Arch("shira", d, "all"), ("w",), nnz, 0.0, 0.0, fits, proxy)

    cs = [cand(0.01, 10, 0.50), cand(0.02, 20, 0.93), cand(0.05, 50, 1.0), cand(0.1, 100, 2.0, fits=False)]
    assert select(cs, knee=0.9).nnz == 20
    assert select(cs, knee=1.0).nnz == 50
    with pytest.raises(ConfigError, match="no adapter architecture fits"):
        select([cand(0.1, 100, 2.0, fits=False)])


def test_growth_job_trains_in_a_child_process_and_hands_back_a_file(setup, tmp_path):
    _, info, _, rt = setup
    x, y = domain("novel", 32, 0)
    job = GrowthJob(rt, x, y, trainer=FakeTrainer(info), workdir=tmp_path, device=DEVICE, name="g1")
    served = 0
    while not job.done():  # the parent keeps serving meanwhile
        rt.run({"x": x[:4]})
        served += 1
    res = job.result()
    same = grow(rt, x, y, trainer=FakeTrainer(info), name="g1", device=DEVICE)  # the same choice in-process
    assert res.chosen == same.chosen and [c.as_dict() for c in res.candidates] == [c.as_dict() for c in same.candidates]
    assert job.adapter_path.exists() and res.adapter.name == "g1" and rt.load_adapter(res.adapter) == "g1"
    for t, d in same.adapter.tensors.items():
        np.testing.assert_array_equal(res.adapter.tensors[t].indices, d.indices)
    assert served >= 1


def test_growth_job_reports_the_childs_error(setup, tmp_path):
    _, info, _, rt = setup
    x, y = domain("novel", 16, 0)
    job = GrowthJob(rt, x, y, trainer=FakeTrainer(info), workdir=tmp_path, device=DEVICE, budget=Budget(memory_mb=1e-9))
    with pytest.raises(ConfigError, match="no adapter architecture fits the budget"):
        job.result(timeout=120)
    with pytest.raises(ConfigError, match="name"):
        GrowthJob(rt, x, y, trainer=FakeTrainer(info), workdir=tmp_path, device=DEVICE, name="../evil")


def test_background_refit_on_a_shadow_leaves_the_serving_runtime_alone(setup):
    _, info, tapped, rt = setup
    router = router_for(rt, tapped, learn=False, novel_buffer=64)
    shadow = Runtime(tapped.path, strategy="bound")
    for name in ("a", "b", "grown"):
        a = adapter(info, name, seed={"a": 10, "b": 11, "grown": 30}[name])
        shadow.load_adapter(a)
        if name == "grown":
            rt.load_adapter(a)
    x, y = domain("novel", 200, seed=5)
    refit = router.add_grown_background("novel-1", "grown", x, y, shadow=shadow)
    while not refit.done():  # serving meanwhile: the old detectors, the base model's weights
        step = router.process(domain("clean", 8, seed=6)[0])
        assert step.served_by == "clean" and rt.active == {}
    router.commit(refit)
    assert router.active == "novel-1" and rt.active == {"grown": 1.0}
    served, _ = stream(router, ["novel"], n=64, seed=301)
    assert served.count("novel-1") == len(served)
    shadow.close()


@pytest.mark.parametrize(
    "labels, match", [(np.full(8, -1), "no label"), (np.zeros(3, np.int64), "labelled inputs")], ids=["none", "len"]
)
def test_grow_needs_labels(setup, labels, match):
    _, info, _, rt = setup
    with pytest.raises(ConfigError, match=match):
        grow(rt, domain("novel", 8, 0)[0], labels, trainer=FakeTrainer(info), device=DEVICE)


def test_budget_from_a_profile_like_object():
    class B:
        memory_mb, latency_p95_ms = 100.0, 20.0

    class P:
        budgets = B()

    b = Budget.of(P(), resident_mb=40.0)
    assert (b.memory_mb, b.latency_ms) == (60.0, 20.0)
    with pytest.raises(ConfigError, match="budgets"):
        Budget.of(object())


def test_search_space_is_registered_layer_sets():
    assert len(SEARCH_SPACE) == 20 and {a.kind for a in SEARCH_SPACE} == {"shira"}


def test_device_side_modules_import_without_torch():
    code = (
        "import importlib.abc, sys\n"
        "class _NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, _NoTorch())\n"
        "import edge.route.ood, edge.route.router, edge.learn.growth, edge.route.taps, lab.stream, lab.bench_ood\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# -- end to end on the demo (needs the host side and time) --------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "background, grow_on", [(True, "device"), (False, "host")], ids=["background-device", "inline-host"]
)
def test_stream_demo_grows_and_routes(tmp_path, background, grow_on):
    pytest.importorskip("torch")
    from lab.datasets import load_domains
    from lab.pipeline import DemoConfig, prepare_demo
    from lab.stream import StreamConfig, run_stream

    cache = Path("/tmp/edgecache") if Path("/tmp/edgecache").exists() else tmp_path
    art = prepare_demo(cache, DemoConfig(), progress=False)
    domains = load_domains(DemoConfig().domains)
    r = run_stream(
        art.model,
        art.adapters,
        art.model.parent / "encoder.safetensors",
        domains,
        StreamConfig(background=background, grow_on=grow_on),
        progress=False,
    )
    assert [g["truth"] for g in r["growth"]] == ["invert"] and r["growth"][0]["background"] == background
    assert r["scoring"] == "graph"
    assert r["overall"]["acc"] > r["overall"]["base_acc"] + 0.15
    final = {f["domain"]: f for f in r["final"]}
    assert final["invert"]["served_mostly_by"] == "new-1"
    assert all(f["served_share"] > 0.85 for f in r["final"])
