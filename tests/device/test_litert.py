"""The LiteRT (tflite) backend: golden converter output, cross-backend equality, file checks, the exporter.

The generic switching tests run on this backend through ``test_runtime.py`` (tiny
models from ``_tiny_tflite``); here: what is specific to LiteRT.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import _tiny
import _tiny_tflite
import numpy as np
import pytest
from _tiny import random_adapter

from edge.errors import BackendUnavailableError, ConfigError, ExportValidationError, FormatError
from edge.format.adapter import Adapter, DenseDelta, SparseDelta, load_adapter
from edge.format.tflite import read_tflite
from edge.runtime import Runtime, merge_weights
from runtimes import get_backend
from runtimes.base import BackendOptions

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
STRATEGIES = get_backend("tflite").STRATEGIES
X = np.random.default_rng(0).standard_normal((7, 10)).astype(np.float32)


def rebased(adapter: Adapter, info) -> Adapter:
    """The same adapter (indices, values) for another export of the same weights.

    Each exported file has its own fingerprint (it hashes the stored tensors, whose
    names and layout differ between ONNX and TFLite).
    """
    return dataclasses.replace(adapter, base_fingerprint=info.fingerprint)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_converted_golden_reproduces_the_onnx_golden_outputs(strategy):
    """tiny-mlp-v1.tflite was converted by litert-torch from the weights of tiny-mlp-v1.onnx (fixed batch 1)."""
    expected = np.load(GOLDEN / "expected-v1.npz")
    with Runtime(GOLDEN / "tiny-mlp-v1.tflite", backend="tflite", strategy=strategy) as rt:
        rt.load_adapter(rebased(load_adapter(GOLDEN / "adapter-v1.safetensors"), rt.info))
        assert rt.backend.runtime == "ai-edge-litert"
        np.testing.assert_allclose(rt.run(expected["x"])["logits"], expected["base"], rtol=1e-5, atol=1e-5)
        rt.switch("golden-a")
        rt.wait_settled(30)
        np.testing.assert_allclose(rt.run(expected["x"])["logits"], expected["adapted"], rtol=1e-5, atol=1e-5)
        assert rt.providers == (["CPU"] if strategy == "builtin" else ["XNNPACK", "CPU"])


SEQUENCES = [["a"], ["a", "b"], [{"a": 1.0, "b": 0.5}], [{"a": 0.3}, "b", {"b": 1.0, "c": -2.0, "a": 0.25}, None]]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("seq", SEQUENCES, ids=lambda s: "-".join(map(str, s)))
def test_same_adapter_gives_same_outputs_on_onnxruntime_and_litert(tmp_path, strategy, seq):
    info_o = _tiny.make_mlp(tmp_path / "m.onnx")
    info_t = _tiny_tflite.make_mlp(tmp_path / "m.tflite")  # same seed: same weights, another file format
    adapters = {n: random_adapter(info_o, seed, name=n) for seed, n in enumerate("abc", start=1)}
    with Runtime(tmp_path / "m.onnx") as ro, Runtime(tmp_path / "m.tflite", backend="tflite", strategy=strategy) as rt:
        for a in adapters.values():
            ro.load_adapter(a)
            rt.load_adapter(rebased(a, info_t))
        for step in seq:
            ro.switch(step)
            rt.switch(step)
        ro.wait_settled(30)
        rt.wait_settled(30)
        for k in info_o.tensors:  # the same weights, bit for bit
            np.testing.assert_array_equal(rt.weights(k), ro.weights(k))
        np.testing.assert_allclose(rt.run(X)["logits"], ro.run(X)["logits"], rtol=1e-5, atol=1e-5)
        assert rt.active == ro.active


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_converted_slots_switch_in_place(strategy):
    """branch-mlp-v1.tflite: litert-torch output whose branch weights are graph inputs (slots)."""
    path = GOLDEN / "branch-mlp-v1.tflite"
    with Runtime(path, backend="tflite", strategy=strategy) as rt:
        info = rt.info
        slots = sorted(k for k, t in info.tensors.items() if t.slot)
        assert slots == ["branch.down.weight", "branch.up.weight"]
        rng = np.random.default_rng(4)
        dense = {k: DenseDelta(rng.standard_normal(info.tensors[k].shape).astype(np.float32) * 0.3) for k in slots}
        rt.load_adapter(Adapter("d", info.fingerprint, dense, {k: info.tensors[k].shape for k in slots}, "adapter"))
        y0 = rt.run(X)["logits"]
        base = {k: rt.weights(k) for k in info.tensors}
        np.testing.assert_allclose(y0, _tiny_tflite.reference_branch(path, info, {}, X), rtol=1e-5, atol=1e-5)
        rt.switch("d")
        assert rt.wait_settled(0), "a slot write must not start a background rebuild"
        ref = merge_weights(base, [(rt._adapters["d"].adapter, 1.0)])
        want = _tiny_tflite.reference_branch(path, info, ref, X)
        np.testing.assert_allclose(rt.run(X)["logits"], want, rtol=1e-5, atol=1e-5)
        rt.switch(None)
        np.testing.assert_array_equal(rt.run(X)["logits"], y0)


def test_hybrid_serves_builtin_kernels_until_the_xnnpack_rebuild_lands(tmp_path):
    cls = get_backend("tflite")
    info = _tiny_tflite.make_mlp(tmp_path / "m.tflite")
    data = (tmp_path / "m.tflite").read_bytes()
    b = cls(data, BackendOptions(rebuild_delay_ms=300))
    assert b.strategy == cls.DEFAULT_STRATEGY == "hybrid" and b.providers == ["XNNPACK", "CPU"]
    from runtimes.base import WeightWrite

    y0 = b.run({"x": X})["logits"]
    t = info.tensors["fc1.weight"].initializer
    b.write(b.prepare([WeightWrite(t, np.arange(20), np.full(20, 3.0, np.float32))]))
    assert b.providers == ["CPU"]  # at once: the built-in kernels read the edited bytes
    y1 = b.run({"x": X})["logits"]
    assert np.abs(y1 - y0).max() > 1e-2
    assert b.wait_settled(30) and b.providers == ["XNNPACK", "CPU"]
    np.testing.assert_allclose(b.run({"x": X})["logits"], y1, rtol=1e-5, atol=1e-5)
    b.close()


def test_reader_agrees_with_the_schema_package():
    from ai_edge_litert import schema_py_generated as s

    data = (GOLDEN / "branch-mlp-v1.tflite").read_bytes()
    m = s.ModelT.InitFromPackedBuf(bytearray(data), 0)
    fb = read_tflite(data)
    sg = m.subgraphs[0]
    assert [t.name for t in fb.tensors] == [t.name.decode() for t in sg.tensors]
    assert [t.shape for t in fb.tensors] == [tuple(int(d) for d in t.shape) for t in sg.tensors]
    assert list(fb.inputs) == list(sg.inputs) and list(fb.outputs) == list(sg.outputs)
    for t, ts in zip(fb.tensors, sg.tensors):
        want = m.buffers[ts.buffer].data
        got = data[t.start : t.start + t.nbytes]
        assert got == (b"" if want is None else bytes(want)), t.name
    assert set(fb.metadata) == {e.name.decode() for e in m.metadata}


def test_tampered_or_foreign_files_are_refused(tmp_path):
    data = bytearray((GOLDEN / "tiny-mlp-v1.tflite").read_bytes())
    w = next(t for t in read_tflite(bytes(data)).tensors if t.name == "fc1.weight")
    data[w.start] ^= 1
    (tmp_path / "t.tflite").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="fingerprint"):
        Runtime(tmp_path / "t.tflite", backend="tflite")
    (tmp_path / "o.tflite").write_bytes((GOLDEN / "tiny-mlp-v1.onnx").read_bytes())
    with pytest.raises(FormatError, match="not a .tflite"):
        Runtime(tmp_path / "o.tflite", backend="tflite")
    (tmp_path / "cut.tflite").write_bytes(bytes(data[:200]))
    with pytest.raises(FormatError):
        Runtime(tmp_path / "cut.tflite", backend="tflite")


def test_unknown_strategy_and_delegate(tmp_path):
    _tiny_tflite.make_mlp(tmp_path / "m.tflite")
    with pytest.raises(ConfigError, match="allowed"):
        Runtime(tmp_path / "m.tflite", backend="tflite", strategy="bound")
    with pytest.raises(BackendUnavailableError, match="not available"):
        Runtime(tmp_path / "m.tflite", backend="tflite", providers=["GPU"])
    with Runtime(tmp_path / "m.tflite", backend="tflite", strategy="rebuild", providers=["CPU"]) as rt:
        assert rt.providers == ["CPU"]  # asked for the built-in kernels only: no XNNPACK


@pytest.mark.parametrize("scale", [False, True], ids=["plain", "bn-folded"])
@pytest.mark.parametrize(
    "strategy, threads",
    [("hybrid", 2), ("rebuild", 2), ("builtin", 1), ("builtin", 2)],
    ids=["hybrid", "rebuild", "builtin-1-thread", "builtin-2-threads"],
)
def test_ohwi_and_folded_conv_filters_take_source_layout_adapters(tmp_path, strategy, threads, scale):
    """A conv filter stored OHWI (and scaled per channel, as a folded BatchNorm): the adapter is in torch layout."""
    info, w = _tiny_tflite.make_conv(tmp_path / "c.tflite", scale=scale)
    t = info.tensors["conv.weight"]
    s = np.ones(w.shape[0], np.float32) if t.channel_scale is None else np.float32(t.channel_scale)
    folded = w * s[:, None, None, None]
    rng = np.random.default_rng(1)
    flat = np.sort(rng.choice(w.size, 30, replace=False))
    idx = np.stack(np.unravel_index(flat, w.shape)).astype(np.int32)
    vals = rng.standard_normal(30).astype(np.float32)
    adapter = Adapter("a", info.fingerprint, {"conv.weight": SparseDelta(idx, vals)}, {"conv.weight": w.shape})
    merged = w.copy()
    merged[tuple(idx)] += vals
    want = merged * s[:, None, None, None]
    x = rng.standard_normal((3, 6, 6, _tiny_tflite.CONV[1])).astype(np.float32)  # batch 3: chunks of the file's 1
    with Runtime(tmp_path / "c.tflite", backend="tflite", strategy=strategy, threads=threads) as rt:
        y0 = rt.run({"x": x})["y"]
        np.testing.assert_allclose(y0, _tiny_tflite.reference_conv(folded, x), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(rt.weights("conv.weight"), folded)
        rt.load_adapter(adapter)
        rt.switch("a")
        rt.wait_settled(30)
        np.testing.assert_allclose(rt.weights("conv.weight"), want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(rt.run({"x": x})["y"], _tiny_tflite.reference_conv(want, x), rtol=1e-5, atol=1e-5)
        rt.switch(None)
        rt.wait_settled(30)
        np.testing.assert_array_equal(rt.weights("conv.weight"), folded)  # undo is bit-exact
        np.testing.assert_array_equal(rt.run({"x": x})["y"], y0)


# -- the exporter (needs litert-torch: the tflite-export extra) -------------------------------------------------------


@pytest.mark.slow
def test_export_maps_parameters_and_lists_every_mismatch(tmp_path):
    pytest.importorskip("litert_torch", reason="TFLite export needs litert-torch (pip install '.[tflite-export]')")
    import torch

    from exporters.tflite import export_tflite

    class Two(torch.nn.Module):
        def __init__(self, off: float = 0.0) -> None:
            super().__init__()
            self.fc1, self.fc2, self.off = torch.nn.Linear(10, 20), torch.nn.Linear(20, 3), off

        def forward(self, x):
            h = self.fc1(x)
            bump = 0.0 if torch.compiler.is_exporting() else self.off  # torch and the file disagree
            return self.fc2(torch.relu(h)) + bump, h + bump

    torch.manual_seed(0)
    x = torch.randn(2, 10)
    info = export_tflite(Two().eval(), (x,), tmp_path / "m.tflite", name="two", input_names=["x"],
                         output_names=["y", "h"], dynamic_batch=False)  # fmt: skip
    assert {k: (t.initializer, t.transposed) for k, t in info.tensors.items()} == {
        "fc1.weight": ("fc1.weight", False),
        "fc2.weight": ("fc2.weight", False),
    }
    with Runtime(tmp_path / "m.tflite", backend="tflite") as rt:
        assert rt.info == info
    with pytest.raises(ExportValidationError) as e:
        export_tflite(Two(0.5).eval(), (x,), tmp_path / "bad.tflite", name="bad", input_names=["x"],
                      output_names=["y", "h"], dynamic_batch=False)  # fmt: skip
    text = str(e.value)
    assert text.count("max abs diff") == 4 and "'y'" in text and "'h'" in text and "built-in" in text
    assert not (tmp_path / "bad.tflite").exists()


BLOCK = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked for this test")
sys.meta_path.insert(0, _Block())
"""

ON_DEVICE = """
import numpy as np
from edge.runtime import Runtime
with Runtime(sys.argv[1], backend="tflite") as rt:
    rt.run(np.zeros((2, 10), np.float32))
    print("ok", rt.strategy, rt.providers, rt.backend.runtime, "torch" in sys.modules)
"""


def test_device_side_without_torch_or_schema_package_and_without_any_interpreter():
    import subprocess
    import sys

    model = str(GOLDEN / "tiny-mlp-v1.tflite")
    code = f"BLOCKED = {{'torch', 'exporters', 'flatbuffers'}}\n{BLOCK}{ON_DEVICE}"
    r = subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True, cwd=GOLDEN.parent.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "hybrid", "['XNNPACK',", "'CPU']", "ai-edge-litert", "False"]
    code = f"BLOCKED = {{'ai_edge_litert', 'tflite_runtime'}}\n{BLOCK}{ON_DEVICE}"
    r = subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True, cwd=GOLDEN.parent.parent)
    assert r.returncode != 0 and "BackendUnavailableError" in r.stderr
    assert "pip install ai-edge-litert" in r.stderr and "tflite-runtime" in r.stderr


def test_bench_switch_runs_on_litert(tmp_path):
    from lab.bench_switch import bench_switch

    _tiny_tflite.make_mlp(tmp_path / "m.tflite", sizes=(32, 64, 4))
    feeds = {"x": np.ones((1, 32), np.float32)}
    r = bench_switch(tmp_path / "m.tflite", feeds, backend="tflite", runs=10, rounds=2, switches=3, progress=False)
    assert r["backend"] == "tflite" and r["default_strategy"] == "hybrid" and r["params"] == 32 * 64 + 64 + 64 * 4 + 4
    assert set(r["strategies"]) == set(STRATEGIES) and r["goals"]["targets"]["switch_vs_create_x"] == 10.0
    assert all(r[k] > 0 for k in ("static_infer_ms_p50", "session_create_ms_p50", "lora_fuse_ms_p50"))


def test_alternatives_probe_agrees_with_the_plain_interpreter(tmp_path):
    from lab.bench_litert import alternatives

    _tiny_tflite.make_mlp(tmp_path / "m.tflite", sizes=(32, 64, 4))
    r = alternatives(tmp_path / "m.tflite", {"x": np.ones((1, 32), np.float32)}, runs=5)
    assert r["weights_as_inputs_max_abs_diff"] < 1e-5
    assert set(r["ms_p50"]) == {"xnnpack_static", "builtin", "xnnpack_weights_as_inputs", "build_same_bytes",
                                "build_fresh_copy"}  # fmt: skip
