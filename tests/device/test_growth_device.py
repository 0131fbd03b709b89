"""The device trainer (edge.learn.device_trainer): exact gradients, runtime-exact adapters, no torch."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from _blocking import BLOCK_TORCH, ROOT
from _tiny import make_mlp
from onnx import TensorProto, helper, numpy_helper

from edge.errors import ConfigError
from edge.format.adapter import load_adapter
from edge.format.modelinfo import META_KEY, ModelInfo, TensorInfo, fingerprint
from edge.learn.device_trainer import DEVICE_SPACE, TAIL_SPACE, DeviceTrainer
from edge.learn.space import LAYER_SETS, Arch
from edge.runtime import Runtime

FC2, HEAD = "blocks.1.mlp.fc2.weight", "head.weight"
DEVICE = {"infer_ms": 0.1, "switch_ns_per_entry": 50.0}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A small digits ViT (dim 32, 2 blocks) pretrained briefly on clean digits and exported; the invert domain."""
    torch = pytest.importorskip("torch")
    from exporters.onnx import export_onnx
    from lab import digits_model as dm
    from lab.datasets import load_domains

    domains = load_domains(("invert",), seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = dm.pretrain(
            domains["clean"], epochs=8, lr=1e-2, batch_size=64, dim=32, depth=2, heads=2, progress=False
        )
        path = tmp_path_factory.mktemp("growth-device") / "digits.onnx"
        example = (torch.as_tensor(domains["clean"].x_test[:4]),)
        info = export_onnx(
            model, example, path, input_names=["pixels"], output_names=["logits", "features"], name="tiny-digits"
        )
    finally:
        torch.set_num_threads(threads)
    return path, info, domains["invert"]


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def test_registered_trainer_layer_sets_and_space(digits):
    path, info, _ = digits
    assert LAYER_SETS.get("head")(list(info.tensors)) == [HEAD]
    assert LAYER_SETS.get("last-mlp")(sorted(info.tensors)) == [FC2, HEAD]
    assert DeviceTrainer(path).params == (FC2, HEAD)  # found from the graph, not by name
    assert LAYER_SETS.get("tail")(sorted(n for n, t in info.tensors.items() if len(t.shape) == 2)) == [FC2, HEAD]
    assert len(DEVICE_SPACE) == 10 and {a.layers for a in DEVICE_SPACE} == {"head", "last-mlp"}


def test_gradients_match_finite_differences(digits):
    path, _, dom = digits
    tr = DeviceTrainer(path)
    x, y = dom.x_train[:12], dom.y_train[:12]
    rng = np.random.default_rng(0)
    at = {p: w + 0.05 * rng.standard_normal(w.shape) for p, w in tr.base_weights().items()}  # off the base point
    _, grads = tr.loss_and_grads(x, y, at)
    eps = 1e-5
    for p, w in at.items():
        for flat in rng.choice(w.size, 5, replace=False):
            i = np.unravel_index(flat, w.shape)
            plus, minus = {**at, p: w.copy()}, {**at, p: w.copy()}
            plus[p][i] += eps
            minus[p][i] -= eps
            fd = (tr.loss_and_grads(x, y, plus)[0] - tr.loss_and_grads(x, y, minus)[0]) / (2 * eps)
            assert grads[p][i] == pytest.approx(fd, rel=1e-5, abs=1e-9), (p, i)


def test_saliency_is_w_times_grad_and_refuses_other_params(digits):
    path, _, dom = digits
    tr = DeviceTrainer(path)
    x, y = dom.x_train[:32], dom.y_train[:32]
    sal = tr.saliency(x, y, [HEAD, FC2])
    _, grads = tr.loss_and_grads(x, y)
    base = tr.base_weights()
    for p in (HEAD, FC2):
        np.testing.assert_allclose(sal[p], np.abs(base[p] * grads[p]))
    with pytest.raises(ConfigError, match="adapts only"):
        tr.saliency(x, y, ["blocks.0.attn.q.weight"])


def test_adapter_matches_the_runtime_and_the_format(digits, tmp_path):
    path, info, dom = digits
    tr = DeviceTrainer(path, epochs=20)
    a = tr.train(Arch("shira", 0.1, "last-mlp"), dom.x_train[:64], dom.y_train[:64], "grown")
    assert a.method == "shira" and a.base_fingerprint == info.fingerprint and set(a.tensors) == {FC2, HEAD}
    assert a.info == {
        "mask": "snip",
        "density": 0.1,
        "layers": "last-mlp",
        "grown": True,
        "samples": 64,
        "trainer": "device",
        "epochs": 20,
    }
    for p, d in a.tensors.items():
        assert d.indices.dtype == np.int32 and d.values.dtype == np.float32
        assert d.nnz == round(0.1 * np.prod(info.tensors[p].shape)) and np.abs(d.values).max() > 0
        flat = np.ravel_multi_index(d.indices, info.tensors[p].shape)
        assert (np.diff(flat) > 0).all()  # row-major sorted, unique
    a.save(tmp_path / "grown.safetensors")
    x = dom.x_test[:50]
    with Runtime(path) as rt:
        rt.load_adapter(load_adapter(tmp_path / "grown.safetensors"))
        base = rt.run({"pixels": x})["logits"]
        rt.switch("grown")
        got = rt.run({"pixels": x})["logits"]
        rt.wait_settled(30)
    np.testing.assert_allclose(got, tr.logits(x, a), atol=1e-4)
    np.testing.assert_allclose(base, tr.logits(x), atol=1e-4)
    assert np.abs(got - base).max() > 0.1  # the adapter does change the model


def test_training_improves_a_shifted_domain(digits):
    """Measured on this model: base 0.05 on invert; from 256 samples head@0.5 reaches 0.44, last-mlp@0.5 0.57."""
    path, _, dom = digits
    x, y = dom.x_train[:256], dom.y_train[:256]
    with Runtime(path) as rt:
        base = accuracy(rt.run({"pixels": dom.x_test})["logits"], dom.y_test)
    tr = DeviceTrainer(path)
    acc = {
        layers: accuracy(tr.logits(dom.x_test, tr.train(Arch("shira", 0.5, layers), x, y, layers)), dom.y_test)
        for layers in ("head", "last-mlp")
    }
    assert acc["head"] > base + 0.3
    assert acc["last-mlp"] > acc["head"] + 0.07


def test_grow_with_torch_blocked(digits, tmp_path):
    path, _, dom = digits
    data = tmp_path / "novel.npz"
    np.savez(data, x=dom.x_train[:256], y=dom.y_train[:256], xt=dom.x_test, yt=dom.y_test)
    code = BLOCK_TORCH + (
        "import json\n"
        "import numpy as np\n"
        "from edge.learn.growth import grow\n"
        "from edge.learn.device_trainer import DEVICE_SPACE, DeviceTrainer\n"
        "from edge.runtime import Runtime\n"
        "model, d = sys.argv[1], np.load(sys.argv[2])\n"
        "with Runtime(model) as rt:\n"
        "    trainer = DeviceTrainer(model, rt.info)\n"
        f"    res = grow(rt, d['x'], d['y'], trainer=trainer, space=DEVICE_SPACE, name='new-1', device={DEVICE!r})\n"
        "    base = float((rt.run({'pixels': d['xt']})['logits'].argmax(1) == d['yt']).mean())\n"
        "    rt.load_adapter(res.adapter)\n"
        "    rt.switch('new-1')\n"
        "    acc = float((rt.run({'pixels': d['xt']})['logits'].argmax(1) == d['yt']).mean())\n"
        "    rt.wait_settled(30)  # no session rebuild in flight at exit\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch was imported'\n"
        "print(json.dumps({'chosen': str(res.chosen.arch), 'base': base, 'acc': acc, **res.adapter.info}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(path), str(data)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["chosen"] in {str(a) for a in DEVICE_SPACE} and out["trainer"] == "device"
    assert out["acc"] > out["base"] + 0.4  # measured: last-mlp@0.5, 0.05 -> 0.57


def test_pickles_for_a_background_job(digits):
    """edge.learn.growth.GrowthJob sends the trainer to a spawned child: it must pickle, session and all."""
    path, _, dom = digits
    x, y = dom.x_train[:32], dom.y_train[:32]
    tr = DeviceTrainer(path, epochs=5)
    tr.activations(x)  # builds the onnxruntime session, which does not pickle
    clone = pickle.loads(pickle.dumps(tr))
    arch = Arch("shira", 0.1, "last-mlp")
    a, b = tr.train(arch, x, y, "a"), clone.train(arch, x, y, "a")
    for p in (FC2, HEAD):
        np.testing.assert_array_equal(a.tensors[p].indices, b.tensors[p].indices)
        np.testing.assert_array_equal(a.tensors[p].values, b.tensors[p].values)


# -- models it cannot train -------------------------------------------------------------------------
def _edit(src: Path, dst: Path, change) -> Path:
    """A copy of ``src`` with its graph changed by ``change(graph)``; initializers (the fingerprint) untouched."""
    model = onnx.load(str(src))
    change(model.graph)
    onnx.save(model, str(dst))
    return dst


def _fc2_as_gemm(graph) -> None:
    """Replace the last fc2's MatMul + bias Add by Reshape [-1, hidden] -> Gemm -> Reshape [-1, 16, dim]."""
    nodes = list(graph.node)
    i = next(k for k, n in enumerate(nodes) if n.op_type == "MatMul" and n.input[1] == FC2)
    mm, add = nodes[i], nodes[i + 1]
    assert add.op_type == "Add" and mm.output[0] in add.input
    bias = next(t for t in add.input if t != mm.output[0])
    shape = {t.name: list(t.dims) for t in graph.initializer}[FC2]  # stored [hidden, dim]

    def const(name: str, values: list[int]):
        value = helper.make_tensor(f"{name}.value", TensorProto.INT64, [len(values)], values)
        return helper.make_node("Constant", [], [name], value=value)

    new = [
        const("g.s1", [-1, shape[0]]),
        helper.make_node("Reshape", [mm.input[0], "g.s1"], ["g.h"]),
        helper.make_node("Gemm", ["g.h", FC2, bias], ["g.y"]),
        const("g.s2", [-1, 16, shape[1]]),
        helper.make_node("Reshape", ["g.y", "g.s2"], [add.output[0]]),
    ]
    del graph.node[:]
    graph.node.extend(nodes[:i] + new + nodes[i + 2 :])


def test_gemm_fc2_gives_the_same_gradients(digits, tmp_path):
    path, _, dom = digits
    gemm = _edit(path, tmp_path / "gemm.onnx", _fc2_as_gemm)
    x, y = dom.x_train[:16], dom.y_train[:16]
    want, got = DeviceTrainer(path).loss_and_grads(x, y), DeviceTrainer(gemm).loss_and_grads(x, y)
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    for p in (FC2, HEAD):
        np.testing.assert_allclose(got[1][p], want[1][p], rtol=1e-4, atol=1e-7)


def test_refuses_what_it_cannot_train(digits, tmp_path):
    path, _, dom = digits
    x, y = dom.x_train[:16], dom.y_train[:16]
    tr = DeviceTrainer(path)
    with pytest.raises(ConfigError, match=r"integers in \[0, 10\)"):
        tr.train(Arch("shira", 0.1, "head"), x, np.full(16, 10), "a")
    with pytest.raises(ConfigError, match="non-empty"):
        tr.train(Arch("shira", 0.1, "head"), x[:0], y[:0], "a")
    with pytest.raises(ConfigError, match="one label per input"):
        tr.train(Arch("shira", 0.1, "head"), x, y[:3], "a")
    with pytest.raises(ConfigError, match="adapts only"):
        tr.train(Arch("shira", 0.1, "attn"), x, y, "a")
    with pytest.raises(ConfigError, match="rejected inputs"):
        tr.train(Arch("shira", 0.1, "head"), np.zeros((16, 3), np.float32), y, "a")

    make_mlp(tmp_path / "mlp.onnx")  # fc1 -> Relu -> fc2 (Gemm): a tail, but no 'head' or 'last-mlp' by name
    assert DeviceTrainer(tmp_path / "mlp.onnx").params == ("fc1.weight", "fc2.weight")
    with pytest.raises(ConfigError, match="selects no tensor"):
        DeviceTrainer(tmp_path / "mlp.onnx").train(
            Arch("shira", 0.1, "head"), np.zeros((4, 10), np.float32), y[:4], "a"
        )

    def max_pool(graph):
        next(n for n in graph.node if n.op_type == "ReduceMean").op_type = "ReduceMax"

    maxed = DeviceTrainer(_edit(path, tmp_path / "max.onnx", max_pool))  # the head trains; not through a max
    assert maxed.params == (HEAD,)
    maxed.train(Arch("shira", 0.1, "head"), x, y, "a")
    with pytest.raises(ConfigError, match=r"adapts only \['head.weight'\].*stopped at ReduceMax"):
        maxed.train(Arch("shira", 0.1, "last-mlp"), x, y, "a")


# -- the tail of any model, found from the graph ------------------------------------------------------
B_T, D = 3, 5  # tokens (or a 2 x 2 map's... see tail_model), channels


def tail_model(path: Path, case: str, seed: int = 0) -> tuple[ModelInfo, np.ndarray]:
    """A tiny graph ``pre -> last linear -> <case ops> -> classifier -> logits`` and inputs for it."""
    rng = np.random.default_rng(seed)
    four_d = case in ("conv-bn", "gap")
    w = {
        "last.weight": rng.standard_normal((D, D, 1, 1) if four_d else (D, D)) * 0.6,  # [out, in]
        "last.bias": rng.standard_normal(D) * 0.2,
        "head.weight": rng.standard_normal((CLS, D * B_T if case == "reshape" else D)) * 0.7,
        "head.bias": rng.standard_normal(CLS) * 0.1,
        "g": 1.0 + 0.2 * rng.standard_normal(D),
        "b": 0.1 * rng.standard_normal(D),
        "mean": 0.1 * rng.standard_normal(D),
        "var": 0.5 + rng.uniform(0, 1, D),
    }
    transposed = not four_d  # MatMul reads the [in, out] transpose
    stored = {k: (v.T.copy() if k == "last.weight" and transposed else v).astype(np.float32) for k, v in w.items()}
    if case == "gemm-plain":  # a Gemm without transB reads [in, out]
        stored["head.weight"] = w["head.weight"].T.copy().astype(np.float32)
    n = helper.make_node

    def const(name, values):
        return n(
            "Constant", [], [name], value=helper.make_tensor(name + ".v", TensorProto.INT64, [len(values)], values)
        )

    nodes = [n("Relu", ["x"], ["h"])]  # the tail's input (read twice when it is also the skip)
    if four_d:
        nodes += [n("Conv", ["h", "last.weight", "last.bias"], ["z"])]
    else:
        nodes += [n("MatMul", ["h", "last.weight"], ["z0"]), n("Add", ["z0", "last.bias"], ["z"])]
    mean = [const("ax1", [1]), n("ReduceMean", ["a", "ax1"], ["f"], keepdims=0)]
    body = {
        "relu": [n("Relu", ["z"], ["a"]), *mean],
        "gelu": [n("Gelu", ["z"], ["a"]), *mean],
        "gelu-tanh": [n("Gelu", ["z"], ["a"], approximate="tanh"), *mean],
        "layernorm": [n("LayerNormalization", ["z", "g", "b"], ["a"], axis=-1, epsilon=1e-3), *mean],
        "residual": [n("Add", ["h", "z"], ["a"]), *mean],
        "mean-keepdims": [
            n("Relu", ["z"], ["a"]),
            const("ax", [1]),
            n("ReduceMean", ["a", "ax"], ["m"], keepdims=1),
            n("Squeeze", ["m", "ax"], ["f"]),
        ],
        "reshape": [n("Relu", ["z"], ["a"]), const("shape", [0, -1]), n("Reshape", ["a", "shape"], ["f"])],
        "gemm-plain": [n("Identity", ["z"], ["a"]), *mean],
        "conv-bn": [
            n("BatchNormalization", ["z", "g", "b", "mean", "var"], ["bn"], epsilon=1e-3),
            n("Relu", ["bn"], ["r"]),
            n("GlobalAveragePool", ["r"], ["p"]),
            n("Flatten", ["p"], ["f"]),
        ],
        "gap": [n("Relu", ["z"], ["r"]), n("GlobalAveragePool", ["r"], ["p"]), n("Flatten", ["p"], ["f"])],
        "sigmoid": [n("Sigmoid", ["z"], ["a"]), *mean],
    }[case]
    head = (
        n("Gemm", ["f", "head.weight", "head.bias"], ["logits"])
        if case == "gemm-plain"
        else n("Gemm", ["f", "head.weight", "head.bias"], ["logits"], transB=1)
    )
    shape = ["batch", D, 2, 2] if four_d else ["batch", B_T, D]
    graph = helper.make_graph(
        [*nodes, *body, head],
        f"tail-{case}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLS])],
        [numpy_helper.from_array(v, k) for k, v in stored.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    tensors = {
        "last.weight": TensorInfo("last.weight", w["last.weight"].shape, transposed=transposed),
        "head.weight": TensorInfo("head.weight", w["head.weight"].shape, transposed=case == "gemm-plain"),
    }
    info = ModelInfo(f"tail-{case}", fingerprint(stored), tensors, inputs=("x",), outputs=("logits",))
    helper.set_model_props(model, {META_KEY: info.to_json()})
    onnx.save(model, str(path))
    x = rng.standard_normal((24, *([D, 2, 2] if four_d else [B_T, D]))).astype(np.float32)
    return info, x


CLS = 3
CASES = [
    "relu",
    "gelu",
    "gelu-tanh",
    "layernorm",
    "residual",
    "mean-keepdims",
    "reshape",
    "gemm-plain",
    "conv-bn",
    "gap",
]


@pytest.mark.parametrize("case", CASES)
def test_tail_gradients_match_finite_differences_per_op(tmp_path, case):
    _, x = tail_model(tmp_path / "m.onnx", case)
    tr = DeviceTrainer(tmp_path / "m.onnx")
    assert tr.params == ("last.weight", "head.weight")
    y = np.arange(len(x)) % CLS
    rng = np.random.default_rng(1)
    at = {p: w + 0.05 * rng.standard_normal(w.shape) for p, w in tr.base_weights().items()}
    _, grads = tr.loss_and_grads(x, y, at)
    eps = 1e-6
    for p, w in at.items():
        assert grads[p].shape == w.shape
        for flat in rng.choice(w.size, 6, replace=False):
            i = np.unravel_index(flat, w.shape)
            plus, minus = {**at, p: w.copy()}, {**at, p: w.copy()}
            plus[p][i] += eps
            minus[p][i] -= eps
            fd = (tr.loss_and_grads(x, y, plus)[0] - tr.loss_and_grads(x, y, minus)[0]) / (2 * eps)
            assert grads[p][i] == pytest.approx(fd, rel=1e-4, abs=1e-8), (p, i)


def test_an_op_outside_the_set_is_named(tmp_path):
    tail_model(tmp_path / "m.onnx", "sigmoid")
    tr = DeviceTrainer(tmp_path / "m.onnx")
    assert tr.params == ("head.weight",) and LAYER_SETS.get("tail")(["last.weight", "head.weight"]) == []
    x = np.zeros((4, B_T, D), np.float32)
    with pytest.raises(ConfigError, match="stopped at Sigmoid"):
        tr.saliency(x, np.zeros(4, np.int64), ["last.weight"])


def test_tail_layer_sets_and_adapter_on_a_cnn(tmp_path):
    """A 1x1 conv before the classifier: its adapter indices are 4-D, and the runtime agrees with the trainer."""
    from test_taps import images, make_cnn

    info = make_cnn(tmp_path / "cnn.onnx", residual=True)
    tr = DeviceTrainer(tmp_path / "cnn.onnx", epochs=30)
    assert tr.params == ("proj.weight", "head.weight")
    assert Arch("shira", 0.1, "tail").targets(info) == ["proj.weight", "head.weight"]
    assert Arch("shira", 0.1, "tail-head").targets(info) == ["head.weight"]
    assert len(TAIL_SPACE) == 10 and {a.layers for a in TAIL_SPACE} == {"tail", "tail-head"}
    x, y = images(1, 96, seed=0)
    a = tr.train(Arch("shira", 0.5, "tail"), x, y, "grown")
    assert a.tensors["proj.weight"].indices.shape == (4, 32) and not a.tensors["proj.weight"].indices[2:].any()
    xt, yt = images(1, 64, seed=1)
    with Runtime(tmp_path / "cnn.onnx") as rt:
        rt.load_adapter(a)
        base = rt.run({"x": xt})["logits"]
        rt.switch("grown")
        got = rt.run({"x": xt})["logits"]
        rt.wait_settled(30)
    np.testing.assert_allclose(got, tr.logits(xt, a), atol=1e-4)
    np.testing.assert_allclose(base, tr.logits(xt), atol=1e-4)
    assert accuracy(got, yt) > accuracy(base, yt) + 0.2
