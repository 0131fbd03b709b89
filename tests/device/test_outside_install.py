"""Outside audit of the device side as a small device installs it (helper D): the wheel, memory budgets, `edge profile`.

What the other device tests do not cover: the wheel carries every module and profile (built from a copy of
the tree, no network); a model file larger than the profile's memory budget, or of another precision than the
profile's, is refused before its weights are read (they were read whole, 88 MB for MiniLM, before the refusal);
`edge profile` runs the strategy the budget picks on the device and does not read the model a second time to
make its inputs (that doubled MiniLM's peak memory); ONNX files exported elsewhere (dynamic batch, a Conv net,
int64 ids, two inputs), made adapter-ready by `edge import-onnx`, profile with sane, stable figures. The
fresh-venv install from PyPI is ``slow`` (network, about a minute).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from _blocking import BLOCK_TORCH, ROOT
from onnx import TensorProto, helper, numpy_helper

import edge
from edge.cli import main
from edge.errors import ConfigError
from edge.profiling import ProfileConfig, format_markdown, profile_model

GOLDEN = ROOT / "tests" / "golden"
MODEL = GOLDEN / "tiny-mlp-v1.onnx"
ADAPTER = GOLDEN / "adapter-v1.safetensors"
FAST = ProfileConfig(runs=9, warmup=2, switches=2, progress=False, engine_rounds=0)

#: the JSON a profile writes: a user's script reads these keys (format edge.profiling, version 1)
SCHEMA = {
    "format", "version", "model", "device", "machine", "load_avg", "backend", "runtime", "strategy", "threads",
    "providers_requested", "providers", "inputs", "load_ms", "first_inference_ms", "latency_ms", "adapters",
    "switch_p95_ms", "memory", "accuracy", "engines", "budgets", "dims",
}  # fmt: skip
STATS = {"n", "p50", "p95", "p99", "mean", "min", "max", "samples", "warmup"}


def device_file(folder: Path, name: str, **changes) -> Path:
    data = yaml.safe_load((ROOT / "devices" / "x86-dev.yaml").read_text())
    data.update(name=name, **changes)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def budgets(memory_mb: float) -> dict:
    return {"memory_mb": memory_mb, "load_ms": 5000.0, "latency_p95_ms": 20.0, "switch_p95_ms": 5.0}


# -- the wheel ---------------------------------------------------------------------------------------------------------
def test_the_wheel_carries_every_module_and_every_device_profile(tmp_path):
    """`[tool.setuptools] packages` is a list: a new subpackage left off it would install without its modules."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    for top in ("edge", "runtimes", "exporters", "lab", "devices"):
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."]
    r = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(src).as_posix() for t in ("edge", "runtimes") for p in (src / t).rglob("*.py")}
    assert modules and not modules - names, sorted(modules - names)
    profiles = {f"edge/devices/profiles/{p.name}" for p in (ROOT / "devices").glob("*.yaml")}
    assert len(profiles) >= 6 and not profiles - names, sorted(profiles - names)


def test_a_device_without_the_fleet_extra_is_told_the_device_extra(monkeypatch):
    """`edge sync` on a device install said `pip install 'edge-adapt[fleet]'`, which pulls the host publisher (oras);
    the README's device extra is `fleet-device`."""
    import importlib.util

    from edge.fleet.oci import require_fleet

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tuf" else real(name, *a))
    with pytest.raises(ConfigError, match=re.escape("fleet sync needs tuf: pip install 'edge-adapt[fleet-device]'")):
        require_fleet()
    with pytest.raises(ConfigError, match=re.escape("pip install 'edge-adapt[fleet]'")):
        require_fleet(host=True)


# -- a model file over the memory budget: refused before it is read -----------------------------------------------
def test_a_model_file_over_the_budget_is_refused_before_any_engine_reads_it(tmp_path, monkeypatch, capsys):
    import edge.engine_cache
    import edge.runtime

    def read(*a, **k):
        raise AssertionError("the model was read before the budget refused it")

    monkeypatch.setattr(edge.runtime, "cached_engine", read)
    monkeypatch.setattr(edge.engine_cache, "cached_engine", read)
    kib = MODEL.stat().st_size / 2**10
    device = device_file(tmp_path, "watch", budgets=budgets(kib / 2 / 1024))  # half the file's size
    for call in (lambda: edge.Runtime(MODEL, device=device), lambda: profile_model(MODEL, device, config=FAST)):
        with pytest.raises(ConfigError) as e:
            call()
        for words in ("tiny-mlp-v1.onnx is", "MB on disk", "budgets.memory_mb", "'watch'", "smaller or quantized"):
            assert words in str(e.value), str(e.value)
    assert main(["profile", str(MODEL), "--device", str(device), "-q"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "MB on disk" in err
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="MB on disk"):  # a pinned strategy is refused as well, before the read
        edge.Runtime(MODEL, device=device, strategy="bound")
    with edge.Runtime(MODEL, device=device, strategy="bound", enforce_memory_budget=False) as rt:
        assert rt.strategy == "bound"


ONLY_INT8 = [{"backend": "onnxruntime", "precision": "int8", "providers": ["CPUExecutionProvider"]}]


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"budgets": budgets(32.0)}, "MB on disk, over the memory budget of 32 MB"),  # MiniLM grew 123 MB before
        ({"backends": ONLY_INT8}, "runs int8 models, but 'large-mlp' is fp32"),  # MiniLM grew 122 MB before
    ],
)
def test_a_large_model_the_device_refuses_leaves_the_memory_as_it_was(tmp_path, large_fp32_onnx, changes, words):
    """92 MB of float weights (MiniLM's export is 88 MB) on a board whose budget or precision refuses them: refused
    before its weights are read."""
    assert large_fp32_onnx.stat().st_size > 88 * 2**20
    device = device_file(tmp_path, "zero2", **changes)
    code = BLOCK_TORCH + (
        "import edge\nfrom edge.machine import peak_rss_mb\nbefore = peak_rss_mb()\n"
        "try:\n    edge.Runtime(sys.argv[1], device=sys.argv[2])\nexcept edge.ConfigError as e:\n"
        "    print(peak_rss_mb() - before, e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(large_fp32_onnx), str(device)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    grown, message = r.stdout.split(" ", 1)
    assert words in message, message
    assert float(grown) < 60, r.stdout  # onnx and the graph; the weights (92 MB) stay on disk


# -- edge profile measures what the device runs, and only that -----------------------------------------------------
def test_profile_inputs_come_from_the_graph_the_runtime_read(monkeypatch):
    """The profile parsed the whole model file (weights included) again to make its inputs: MiniLM's peak resident
    memory read 380 MB where the runtime peaks at 219 MB."""
    import edge.format.feeds

    real = edge.format.feeds.onnx_input_specs

    def specs(model, names=None):
        assert isinstance(model, onnx.ModelProto), "the model file was read again to generate inputs"
        return real(model, names)

    monkeypatch.setattr(edge.format.feeds, "onnx_input_specs", specs)
    r = profile_model(MODEL, "x86-dev", backend="onnxruntime", config=FAST)
    assert r["inputs"] == {"x": {"shape": [1, 10], "dtype": "float32", "source": "generated"}}


def test_threads_over_this_machines_cores_are_said(tmp_path):
    cores = os.cpu_count() or 1
    if cores >= 256:
        pytest.skip("a profile's threads go up to 256")
    device = device_file(tmp_path, "many", threads=cores + 1)
    r = profile_model(MODEL, device, config=FAST)
    assert f"runs {cores + 1} threads on {cores} cores here" in format_markdown(r)
    r = profile_model(MODEL, device_file(tmp_path / "one", "one", threads=1), config=FAST)
    assert "cores here" not in format_markdown(r)


def test_a_provider_fallback_is_logged_once_by_a_profile(tmp_path, caplog):
    """`edge profile` on a `fallback: cpu` board said the missing provider twice (the runtime, then the report)."""
    import logging

    gpu = [{"backend": "onnxruntime", "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}]
    device = device_file(tmp_path, "jetson", backends=gpu, fallback="cpu")
    with caplog.at_level(logging.WARNING, logger="edge.devices"):
        r = profile_model(MODEL, device, config=FAST)
    if r["device"]["fallback_warning"] is None:
        pytest.skip("this machine has CUDAExecutionProvider")
    said = [m for m in caplog.messages if "CUDAExecutionProvider" in m]
    assert len(said) == 1, said
    assert r["providers"] == ["CPUExecutionProvider"] and "fallback: cpu" in r["device"]["fallback_warning"]


# -- models exported elsewhere ---------------------------------------------------------------------------------------
def _init(rng, name, *shape, scale=0.3):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _foreign(path: Path, kind: str) -> Path:
    """An ONNX file as another exporter writes it (no edge metadata; a symbolic batch)."""
    rng = np.random.default_rng(1)
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    if kind == "cnn":
        inits = [_init(rng, "conv.weight", 8, 3, 3, 3), _init(rng, "conv.bias", 8), _init(rng, "fc.weight", 5, 8)]
        nodes = [
            helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["g"]),
            helper.make_node("Flatten", ["g"], ["h"]),
            helper.make_node("Gemm", ["h", "fc.weight"], ["y"], transB=1),
        ]
        inputs = [helper.make_tensor_value_info("x", f, ["batch", 3, 12, 12])]
    elif kind == "mlp":
        inits = [_init(rng, "a.weight", 16, 32), _init(rng, "a.bias", 32), _init(rng, "b.weight", 4, 32)]
        nodes = [
            helper.make_node("MatMul", ["x", "a.weight"], ["m"]),
            helper.make_node("Add", ["m", "a.bias"], ["h0"]),
            helper.make_node("Relu", ["h0"], ["h"]),
            helper.make_node("Gemm", ["h", "b.weight"], ["y"], transB=1),
        ]
        inputs = [helper.make_tensor_value_info("x", f, ["batch", 16])]
    elif kind == "ids":  # int64 token ids into an embedding table
        inits = [_init(rng, "emb.weight", 50, 8), _init(rng, "fc.weight", 3, 8)]
        nodes = [
            helper.make_node("Gather", ["emb.weight", "ids"], ["e"]),
            helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
            helper.make_node("Gemm", ["m", "fc.weight"], ["y"], transB=1),
        ]
        inputs = [helper.make_tensor_value_info("ids", i64, ["batch", 7])]
    else:  # two inputs
        inits = [_init(rng, "a.weight", 6, 10), _init(rng, "b.weight", 4, 10), _init(rng, "c.weight", 2, 10)]
        nodes = [
            helper.make_node("MatMul", ["x", "a.weight"], ["ha"]),
            helper.make_node("MatMul", ["z", "b.weight"], ["hb"]),
            helper.make_node("Add", ["ha", "hb"], ["h0"]),
            helper.make_node("Tanh", ["h0"], ["h"]),
            helper.make_node("Gemm", ["h", "c.weight"], ["y"], transB=1),
        ]
        inputs = [helper.make_tensor_value_info(n, f, ["batch", k]) for n, k in (("x", 6), ("z", 4))]
    out = [helper.make_tensor_value_info("y", f, None)]
    graph = helper.make_graph(nodes, "main_graph", inputs, out, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("foreign")
    ready = {}
    for kind in ("cnn", "mlp", "ids", "two"):
        raw = _foreign(folder / f"{kind}-raw.onnx", kind)
        with pytest.raises(edge.EdgeError, match="edge import-onnx"):  # as exported: said what to do
            edge.Runtime(raw)
        ready[kind] = folder / f"{kind}.onnx"
        assert main(["import-onnx", str(raw), "--out", str(ready[kind])]) == 0
    return ready


@pytest.mark.parametrize("kind", ["cnn", "mlp", "ids", "two"])
@pytest.mark.parametrize("batch", [1, 3])
def test_profile_of_a_model_exported_elsewhere_is_sane(foreign, kind, batch, capsys):
    path = foreign[kind]
    r = profile_model(path, "x86-dev", config=ProfileConfig(**{**FAST.__dict__, "batch": batch}))
    capsys.readouterr()
    assert set(r) == SCHEMA and set(r["latency_ms"]) == STATS and (r["format"], r["version"]) == ("edge.profiling", 1)
    lat = r["latency_ms"]
    assert lat["n"] == FAST.runs and 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert r["load_ms"] > 0 and r["first_inference_ms"] > 0
    assert 0 < r["memory"]["rss_before_load_mb"] <= r["memory"]["peak_rss_mb"]
    assert r["model"]["bytes"] == path.stat().st_size and r["model"]["fingerprint"].startswith("sha256:")
    want = {"cnn": {"x": [batch, 3, 12, 12]}, "mlp": {"x": [batch, 16]}, "ids": {"ids": [batch, 7]}}
    want["two"] = {"x": [batch, 6], "z": [batch, 4]}
    assert {k: v["shape"] for k, v in r["inputs"].items()} == want[kind]
    assert {v["dtype"] for v in r["inputs"].values()} == {"int64" if kind == "ids" else "float32"}
    assert r["adapters"] == [] and r["switch_p95_ms"] is None and r["budgets"]["memory_mb"]["ok"] is True


# -- the install itself (network) --------------------------------------------------------------------------------------
DEVICE_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
import edge
golden = Path(sys.argv[1])
with edge.Runtime(golden / "tiny-mlp-v1.onnx", device="rpi5") as rt:
    rt.load_adapter(golden / "adapter-v1.safetensors")
    x = np.ones((2, 10), np.float32)
    base = rt.run({"x": x})["logits"]
    rt.switch("golden-a"); rt.switch({"golden-a": 0.5}); rt.switch(None); rt.wait_settled(30)
    assert np.array_equal(rt.run({"x": x})["logits"], base)
host = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "exporters", "lab", "sklearn", "transformers"})
print("ok", host)
"""


@pytest.mark.slow
def test_a_fresh_venv_installs_the_device_side_from_pypi_and_runs_it(tmp_path):
    """`pip install .` with no extras (no torch), then the README's device commands from outside the tree."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, cli = venv / "bin" / "python", venv / "bin" / "edge"
    r = subprocess.run([py, "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert subprocess.run([py, "-c", "import torch"], capture_output=True).returncode != 0
    runs = [
        [cli, "--help"],
        [cli, "devices"],
        [cli, "inspect", GOLDEN / "tiny-mlp-v1.onnx"],
        [cli, "inspect", GOLDEN / "tiny-mlp-v1.tflite"],
        [cli, "profile", MODEL, "--device", "rpi4", "--adapters", ADAPTER, "--runs", "5", "-q"],
        [cli, "sync", "--help"],
        [py, "-c", DEVICE_SCRIPT, GOLDEN],
    ]
    env = {**os.environ, "EDGE_ENGINE_CACHE": str(tmp_path / "engines")}
    for cmd in runs:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
    assert r.stdout.strip() == "ok []", r.stdout
    r = subprocess.run([cli, "demo", "-q"], capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert r.returncode == 2 and "edge-adapt[host]" in r.stderr and len(r.stderr.splitlines()) == 1
    sync = [cli, "sync", "reg.example.com/edge/a", "--adapters", tmp_path / "a", "--model", MODEL, "--tuf-root", MODEL]
    r = subprocess.run(sync, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert r.returncode == 2 and "edge-adapt[fleet-device]" in r.stderr and len(r.stderr.splitlines()) == 1
