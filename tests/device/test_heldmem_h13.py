"""A memory budget counts what a held adapter really keeps, not only its arrays' elements.

Tiny adapters (the demo ViT's: 1,337 entries on 12 targets) kept 80 KB each of resident memory against 52 KB the
budget counted (array headers, the memoryviews and bytes a file's arrays sit on, the dicts, tuples and deltas holding
them, the budget's own record per buffer), so a device budget admitted ~1.55x more of them than fit. tracemalloc
counts every block Python and numpy allocate, deterministically: what a held adapter takes, against the budget.
"""

from __future__ import annotations

import gc
import tracemalloc

import _tiny
import pytest

from edge.errors import ConfigError
from edge.runtime import Runtime

N = 120  # loads measured at once: the interpreter's free lists (bounded) wash out of the figure per adapter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model and N + 1 tiny adapters (about 40 entries on 2 targets), each on its own mask, in files."""
    tmp = tmp_path_factory.mktemp("heldmem")
    info = _tiny.make_mlp(tmp / "m.onnx", sizes=(10, 64, 3))
    out = []
    for i in range(N + 1):
        out.append(tmp / f"a{i}.safetensors")
        _tiny.random_adapter(info, i, density=0.05).save(out[-1])
    return tmp / "m.onnx", info, out


def _held(rt) -> int:
    return round(rt.footprint["adapters_mb"] * 2**20)


@pytest.mark.parametrize("source", ["file", "memory"])
def test_the_budget_counts_at_least_what_held_adapters_take(files, source):
    path, info, paths = files
    adapters = paths if source == "file" else [_tiny.random_adapter(info, i, density=0.05) for i in range(N + 1)]
    with Runtime(path, backend="onnxruntime", strategy="bound") as rt:
        rt.load_adapter(adapters[0], name="warm")  # one-time caches filled before measuring
        gc.collect()
        tracemalloc.start()
        try:
            before, counted, data = tracemalloc.get_traced_memory()[0], _held(rt), sum(rt.adapter_bytes.values())
            for i, a in enumerate(adapters[1:]):
                rt.load_adapter(a, name=f"n{i}")
            gc.collect()
            taken = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        counted, data = _held(rt) - counted, sum(rt.adapter_bytes.values()) - data
    assert data < 0.5 * taken  # the arrays' elements alone: what the budget counted
    assert counted >= taken  # the budget: never under what they take
    assert counted < 1.5 * taken  # and not far over it: a budget admits what fits


def test_unloading_gives_back_what_loading_counted(files):
    path, _, paths = files
    with Runtime(path, backend="onnxruntime", strategy="bound") as rt:
        rt.load_adapter(paths[0])
        one = _held(rt)
        for p in paths[1:6]:
            rt.load_adapter(p)
        for name in rt.adapters:
            if name != "a0":
                rt.unload_adapter(name)
        assert _held(rt) == one
        rt.unload_adapter("a0")
        assert rt.footprint["adapters_mb"] == 0


@pytest.mark.parametrize("source", ["file", "memory", "twin"])
def test_the_lower_bound_before_preparing_is_not_over_the_exact_figure(files, monkeypatch, source):
    """The check before preparing counts at least the adapter's own objects now, and never more than the exact
    figure after: an adapter that fits is not refused by its estimate."""
    from dataclasses import replace

    from edge.adapters_held import AdapterHolder

    path, info, paths = files
    checks, real = [], AdapterHolder._check_room
    monkeypatch.setattr(
        AdapterHolder,
        "_check_room",
        lambda self, n, held, mine, est: checks.append((est, mine)) or real(self, n, held, mine, est),
    )
    with Runtime(path, backend="onnxruntime", strategy="bound", device=_roomy()) as rt:
        first = _tiny.random_adapter(info, 1, density=0.05)
        if source == "twin":
            rt.load_adapter(first)
            checks.clear()
            tensors = {k: replace(d, values=d.values * 2) for k, d in first.tensors.items()}
            rt.load_adapter(replace(first, name="t", tensors=tensors))
        else:
            rt.load_adapter(paths[1] if source == "file" else first)
        (est, at_least), (exact_flag, exact) = checks
        assert est and not exact_flag
        assert 0 < at_least <= exact
        assert exact == _held(rt) - (0 if source != "twin" else _held_of(rt, "a1"))


def _held_of(rt, name) -> int:
    from edge.adapters_held import HeldBuffers

    return HeldBuffers({name: rt._adapters[name]}).total


def _roomy():
    from dataclasses import replace

    from edge.devices import load_profile

    p = load_profile("x86-dev")
    return replace(p, budgets=replace(p.budgets, memory_mb=10_000.0))


def test_a_refusal_names_the_figure_the_budget_counts(files):
    path, _, paths = files
    with Runtime(path, backend="onnxruntime", strategy="bound") as free:
        predicted = free.footprint["predicted_mb"]
        free.load_adapter(paths[1])
        one, data = _held(free), free.adapter_bytes["a1"]
    from dataclasses import replace

    from edge.devices import load_profile

    p = load_profile("x86-dev")
    room = (data + one) / 2  # room for the data alone, not for what the adapter keeps
    device = replace(p, budgets=replace(p.budgets, memory_mb=predicted + room / 2**20))
    with Runtime(path, backend="onnxruntime", strategy="bound", device=device) as rt:
        with pytest.raises(ConfigError, match="'a1' would keep"):  # fits by its data, not by what it keeps
            rt.load_adapter(paths[1])
        assert rt.adapters == []
