"""Taps, detectors and the graph head on encoders this project did not write (issue 17, outside audit).

HF text encoders (random weights, transformers config classes) with attention masks, a small CNN trained on
sklearn's digits with two outputs, all exported with ``torch.onnx.export`` and brought in by ``import_onnx``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
T = pytest.importorskip("transformers")
from torch import nn  # noqa: E402

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from edge.route.detectors import threshold_at_tpr  # noqa: E402
from edge.route.ood import DETECTORS, HDC, make_detector  # noqa: E402
from edge.route.taps import FEATURES, VOTE, Head, tap_model  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
FAMILIES = {
    "bert": lambda: T.BertModel(T.BertConfig(**TEXT, max_position_embeddings=64)),
    "roberta": lambda: T.RobertaModel(T.RobertaConfig(**TEXT, max_position_embeddings=64, pad_token_id=1)),
    "distilbert": lambda: T.DistilBertModel(
        T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64)
    ),
}


class Hidden(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export(model: nn.Module, args: tuple, path, names: list[str], outputs: list[str], axes: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), args, str(path), dynamo=False, opset_version=17, input_names=names,
                          output_names=outputs, dynamic_axes=axes)  # fmt: skip


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def text_model(request, tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp(request.param)
    ids = torch.randint(5, 100, (2, 8))
    axes = {"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}, "h": {0: "b", 1: "t"}}
    export(Hidden(FAMILIES[request.param]()), (ids, torch.ones_like(ids)), d / "m.onnx",
           ["input_ids", "attention_mask"], ["h"], axes)  # fmt: skip
    import_onnx(d / "m.onnx", d / "m.edge.onnx")
    return d / "m.edge.onnx"


def padded(sentences: list[np.ndarray], length: int) -> dict[str, np.ndarray]:
    ids = np.zeros((len(sentences), length), np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(sentences):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("taps", ["auto", "attn-in", "mlp-in:1"])
def test_padding_a_sentence_does_not_change_its_features_or_vote(text_model, tmp_path, taps):
    rng = np.random.default_rng(0)
    a, b = rng.integers(5, 100, 5), rng.integers(5, 100, 9)
    tapped = tap_model(text_model, tmp_path / "t.onnx", taps, head=Head(2, 3))
    plain = tap_model(text_model, tmp_path / "p.onnx", taps, mask=None)  # every position averaged
    with Runtime(tapped.path) as rt, Runtime(plain.path) as rp, Runtime(text_model) as orig:
        alone = rt.run(padded([a], 5))[FEATURES]
        for feeds in (padded([a], 8), padded([a, b], 12), padded([b, a], 9)):  # batch > 1, dynamic length
            out = rt.run(feeds)
            row = 0 if feeds["attention_mask"][0].sum() == 5 else 1
            np.testing.assert_allclose(out[FEATURES][row], alone[0], atol=1e-5)
            assert out[VOTE].shape == (len(feeds["input_ids"]),)
            np.testing.assert_array_equal(out["h"], orig.run(feeds)["h"])  # the model's own output, bit for bit
        # without the mask, padding leaks into the features: the check above is not vacuous
        assert np.abs(rp.run(padded([a], 8))[FEATURES][0] - rp.run(padded([a], 5))[FEATURES][0]).max() > 1e-3


def test_a_mask_that_is_not_a_token_input_is_refused(text_model, tmp_path):
    with pytest.raises(ConfigError, match="not a \\[batch, tokens\\] input"):
        tap_model(text_model, tmp_path / "t.onnx", "attn", mask="token_type_ids")


@pytest.mark.parametrize("name", ["edge.head.u", "edge.mask.w", "edge.vote"])
def test_a_model_already_holding_a_name_the_taps_add_is_refused(text_model, tmp_path, name):
    m = onnx.load(str(text_model))
    old = m.graph.output[0].name
    m.graph.output[0].name = name
    for n in m.graph.node:
        n.output[:] = [name if o == old else o for o in n.output]
    onnx.save(m, str(tmp_path / "clash.onnx"))
    with pytest.raises(ConfigError, match="already has"):  # was onnxruntime's "Duplicate definition" at load
        tap_model(tmp_path / "clash.onnx", tmp_path / "t.onnx", "attn-in", head=Head(2, 3))


def test_no_taps_is_a_config_error(text_model, tmp_path):
    with pytest.raises(ConfigError, match="no taps given"):  # was an IndexError
        tap_model(text_model, tmp_path / "t.onnx", [])


# -- a CNN trained on sklearn digits, two outputs ----------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc, self.aux = nn.Linear(16, 10), nn.Linear(16, 2)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3))
        return self.fc(h), self.aux(h)


DOMAINS = {0: lambda x: x, 1: lambda x: 1.0 - x, 2: lambda x: x.transpose(0, 1, 3, 2)[:, :, ::-1]}  # 2 unseen


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x, y = (digits.images[:, None] / 16.0).astype(np.float32), digits.target
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    xs = np.concatenate([DOMAINS[0](x[:1000]), DOMAINS[1](x[:1000])])
    ys = torch.from_numpy(np.concatenate([y[:1000], y[:1000]]))
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(net(torch.from_numpy(xs))[0], ys).backward()
        opt.step()
    d = tmp_path_factory.mktemp("cnn")
    export(net, (torch.from_numpy(x[:2]),), d / "m.onnx", ["x"], ["logits", "aux"], {"x": {0: "b"}})
    import_onnx(d / "m.onnx", d / "m.edge.onnx")
    return d / "m.edge.onnx", x, y


def test_graph_head_votes_as_numpy_hdc_on_a_foreign_cnn(cnn, tmp_path):
    path, x, y = cnn
    tapped = tap_model(path, tmp_path / "t.onnx", "stages", head=Head(domains=2, classes=10))
    with Runtime(tapped.path) as rt, Runtime(path) as orig:
        fit = [rt.run({"x": DOMAINS[d](x[:1000])}) for d in (0, 1)]
        det = HDC().fit(np.concatenate([o[FEATURES] for o in fit]), np.concatenate([o["logits"] for o in fit]),
                        np.concatenate([y[:1000]] * 2), np.repeat([0, 1], 1000))  # fmt: skip
        cal = np.concatenate([rt.run({"x": DOMAINS[d](x[1000:1300])})[FEATURES] for d in (0, 1)])
        det.calibrate(cal, tpr=0.95)
        test = {d: DOMAINS[d](x[1300:]) for d in (0, 1, 2)}
        ref = {d: orig.run({"x": xs}) for d, xs in test.items()}
        for d, xs in test.items():
            out = rt.run({"x": xs})
            for k in ("logits", "aux"):  # outputs other than the new ones: exactly the original's
                np.testing.assert_array_equal(out[k], ref[d][k])
        rt.set_head(det.head_values(tapped.head))
        for d, xs in test.items():
            out = rt.run({"x": xs})
            for k in ("logits", "aux"):  # hybrid serves from the bound session until its rebuild: 1 ulp apart
                np.testing.assert_allclose(out[k], ref[d][k], rtol=1e-5, atol=1e-6)
            score, dom = det.route(out[FEATURES])
            clear = np.abs(score - det.threshold) > 1e-5
            want = np.where(det.is_ood(out[FEATURES], out["logits"]), -1, dom)
            np.testing.assert_array_equal(out[VOTE][clear], want[clear])
            assert clear.mean() > 0.95
            assert (out[VOTE] == (d if d < 2 else -1)).mean() > 0.8, d  # known routed, unseen voted OOD
        narrow = HDC().fit(cal[:, :8], np.zeros((len(cal), 1)), np.zeros(len(cal), int))
        narrow.calibrate(cal[:, :8])
        with pytest.raises(ConfigError):  # a detector of another width cannot be written into this head
            rt.set_head(narrow.head_values(tapped.head))


# -- detectors on hostile features -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DETECTORS))
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_fit_inputs_are_refused(name, bad):
    rng = np.random.default_rng(0)
    f, lg = rng.normal(size=(40, 8)), rng.normal(size=(40, 3))
    f[3, 2] = bad  # was: LinAlgError (hdc, mahalanobis), a NaN threshold voting everything in (knn)
    with pytest.raises(ConfigError, match="NaN or inf"):
        make_detector(name).fit(f, lg, rng.integers(0, 3, 40))
    f[3, 2], lg[1, 1] = 0.0, bad  # was: a NaN score for that row (msp, energy)
    with pytest.raises(ConfigError, match="NaN or inf"):
        make_detector(name).fit(f, lg, rng.integers(0, 3, 40))


@pytest.mark.parametrize("name", ["hdc", "mahalanobis", "knn"])
def test_a_non_finite_input_scores_out_of_distribution_and_a_wrong_width_is_refused(name):
    rng = np.random.default_rng(0)
    f, lg = rng.normal(size=(60, 8)).astype(np.float32), rng.normal(size=(60, 3))
    det = make_detector(name).fit(f, lg, rng.integers(0, 3, 60))
    det.calibrate(f, lg, tpr=0.95)
    g = f[:4].copy()
    g[1, 0] = np.nan
    assert det.is_ood(g, lg[:4]).tolist()[1] is True  # NaN < threshold is False: was voted in distribution
    with pytest.raises(ConfigError, match="5 wide but detector"):  # was a numpy ValueError
        det.score(f[:, :5], lg)


def test_nan_scores_cannot_calibrate():
    with pytest.raises(ConfigError, match="NaN"):
        threshold_at_tpr(np.array([0.1, np.nan, 0.3]))


# -- the loop on the foreign CNN: detect, route, grow on the graph's tail, route the grown domain --------------
class _serving:
    """``served(d, lo, hi)``: stream ``DOMAINS[d](x[lo:hi])`` through the router in batches of 8, return who served
    each batch and the votes; count in ``mismatches`` every input whose graph-head vote differs from HDC scored in
    numpy on the same features (inputs within 1e-5 of the threshold are not compared)."""

    def __init__(self, router, rt, x, y):
        self.router, self.rt, self.x, self.y, self.mismatches = router, rt, x, y, 0

    def __call__(self, d: int, lo: int, hi: int) -> tuple[list, list]:
        by, votes = [], []
        for s in range(lo, hi, 8):
            xs = DOMAINS[d](self.x[s : s + 8])
            step = self.router.process(xs, self.y[s : s + 8])
            by.append(step.served_by)
            votes += step.votes
            out = self.rt.run({"x": xs}, outputs=[FEATURES, VOTE])
            det = self.router.detector(self.router.active)
            score, dom = det.route(out[FEATURES])
            clear = np.abs(score - det.threshold) > 1e-5
            want = np.where(det.is_ood(out[FEATURES], np.zeros((len(xs), 1))), -1, dom)
            self.mismatches += int((out[VOTE][clear] != want[clear]).sum())
        return by, votes


def test_the_router_flags_grows_and_then_routes_an_unseen_domain_on_a_foreign_cnn(cnn, tmp_path):
    from edge.learn.device_trainer import TAIL_SPACE, DeviceTrainer
    from edge.learn.growth import grow
    from edge.route.router import Reconfigurator, RouterConfig

    path, x, y = cnn
    tapped = tap_model(path, tmp_path / "t.onnx", "stages", head=Head(domains=4, classes=10))
    with Runtime(tapped.path) as rt:
        router = Reconfigurator(rt, tapped, RouterConfig(window=24, dwell=32, reservoir=400, novel_buffer=96))
        for d, name in enumerate(("clean", "invert")):
            router.add_domain(name, None, DOMAINS[d](x[:400]), y[:400])
        router.fit()
        assert router.scoring == "graph"

        served = _serving(router, rt, x, y)

        for d, name in enumerate(("clean", "invert")):
            _, votes = served(d, 1300, 1400)
            print(name, {v: votes.count(v) for v in set(votes)})
            assert votes.count(name) / len(votes) > 0.75, (name, votes)
        served(2, 400, 800)
        assert router.novel and router.growth_ready  # the unseen domain was flagged and buffered
        xb, yb = router.take_buffer()
        trainer = DeviceTrainer(path, epochs=60)
        res = grow(rt, xb, yb, trainer=trainer, space=TAIL_SPACE, name="grown",
                   device={"infer_ms": 0.1, "switch_ns_per_entry": 50.0})  # fmt: skip
        assert res.chosen.arch in TAIL_SPACE
        rt.load_adapter(res.adapter)
        router.add_grown("rotate", "grown", xb, yb)
        by, votes = served(2, 1300, 1500)
        print("rotate", {v: votes.count(v) for v in set(votes)}, {b: by.count(b) for b in set(by)})
        assert by.count("rotate") / len(by) > 0.9 and votes.count("rotate") / len(votes) > 0.75
        assert served.mismatches == 0  # the head's vote is HDC's, scored in numpy, on every input served


# -- HF vision encoders: taps whose width inference leaves symbolic, CNN stages behind a computed Pad ----------
VISION = {
    "swin": (
        lambda: T.SwinModel(
            T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
        ),
        "auto",
        3,
    ),  # fmt: skip
    "mobilenet_v2": (
        lambda: T.MobileNetV2Model(T.MobileNetV2Config(image_size=32, depth_multiplier=0.25)),
        "stages",
        5,
    ),
}


class Pooled(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(pixel_values=x).pooler_output


@pytest.mark.parametrize("family", sorted(VISION))
def test_default_taps_resolve_on_hf_vision_encoders(family, tmp_path):
    """Swin's norms sit behind window reshapes (their width was symbolic: "not a tensor ... known feature
    dimension"); MobileNetV2 pads before each strided conv by a computed amount (the stage tap was that Pad)."""
    make, taps, count = VISION[family]
    torch.manual_seed(0)
    export(Pooled(make()), (torch.randn(2, 3, 32, 32),), tmp_path / "m.onnx", ["x"], ["y"], {"x": {0: "b"}})
    import_onnx(tmp_path / "m.onnx", tmp_path / "m.edge.onnx")
    tapped = tap_model(tmp_path / "m.edge.onnx", tmp_path / "t.onnx", taps, head=Head(2, 2))
    assert len(tapped.tensors) == count and not any("Pad" in t for t in tapped.tensors)
    xs = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    with Runtime(tapped.path) as rt, Runtime(tmp_path / "m.edge.onnx") as orig:
        out = rt.run({"x": xs})
        np.testing.assert_array_equal(out["y"], orig.run({"x": xs})["y"])
    assert out[FEATURES].shape == (3, tapped.width) and np.isfinite(out[FEATURES]).all()
    assert (out[VOTE] == -1).all()  # until a detector is written


# -- the loop on a foreign transformer: an HF ViT encoder with a small MLP head, trained on digits at 16x16 ----
class Vit(nn.Module):
    def __init__(self):
        super().__init__()
        cfg = T.ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64)  # fmt: skip
        self.m = T.ViTModel(cfg, add_pooling_layer=False)
        self.fc1, self.head = nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc1(self.m(pixel_values=x).last_hidden_state.mean(1))))


def test_the_router_flags_grows_and_then_routes_an_unseen_domain_on_a_foreign_vit(cnn, tmp_path):
    from edge.learn.device_trainer import TAIL_SPACE, DeviceTrainer
    from edge.learn.growth import grow
    from edge.route.router import Reconfigurator, RouterConfig

    _, x8, y = cnn
    x = np.kron(x8, np.ones((1, 1, 2, 2), np.float32))  # 16 x 16
    torch.manual_seed(0)
    net = Vit()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    xs = torch.from_numpy(np.concatenate([DOMAINS[0](x[:600]), DOMAINS[1](x[:600])]))
    ys = torch.from_numpy(np.concatenate([y[:600]] * 2))
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xs), ys).backward()
        opt.step()
    export(net, (xs[:2],), tmp_path / "m.onnx", ["x"], ["logits"], {"x": {0: "b"}})
    path = tmp_path / "m.edge.onnx"
    import_onnx(tmp_path / "m.onnx", path)
    tapped = tap_model(path, tmp_path / "t.onnx", "attn-in:1", head=Head(domains=4, classes=10))  # the ViT default
    with Runtime(tapped.path) as rt:
        router = Reconfigurator(rt, tapped, RouterConfig(window=24, dwell=32, reservoir=400, novel_buffer=96))
        for d, name in enumerate(("clean", "invert")):
            router.add_domain(name, None, DOMAINS[d](x[:400]), y[:400])
        router.fit()
        served = _serving(router, rt, x, y)

        for d, name in enumerate(("clean", "invert")):
            _, votes = served(d, 1300, 1400)
            print(name, {v: votes.count(v) for v in set(votes)})
            assert votes.count(name) / len(votes) > 0.85, (name, votes)
        served(2, 400, 800)
        assert router.novel and router.growth_ready
        xb, yb = router.take_buffer()
        res = grow(rt, xb, yb, trainer=DeviceTrainer(path, epochs=60), space=TAIL_SPACE, name="grown",
                   device={"infer_ms": 0.1, "switch_ns_per_entry": 50.0})  # fmt: skip
        rt.load_adapter(res.adapter)
        router.add_grown("rotate", "grown", xb, yb)
        by, votes = served(2, 1300, 1500)
        print("rotate", res.chosen.arch, {v: votes.count(v) for v in set(votes)}, {b: by.count(b) for b in set(by)})
        assert by.count("rotate") / len(by) > 0.9 and votes.count("rotate") / len(votes) > 0.75
        assert served.mismatches == 0  # the head's vote is HDC's, scored in numpy, on every input served


def test_an_integer_tap_is_a_config_error(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64),
        helper.make_node("Cast", ["xi"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["xf", "w"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])],
        [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "m.onnx"))
    import_onnx(tmp_path / "m.onnx", tmp_path / "m.edge.onnx")
    with pytest.raises(ConfigError, match="holds int64"):  # was onnxruntime's "Type Error" when loading the copy
        tap_model(tmp_path / "m.edge.onnx", tmp_path / "t.onnx", ["xi"])
    assert tap_model(tmp_path / "m.edge.onnx", tmp_path / "t.onnx", ["xf"]).width == 4
