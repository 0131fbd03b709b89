"""Many adapters held: a load finds the adapters on its positions by a digest, never by walking every held adapter.

Random masks of one density all match in size, so comparing each new adapter's positions with every held one's
cost the n-th load O(n x entries) and n loads O(n^2). These tests count the comparisons a load makes (the held
adapters handed to :func:`edge.fusion.same_positions`) and check that the lookup keeps the semantics of adapters on
one mask (shared base values and undo, bit-exact switching), also through unloads, replacements and digest
collisions. ``edge profile`` reads what each adapter keeps once, not once per adapter.
"""

from __future__ import annotations

import _tiny
import numpy as np
import pytest

from edge import fusion
from edge.format.adapter import Adapter, SparseDelta
from edge.runtime import Runtime, merge_weights

X = np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32)


def _on_mask(info, mask_seed, value_seed, name, density=0.3) -> Adapter:
    """An adapter whose positions depend on ``mask_seed`` only; every one of a density has the same sizes."""
    masks, values = np.random.default_rng(mask_seed), np.random.default_rng(value_seed)
    tensors, shapes = {}, {}
    for k, t in info.tensors.items():
        size = int(np.prod(t.shape))
        flat = np.sort(masks.choice(size, max(2, int(density * size)), replace=False))
        idx = np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)
        tensors[k] = SparseDelta(idx, values.standard_normal(flat.size).astype(np.float32))
        shapes[k] = tuple(t.shape)
    return Adapter(name, info.fingerprint, tensors, shapes)


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.onnx"
    return path, _tiny.make_mlp(path, sizes=(10, 24, 3))


@pytest.fixture
def compared(monkeypatch) -> list[int]:
    """How many held adapters each load compares its positions with."""
    seen, real = [], fusion.same_positions

    def spy(index, others):
        others = list(others)
        seen.append(len(others))
        return real(index, others)

    monkeypatch.setattr(fusion, "same_positions", spy)
    return seen


def test_loading_many_random_masks_compares_with_none_of_the_held(model, compared):
    path, info = model
    with Runtime(path, strategy="bound") as rt:
        for i in range(40):
            rt.load_adapter(_on_mask(info, 100 + i, i, f"r{i}"))  # same sizes, other positions
        assert compared == [0] * 40  # was 0, 1, ..., 39: every held adapter, array by array
        assert len({p.layout for p in rt._adapters.values()}) == 40


def test_adapters_on_one_mask_compare_with_one_held_and_share_undo(model, compared):
    path, info = model
    with Runtime(path, strategy="bound") as rt:
        for i in range(30):
            rt.load_adapter(_on_mask(info, 7, i, f"m{i}"))
        rt.load_adapter(_on_mask(info, 8, 99, "other"))
        assert compared == [0] + [1] * 29 + [0]
        first = rt._adapters["m0"]
        assert all(rt._adapters[f"m{i}"].restore is first.restore for i in range(30))
        assert rt._adapters["other"].layout is not first.layout


def test_twins_are_found_after_the_first_on_a_mask_is_unloaded_or_replaced(model):
    path, info = model
    with Runtime(path, strategy="bound") as rt:
        rt.load_adapter(_on_mask(info, 7, 1, "a"))
        rt.load_adapter(_on_mask(info, 7, 2, "b"))
        rt.unload_adapter("a")
        rt.load_adapter(_on_mask(info, 7, 3, "c"))
        assert rt._adapters["c"].restore is rt._adapters["b"].restore
        rt.load_adapter(_on_mask(info, 9, 4, "b"))  # replaced by one on another mask
        rt.load_adapter(_on_mask(info, 9, 5, "d"))
        assert rt._adapters["d"].layout is rt._adapters["b"].layout
        assert rt._adapters["c"].layout is not rt._adapters["b"].layout
        for name in ("b", "c", "d"):
            rt.unload_adapter(name)
        assert rt._held._layouts == {} and rt._held.total == 0  # nothing left behind by unloads
        rt.load_adapter(_on_mask(info, 7, 6, "e"))
        assert rt._held.alike(rt._adapters["e"].layout.key) == [rt._adapters["e"]]


def test_positions_key_is_a_function_of_the_entries_written():
    a = {"w": np.array([1, 5, 9], np.int64), "v": np.array([0, 2], np.int64)}
    key = fusion.positions_key(a)
    assert fusion.positions_key({"v": a["v"].astype(np.int32), "w": a["w"].astype(np.int32)}) == key  # type, order
    assert fusion.positions_key({**a, "w": np.array([1, 5, 8], np.int64)}) != key  # one entry moved
    assert fusion.positions_key({"w": a["w"], "u": a["v"]}) != key  # another tensor
    assert fusion.positions_key({"w": np.array([1, 5], np.int64), "v": np.array([9, 0, 2], np.int64)}) != key
    assert fusion.positions_key({"w": np.concatenate([a["w"], a["v"]])}) != key  # same bytes, one tensor


def test_a_digest_collision_is_settled_by_comparing_positions(model, monkeypatch, compared):
    """Every adapter under one key: a load compares with one held adapter per layout, and only equal positions
    share; switching stays bit-exact."""
    path, info = model
    monkeypatch.setattr(fusion, "positions_key", lambda index: b"same")
    base = _tiny.base_weights(path, info)
    ads = [_on_mask(info, 7, 1, "a"), _on_mask(info, 8, 2, "b"), _on_mask(info, 7, 3, "c"), _on_mask(info, 9, 4, "d")]
    with Runtime(path, strategy="bound") as rt:
        for ad in ads:
            rt.load_adapter(ad)
        assert compared == [0, 1, 2, 2]  # a | a | a, b (c is a's twin) | a, b
        p = rt._adapters
        assert p["c"].layout is p["a"].layout and len({p[n].layout for n in "abd"}) == 3
        assert len(rt._held.alike(b"same")) == 3
        for spec in ("a", "c", "b", {"a": 1.0, "d": -0.5}, "d", "a", None):
            rt.switch(spec)
            pairs = [(next(a for a in ads if a.name == n), w) for n, w in fusion.normalise(spec).items()]
            ref = merge_weights(base, pairs)
            for k in ref:
                np.testing.assert_array_equal(rt.weights(k).view(np.uint32), ref[k].view(np.uint32))


def test_profile_reads_what_adapters_keep_once(tmp_path, monkeypatch):
    """``edge profile`` with n adapters read ``Runtime.adapter_bytes`` (a walk of every adapter held) n times."""
    from edge.adapters_held import AdapterHolder
    from edge.profiling import ProfileConfig, profile_model

    path = tmp_path / "m.onnx"
    info = _tiny.make_mlp(path, sizes=(10, 24, 3))
    files = []
    for i in range(5):
        files.append(tmp_path / f"a{i}.safetensors")
        _on_mask(info, 10 + i, i, f"a{i}").save(files[-1])
    calls, real = [], AdapterHolder.adapter_bytes.fget
    monkeypatch.setattr(AdapterHolder, "adapter_bytes", property(lambda self: calls.append(1) or real(self)))
    config = ProfileConfig(runs=2, warmup=1, switches=1, progress=False, engine_runs=0)
    r = profile_model(path, "x86-dev", adapters=files, config=config, backend="onnxruntime")
    assert len(calls) == 1
    held = [a["held_bytes"] for a in r["adapters"]]
    assert all(isinstance(h, int) and h > 0 for h in held) and len(held) == 5
