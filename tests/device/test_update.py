"""On-device updates (edge.learn.update): every method learns, grows, persists and stays in budget; no torch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from _blocking import BLOCK_TORCH
from onnx import TensorProto, helper, numpy_helper

from edge.errors import AdapterMismatchError, ConfigError, FormatError, RegistryError
from edge.format.adapter import load_adapter
from edge.format.modelinfo import META_KEY, ModelInfo, TensorInfo, fingerprint
from edge.learn.update import METHODS, Updater, load_samples, update
from edge.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
TESTED = {"ncm", "slda", "ranpac", "shira-head"}
OPTIONS = {"ranpac": {"features": 128}, "shira-head": {"density": 1.0, "steps": 200, "lr": 0.05}}
D_IN, D_FEAT, CLASSES = 8, 16, 10


def make_encoder(path: Path, seed: int = 0) -> ModelInfo:
    """x[B,8] -> Linear+ReLU -> features[B,16] -> head Linear(16,10) -> logits[B,10] (numpy + onnx only)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((D_FEAT, D_IN)).astype(np.float32) * 0.7
    b1 = np.full(D_FEAT, 0.2, np.float32)
    head = rng.standard_normal((CLASSES, D_FEAT)).astype(np.float32) * 0.3
    hb = rng.standard_normal(CLASSES).astype(np.float32) * 0.1
    stored = {"fc1.weight": w1.T.copy(), "fc1.bias": b1, "head.weight": head, "head.bias": hb}
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"]),
        helper.make_node("Add", ["h0", "fc1.bias"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["features"]),
        helper.make_node("Gemm", ["features", "head.weight", "head.bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D_IN])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", D_FEAT]),
        ],
        [numpy_helper.from_array(v, k) for k, v in stored.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    info = ModelInfo(
        name=f"tiny-encoder-{seed}",
        fingerprint=fingerprint(stored),
        tensors={
            "fc1.weight": TensorInfo("fc1.weight", (D_FEAT, D_IN), transposed=True),
            "head.weight": TensorInfo("head.weight", (CLASSES, D_FEAT)),
        },
        inputs=("x",),
        outputs=("logits", "features"),
    )
    helper.set_model_props(model, {META_KEY: info.to_json()})
    onnx.save(model, str(path))
    return info


CENTRES = np.random.default_rng(42).standard_normal((CLASSES, D_IN)).astype(np.float32) * 2.0


def blobs(n_per_class: int, seed: int, classes=range(CLASSES), shift: float = 0.0):
    """Labelled gaussian blobs around fixed class centres; ``shift`` moves a whole domain."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.asarray(list(classes)), n_per_class)
    x = CENTRES[y] + 0.35 * rng.standard_normal((len(y), D_IN)).astype(np.float32) + shift
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("update") / "encoder.onnx"
    make_encoder(path)
    return path


@pytest.fixture
def rt(model):
    with Runtime(model, strategy="bound") as r:
        yield r


def test_every_method_is_tested():
    assert set(METHODS.names()) == TESTED, "add the new update method to TESTED (and OPTIONS if it needs any)"


@pytest.mark.parametrize("method", sorted(TESTED))
def test_learns_and_reports(rt, method):
    x, y = blobs(10, seed=1)
    xt, yt = blobs(30, seed=2)
    up = Updater(rt, method, **OPTIONS.get(method, {}))
    r = up.partial_fit(x, y)
    acc = float((up.predict(xt) == yt).mean())
    assert acc >= 0.9, acc
    assert (r.method, r.samples, r.samples_seen, r.classes) == (method, 100, 100, tuple(range(CLASSES)))
    assert 0 < r.peak_extra_mb <= r.budget_mb and r.estimate_mb <= r.budget_mb
    assert r.seconds >= r.encoder_seconds > 0


@pytest.mark.parametrize("method", ["ncm", "slda", "ranpac"])
def test_class_incremental(rt, method):
    """Classes 0-4 first, then 5-9: the new classes are learned, the old ones kept."""
    up = Updater(rt, method, **OPTIONS.get(method, {}))
    up.partial_fit(*blobs(10, seed=1, classes=range(5)))
    assert up.classes == (0, 1, 2, 3, 4)
    assert set(up.predict(blobs(5, seed=3)[0])) <= set(range(5))  # unseen classes are never predicted
    up.partial_fit(*blobs(10, seed=4, classes=range(5, 10)))
    assert up.classes == tuple(range(10))
    xt, yt = blobs(30, seed=2)
    pred = up.predict(xt)
    old, new = yt < 5, yt >= 5
    assert (pred[old] == yt[old]).mean() >= 0.85 and (pred[new] == yt[new]).mean() >= 0.85


@pytest.mark.parametrize("method", ["ncm", "slda"])
def test_statistics_do_not_depend_on_how_samples_are_split(rt, method):
    x, y = blobs(10, seed=1)
    one = Updater(rt, method)
    one.partial_fit(x, y)
    two = Updater(rt, method)
    two.partial_fit(x[::2], y[::2])
    two.partial_fit(x[1::2], y[1::2])
    for k, v in one.method.tensors.items():
        np.testing.assert_allclose(two.method.tensors[k], v, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("method", sorted(TESTED))
@pytest.mark.parametrize("named", [False, True], ids=["pooled", "named"])
def test_domain_incremental_keeps_earlier_domain(rt, method, named):
    """Domain A then a shifted domain B: B is learned and A stays well above chance."""
    up = Updater(rt, method, **OPTIONS.get(method, {}))
    up.partial_fit(*blobs(10, seed=1), domain="a" if named else None)
    up.partial_fit(*blobs(10, seed=5, shift=1.0), domain="b" if named else None)
    assert up.classes == tuple(range(CLASSES))
    if up.method.per_domain:
        assert up.domains == (("a", "b") if named else ("",))
        assert len(up.prototypes) == (2 if named else 1) * CLASSES
    for shift in (0.0, 1.0):
        xt, yt = blobs(20, seed=6, shift=shift)
        assert (up.predict(xt) == yt).mean() >= 0.7


@pytest.mark.parametrize("method", ["ncm", "slda", "ranpac"])
def test_named_domains_keep_a_far_domain(rt, model, tmp_path, method):
    """A far-shifted domain B: per-domain prototypes keep both domains, and survive save/load."""
    up = Updater(rt, method, **OPTIONS.get(method, {}))
    up.partial_fit(*blobs(10, seed=1), domain="a")
    up.partial_fit(*blobs(10, seed=5, shift=2.5), domain="b")
    up.save(tmp_path / "s.safetensors")
    back = Updater.load(tmp_path / "s.safetensors", rt)
    assert back.prototypes == up.prototypes and back.domains == ("a", "b")
    for shift in (0.0, 2.5):
        xt, yt = blobs(20, seed=6, shift=shift)
        assert (back.predict(xt) == yt).mean() >= 0.9


@pytest.mark.parametrize("method", sorted(TESTED))
def test_save_load_round_trip(rt, model, tmp_path, method):
    x, y = blobs(10, seed=1)
    xt, _ = blobs(10, seed=2)
    up = Updater(rt, method, **OPTIONS.get(method, {}))
    up.partial_fit(x, y)
    up.save(tmp_path / "s.safetensors")
    back = Updater.load(tmp_path / "s.safetensors", rt)
    assert (back.method_name, back.samples_seen, back.method.config) == (method, 100, up.method.config)
    np.testing.assert_array_equal(back.scores(xt), up.scores(xt))
    back.partial_fit(x, y)  # and it continues
    assert back.samples_seen == 200
    other = tmp_path / "other.onnx"
    make_encoder(other, seed=1)
    with Runtime(other, strategy="bound") as rt2, pytest.raises(AdapterMismatchError, match="belongs to model"):
        Updater.load(tmp_path / "s.safetensors", rt2)


def test_shira_head_is_a_fusable_adapter(rt, tmp_path):
    """The learned entries, saved as a SHiRA adapter and switched in, give the updater's own scores."""
    x, y = blobs(10, seed=1)
    xt, yt = blobs(20, seed=2)
    base_acc = float((rt.run(xt)["logits"].argmax(1) == yt).mean())
    up = Updater(rt, "shira-head", density=0.5, steps=200, lr=0.05)
    up.partial_fit(x, y)
    a = up.to_adapter("learned")
    assert (
        set(a.tensors) == {"head.weight"}
        and a.nnz == CLASSES * D_FEAT // 2
        and a.base_fingerprint == rt.info.fingerprint
    )
    a.save(tmp_path / "learned.safetensors")
    rt.load_adapter(tmp_path / "learned.safetensors")
    rt.switch("learned")
    fused = rt.run(xt)["logits"]
    np.testing.assert_allclose(fused, up.method.scores(rt.run(xt)["features"]), rtol=1e-5, atol=1e-5)
    assert float((fused.argmax(1) == yt).mean()) > base_acc + 0.2
    with pytest.raises(ConfigError, match="already change 'head.weight'"):
        Updater(rt, "shira-head")  # the head is adapted now: deltas would be against the wrong base
    rt.switch(None)


def test_memory_budget_is_checked_before_and_after(rt, monkeypatch):
    x, y = blobs(10, seed=1)
    with pytest.raises(
        ConfigError, match=r"takes 128.2 MB, over the memory budget of 64 MB; lower ranpac features \(M=4096\) to 1024"
    ):
        Updater(rt, "ranpac", features=4096)  # refused before the state is allocated
    with pytest.raises(ConfigError, match=r"update of 100 samples needs about .* over the memory budget of 20 MB"):
        Updater(rt, "ranpac", features=1024, memory_mb=20).partial_fit(x, y)
    up = Updater(rt, "ranpac", features=128, memory_mb=0.3)
    monkeypatch.setattr(type(up.method), "estimate_bytes", lambda self, n, classes: 0)  # a wrong estimate
    with pytest.raises(
        ConfigError, match=r"at its peak, over the budget of 0.3 MB \(estimated 0\.0\d+ MB\); nothing was changed"
    ):
        up.partial_fit(x, y)
    assert up.samples_seen == 0 and not up.method.counts.any() and up.history == []


def test_a_small_estimate_is_not_printed_as_zero(rt):
    x, y = blobs(10, seed=1)
    with pytest.raises(ConfigError, match=r"needs about 0\.0*[1-9][0-9]* MB, over the memory budget of 1e-05 MB") as e:
        Updater(rt, "ncm", memory_mb=1e-5).partial_fit(x, y)
    assert "about 0.0 MB" not in str(e.value)


BAD = [
    ("unknown option", dict(method="slda", bogus=1), ConfigError, r"unknown option\(s\) \['bogus'\].*shrinkage"),
    ("unknown method", dict(method="knn"), RegistryError, "unknown update method 'knn'; known: ncm, ranpac"),
    ("bad shrinkage", dict(method="slda", shrinkage=2.0), ConfigError, r"must be in \[0, 1\]"),
    ("no features output", dict(method="ncm", feature_output="emb"), ConfigError, "has no output 'emb'"),
    ("no such head", dict(method="shira-head", head="fc9.weight"), ConfigError, "cannot rewrite"),
    ("zero budget", dict(method="ncm", memory_mb=0), ConfigError, "memory_mb must be > 0"),
]


@pytest.mark.parametrize("kwargs,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_configuration(rt, kwargs, error, match):
    with pytest.raises(error, match=match):
        Updater(rt, **kwargs)


BAD_LABELS = [
    ("negative", np.full(10, -1), "class indices"),
    ("fractional", np.full(10, 0.5), "integer class indices"),
    ("wrong length", np.zeros(9, np.int64), "one label per sample"),
    ("2-D", np.zeros((10, 1), np.int64), "1-D"),
]


@pytest.mark.parametrize("labels,match", [b[1:] for b in BAD_LABELS], ids=[b[0] for b in BAD_LABELS])
def test_bad_labels(rt, labels, match):
    x, _ = blobs(1, seed=1)
    with pytest.raises(ConfigError, match=match):
        Updater(rt, "slda").partial_fit(x, labels)


def test_shira_head_cannot_add_classes(rt):
    x, y = blobs(2, seed=1)
    with pytest.raises(ConfigError, match="with 10 outputs, but got label 10; use ncm, slda or ranpac"):
        Updater(rt, "shira-head").partial_fit(x, np.where(y == 9, 10, y))


def test_update_function_resumes_and_refuses_another_method(rt, tmp_path):
    state = tmp_path / "s.safetensors"
    x, y = blobs(5, seed=1)
    update(rt, x, y, method="ncm", state=state)
    up, report = update(rt, x, y, method="ncm", state=state)
    assert report.samples_seen == up.samples_seen == 100
    with pytest.raises(ConfigError, match="holds a 'ncm' update, not 'slda'"):
        update(rt, x, y, method="slda", state=state)


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}  # no oversubscription


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = BLOCK_TORCH + "from edge.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD)


def test_cli_update_without_torch(model, tmp_path):
    """`edge update` with torch blocked: a folder of .npz files, resumed state, an adapter file, eval accuracy."""
    data = tmp_path / "data"
    data.mkdir()
    for i, cls in enumerate([range(5), range(5, 10)]):
        x, y = blobs(6, seed=10 + i, classes=cls)
        np.savez(data / f"{i}.npz", x=x, y=y)
    np.savez(tmp_path / "eval.npz", **dict(zip("xy", blobs(10, seed=3))))
    common = ["update", "--model", str(model), "--state", str(tmp_path / "s.safetensors"), "-q", "--threads", "1"]
    r = _cli(*common, "--data", str(data), "--method", "shira-head", "-o", "density=1.0", "-o", "lr=0.05")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [u["samples_seen"] for u in out["updates"]] == [30, 60] and out["budget_mb"] == 64.0
    adapter = tmp_path / "a.safetensors"
    r = _cli(
        *common,
        *("--data", str(data / "0.npz"), "--method", "shira-head"),
        *("--eval", str(tmp_path / "eval.npz"), "--adapter-out", str(adapter)),
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["samples_seen"] == 90 and out["eval_acc"] >= 0.8 and out["adapter"] == str(adapter)
    assert load_adapter(adapter).base_fingerprint == make_encoder(tmp_path / "same.onnx").fingerprint
    r = _cli(*common, "--data", str(data), "--method", "slda")
    assert r.returncode == 2 and "holds a 'shira-head' update, not 'slda'" in r.stderr
    r = _cli(*common[:3], "--state", str(tmp_path / "n.safetensors"), "--data", str(data), "--domain", "cam1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["method"], out["domains"], out["classes"]) == ("slda", ["cam1"], list(range(CLASSES)))


CLI_ERRORS = [
    ("no y", {"x": np.zeros((2, D_IN), np.float32)}, "has no 'y' array"),
    ("no x", {"y": np.zeros(2, np.int64)}, r"lacks the model input\(s\) \['x'\]"),
    ("bad option", None, "must look like KEY=VALUE"),
]


@pytest.mark.parametrize("arrays,match", [c[1:] for c in CLI_ERRORS], ids=[c[0] for c in CLI_ERRORS])
def test_cli_errors_exit_2(model, tmp_path, arrays, match):
    path = tmp_path / "d.npz"
    np.savez(path, **(arrays or dict(zip("xy", blobs(1, seed=1)))))
    extra = ["-o", "shrinkage"] if arrays is None else []
    r = subprocess.run(
        [sys.executable, "-m", "edge.cli", "update", "--model", str(model), "--data", str(path), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ONE_THREAD,
    )
    assert r.returncode == 2 and re.search(match, r.stderr), r.stderr


def test_load_samples_rejects_pickles_and_empty_folders(tmp_path):
    np.savez(tmp_path / "p.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(FormatError, match="holds Python objects"):
        load_samples(tmp_path / "p.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no .npz files"):
        load_samples(tmp_path / "empty")


UPDATE_LOOP = """
import sys
import numpy as np
from edge.runtime import Runtime
from edge.learn.update import Updater
model, path = sys.argv[1], sys.argv[2]
rt = Runtime(model, strategy="bound")
try:
    up = Updater.load(path, rt)
except Exception:
    up = Updater(rt, "ranpac", features=256)
rng = np.random.default_rng(up.samples_seen)
print("ready", flush=True)
while True:
    y = rng.integers(0, 10, 50)
    up.partial_fit((rng.standard_normal((50, 8)) + y[:, None]).astype(np.float32), y)
    up.save(path)
    print("saved", flush=True)
"""


def test_update_killed_mid_write_leaves_previous_state(model, tmp_path):
    """A ranpac update loop (0.5 MB states) killed at random moments: the state always loads and resumes."""
    path = tmp_path / "ranpac.safetensors"
    rng = np.random.default_rng(0)
    seen = 0
    with Runtime(model, strategy="bound") as rt:
        for _ in range(3):
            proc = subprocess.Popen(
                [sys.executable, "-c", BLOCK_TORCH + UPDATE_LOOP, str(model), str(path)],
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env=ONE_THREAD,
            )
            assert proc.stdout.readline().strip() == "ready"
            assert proc.stdout.readline().strip() == "saved"  # kill somewhere in the following saves
            time.sleep(rng.uniform(0.05, 0.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            up = Updater.load(path, rt)  # checksum verified
            assert up.samples_seen % 50 == 0 and up.samples_seen > seen
            assert int(up.method.counts.sum()) == up.samples_seen
            seen = up.samples_seen


API_WITHOUT_TORCH = """
import sys
import numpy as np
from edge.runtime import Runtime
from edge.learn.update import METHODS, Updater
model, folder = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
y = np.repeat(np.arange(10), 5)
x = (rng.standard_normal((50, 8)) + y[:, None]).astype(np.float32)
with Runtime(model) as rt:
    for name in METHODS.names():
        up = Updater(rt, name, **({"features": 64} if name == "ranpac" else {}))
        up.partial_fit(x, y, domain="d1")
        up.save(f"{folder}/{name}.safetensors")
        Updater.load(f"{folder}/{name}.safetensors", rt).predict(x)
        if name == "shira-head":
            rt.load_adapter(up.to_adapter("h"))
            rt.switch("h")
            rt.wait_settled(30)
            rt.run(x)
leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("ok" if not leaked else leaked)
"""


def test_api_without_torch(model, tmp_path):
    """Every method, save/load and the fused head adapter, in a process where importing torch fails."""
    r = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + API_WITHOUT_TORCH, str(model), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ONE_THREAD,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_two_concurrent_cli_updates_of_one_state_lose_nothing(model, tmp_path):
    """Two `edge update --state S` processes at once: they take turns on S.lock, so every sample counts."""
    state = tmp_path / "s.safetensors"
    sizes = []
    for i in range(4):
        x, y = blobs(3 + i, seed=10 + i)
        np.savez(tmp_path / f"d{i}.npz", x=x, y=y)
        sizes.append(len(y))
    code = "from edge.cli import main; import sys; sys.exit(main(sys.argv[1:]))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, "update", "--model", str(model), "--state", str(state)]
            + ["--data", str(tmp_path / f"d{i}.npz"), "--method", "ncm"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=ONE_THREAD,
        )
        for i in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    rt = Runtime(model)
    assert Updater.load(state, rt).samples_seen == sum(sizes)


def test_state_lock_serialises_writers_in_process(model, tmp_path):
    from edge.learn.update import state_lock

    state = tmp_path / "s.safetensors"
    with state_lock(state):
        assert (tmp_path / "s.safetensors.lock").exists()
    with state_lock(None):  # no state file, no lock
        assert not (tmp_path / "None.lock").exists()


def test_nan_state_is_refused(model, tmp_path):
    rt = Runtime(model)
    x, y = blobs(3, seed=1)
    up = Updater(rt, "ncm")
    up.partial_fit(x, y)
    up.method.tensors[next(k for k, v in up.method.tensors.items() if v.dtype.kind == "f")][...] = np.nan
    up.save(tmp_path / "nan.safetensors")
    with pytest.raises(FormatError, match="NaN or Inf"):
        Updater.load(tmp_path / "nan.safetensors", rt)
