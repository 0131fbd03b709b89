"""Dense branch adapters (bottleneck, LoRA) written into model slots, alone and beside SHiRA."""

from __future__ import annotations

import _tiny
import _tiny_tflite
import numpy as np
import pytest
from _tiny import make_branch_mlp, random_adapter

from edge.errors import AdapterMismatchError, ConfigError
from edge.format.adapter import Adapter, DenseDelta, load_adapter
from edge.runtime import Runtime, merge_weights
from runtimes import backend_names, get_backend

CASES = [(b, s) for b in backend_names() for s in get_backend(b).STRATEGIES]
X = np.random.default_rng(1).standard_normal((5, 10)).astype(np.float32)
SLOTS = ("branch.down.weight", "branch.up.weight")
TINY = {"onnxruntime": _tiny, "tflite": _tiny_tflite}  # tiny-model builders with the same API, per backend


def dense_adapter(info, seed: int, name: str, method: str = "adapter") -> Adapter:
    rng = np.random.default_rng(seed)
    tensors = {k: DenseDelta(rng.standard_normal(info.tensors[k].shape).astype(np.float32) * 0.3) for k in SLOTS}
    return Adapter(name, info.fingerprint, tensors, {k: info.tensors[k].shape for k in SLOTS}, method=method)


def shira_only(info, seed, name):
    a = random_adapter(info, seed, name=name)
    keep = {k: v for k, v in a.tensors.items() if k not in SLOTS}
    return Adapter(name, info.fingerprint, keep, {k: a.shapes[k] for k in keep})


@pytest.mark.parametrize("backend,strategy", CASES)
def test_dense_adapters_switch_in_place(tmp_path, backend, strategy):
    tiny = TINY[backend]
    path = tmp_path / f"m{getattr(tiny, 'SUFFIX', '.onnx')}"
    info = tiny.make_branch_mlp(path)
    a, b = dense_adapter(info, 1, "a"), dense_adapter(info, 2, "b", method="lora")
    s = shira_only(info, 3, "s")
    a.save(tmp_path / "a.safetensors")
    base = tiny.base_weights(path, info)
    with Runtime(path, backend=backend, strategy=strategy) as rt:
        y0 = rt.run(X)["logits"]
        np.testing.assert_allclose(y0, tiny.reference_branch(path, info, {}, X), rtol=1e-5, atol=1e-5)
        rt.load_adapter(tmp_path / "a.safetensors")
        rt.load_adapter(b)
        rt.load_adapter(s)
        for spec, parts in [("a", [(a, 1.0)]), ("b", [(b, 1.0)]), ({"a": 1.0, "s": 1.0}, [(a, 1.0), (s, 1.0)])]:
            rt.switch(spec)
            rt.wait_settled(30)
            ref = merge_weights(base, parts)
            for k in ref:
                np.testing.assert_array_equal(rt.weights(k), ref[k])
            want = tiny.reference_branch(path, info, ref, X)
            np.testing.assert_allclose(rt.run(X)["logits"], want, rtol=1e-5, atol=1e-5)
        rt.switch(None)
        rt.wait_settled(30)
        np.testing.assert_array_equal(rt.run(X)["logits"], y0)


@pytest.mark.parametrize("backend,strategy", CASES)
def test_slot_only_switch_needs_no_rebuild(tmp_path, backend, strategy):
    tiny = TINY[backend]
    path = tmp_path / f"m{getattr(tiny, 'SUFFIX', '.onnx')}"
    info = tiny.make_branch_mlp(path)
    with Runtime(path, backend=backend, strategy=strategy) as rt:
        rt.load_adapter(dense_adapter(info, 1, "a"))
        rt.switch("a")
        assert rt.wait_settled(0), "a slot write must not start a background rebuild"


def test_two_branch_adapters_cannot_share_slots(tmp_path):
    path = tmp_path / "m.onnx"
    info = make_branch_mlp(path)
    with Runtime(path) as rt:
        rt.load_adapter(dense_adapter(info, 1, "a"))
        rt.load_adapter(dense_adapter(info, 2, "b"))
        rt.switch("a")
        with pytest.raises(ConfigError, match="cannot share slots"):
            rt.switch({"a": 1.0, "b": 1.0})
        assert rt.active == {"a": 1.0}


def test_method_must_match_tensor_kind(tmp_path):
    path = tmp_path / "m.onnx"
    info = make_branch_mlp(path)
    with Runtime(path) as rt:
        wrong = Adapter(
            "w",
            info.fingerprint,
            {"fc1.weight": DenseDelta(np.zeros((16, 10), np.float32))},
            {"fc1.weight": (16, 10)},
            method="adapter",
        )
        with pytest.raises(AdapterMismatchError, match="slot"):
            rt.load_adapter(wrong)
    with pytest.raises(AdapterMismatchError, match="sparse"):
        Adapter(
            "x",
            info.fingerprint,
            {"fc1.weight": DenseDelta(np.zeros((16, 10), np.float32))},
            {"fc1.weight": (16, 10)},
            method="shira",
        )


def test_dense_file_round_trip(tmp_path):
    path = tmp_path / "m.onnx"
    info = make_branch_mlp(path)
    a = dense_adapter(info, 4, "a")
    a.save(tmp_path / "a.safetensors")
    b = load_adapter(tmp_path / "a.safetensors")
    assert b.method == "adapter" and not b.fusable
    for k in SLOTS:
        np.testing.assert_array_equal(a.tensors[k].values, b.tensors[k].values)
