"""Loaded adapters count against the device's memory budget (``budgets.memory_mb``).

Before: only the model was weighed against the budget; a runtime loaded adapters until the process was killed.
Now ``load_adapter`` refuses one that would take the model's predicted footprint plus the adapters held past the
budget (a lower bound before preparing, the exact figure after), leaving the runtime as it was; every door that
loads adapters into a runtime goes through it.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import _tiny
import numpy as np
import pytest
import yaml

from edge.cli import main
from edge.devices import load_profile
from edge.errors import ConfigError
from edge.format.adapter import Adapter, SparseDelta
from edge.runtime import Runtime

X = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
MB = 2**20


def _adapter(info, seed: int, name: str, density: float = 0.3) -> Adapter:
    """A SHiRA-style adapter on its own random mask (``seed``) of every weight."""
    rng = np.random.default_rng(seed)
    tensors, shapes = {}, {}
    for k, t in info.tensors.items():
        size = int(np.prod(t.shape))
        flat = np.sort(rng.choice(size, max(2, int(density * size)), replace=False))
        idx = np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)
        tensors[k], shapes[k] = SparseDelta(idx, (rng.standard_normal(flat.size) * 1e-2).astype(np.float32)), t.shape
    return Adapter(name, info.fingerprint, tensors, shapes)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("budget") / "m.onnx"
    info = _tiny.make_mlp(path, sizes=(10, 256, 3))
    with Runtime(path, backend="onnxruntime", strategy="bound") as rt:  # what one adapter keeps, measured
        rt.load_adapter(_adapter(info, 1, "p"))  # named as short as the adapters the tests load: its name counts
        one = rt.footprint["adapters_mb"] * MB  # its data and the objects holding it, as a budget counts
    return path, info, one


def _profile(memory_mb: float):
    p = load_profile("x86-dev")
    return replace(p, budgets=replace(p.budgets, memory_mb=memory_mb))


def _runtime(path, adapters: float, **kw) -> Runtime:
    """A runtime (strategy bound) whose budget leaves room for ``adapters`` times one adapter's held bytes."""
    with Runtime(path, backend="onnxruntime", strategy="bound") as free:
        predicted = free.footprint["predicted_mb"]
    return Runtime(path, backend="onnxruntime", strategy="bound", device=_profile(predicted + adapters), **kw)


def _snapshot(rt) -> tuple:
    return rt.active, rt.adapters, {k: rt.weights(k) for k in rt.info.tensors}, rt.adapter_bytes


def test_refused_past_the_budget_runtime_unchanged(model):
    path, info, one = model
    with _runtime(path, 1.5 * one / MB) as rt:
        assert rt.load_adapter(_adapter(info, 1, "a")) == "a"
        rt.switch("a")
        before, out = _snapshot(rt), rt.run({"x": X})["logits"]
        with pytest.raises(
            ConfigError, match=r"adapter 'b' would keep .* MB left of the memory budget .*Unload an adapter"
        ) as e:
            rt.load_adapter(_adapter(info, 2, "b"))
        assert "budgets.memory_mb" in str(e.value) and "lower-bit" in str(e.value)
        after = _snapshot(rt)
        assert after[:2] == before[:2] and after[3] == before[3]
        for k, w in before[2].items():
            assert after[2][k].tobytes() == w.tobytes()  # bit-exact
        assert rt.run({"x": X})["logits"].tobytes() == out.tobytes()
        fp = rt.footprint
        assert fp["budget_mb"] == rt.device.budgets.memory_mb
        assert fp["room_mb"] == pytest.approx(fp["budget_mb"] - fp["predicted_mb"] - fp["adapters_mb"])
        assert 0 <= fp["room_mb"] < one / MB


def test_accepted_under_it_and_unload_frees_room(model):
    path, info, one = model
    with _runtime(path, 2.5 * one / MB) as rt:
        rt.load_adapter(_adapter(info, 1, "a"))
        rt.load_adapter(_adapter(info, 2, "b"))
        with pytest.raises(ConfigError, match="'c' would keep"):
            rt.load_adapter(_adapter(info, 3, "c"))
        room = rt.footprint["room_mb"]
        rt.unload_adapter("a")
        assert rt.footprint["room_mb"] == pytest.approx(room + one / MB)
        assert rt.load_adapter(_adapter(info, 3, "c")) == "c" and rt.adapters == ["b", "c"]
        rt.switch({"b": 1.0, "c": 0.5})


def test_same_mask_adapters_cost_less_and_a_replaced_name_is_not_counted(model):
    """A second adapter on one mask shares positions and base values: it fits where one on its own mask does not;
    loading under a held name replaces it, so only the new one counts."""
    path, info, one = model
    with _runtime(path, 1.8 * one / MB) as rt:
        a = _adapter(info, 1, "a")
        rt.load_adapter(a)
        twin = Adapter(
            "t", a.base_fingerprint, {k: replace(d, values=d.values * 2) for k, d in a.tensors.items()}, a.shapes
        )
        rt.load_adapter(twin)
        assert rt.adapter_bytes["t"] < 0.8 * one
        with pytest.raises(ConfigError, match="would keep"):
            rt.load_adapter(_adapter(info, 2, "b"))
        rt.unload_adapter("t")
        rt.load_adapter(_adapter(info, 2, "a"))  # replaces "a": room for it although "a" is held
        assert rt.adapters == ["a"]


def test_running_total_equals_held_bytes(model):
    """The budget's running count of held bytes (each buffer once, kept up per load and unload) stays equal to a
    count from scratch over every adapter through loads, replacements on and off a mask, and unloads, and above the
    data alone (:func:`edge.fusion.held_bytes`): the objects holding the data count too."""
    from edge.adapters_held import HeldBuffers
    from edge.fusion import held_bytes

    path, info, one = model
    rng = np.random.default_rng(3)
    with _runtime(path, 1000 * one / MB) as rt:
        for step in range(60):
            name = f"n{rng.integers(5)}"
            if name in rt.adapters and rng.random() < 0.4:
                rt.unload_adapter(name)
            else:  # masks 0-2: several adapters share each; a name loaded again replaces its adapter
                a = _adapter(info, int(rng.integers(3)), name)
                scaled = {k: replace(d, values=d.values * (step + 1)) for k, d in a.tensors.items()}
                rt.load_adapter(Adapter(name, a.base_fingerprint, scaled, a.shapes))
            exact = sum(held_bytes(rt._adapters.values()))
            recount = HeldBuffers(rt._adapters).total
            assert rt.footprint["adapters_mb"] * MB == recount > exact == sum(rt.adapter_bytes.values())


def test_count_survives_an_interrupt(model):
    """A Ctrl-C landing between the count's steps and the adapters' (a replacing load, an unload) leaves the count
    equal to what the adapters held keep."""
    from edge.adapters_held import HeldBuffers

    path, info, one = model
    with _runtime(path, 10 * one / MB) as rt:
        rt.load_adapter(_adapter(info, 1, "a"))
        rt.load_adapter(_adapter(info, 2, "b"))
        replace_a, unload_b = lambda: rt.load_adapter(_adapter(info, 3, "a")), lambda: rt.unload_adapter("b")
        for action, left in ((replace_a, ["a", "b"]), (unload_b, ["a"])):  # the replaced "a" stays; "b" is gone
            held = rt._held

            def cut(p):
                raise KeyboardInterrupt

            held.remove = cut
            with pytest.raises(KeyboardInterrupt):
                action()
            assert rt._held is not held and rt.adapters == left
            assert rt.footprint["adapters_mb"] * MB == HeldBuffers(rt._adapters).total


def test_estimate_refuses_before_preparing(model, monkeypatch):
    """Far over the budget, the lower bound refuses before positions, base values and writes are prepared."""
    path, info, one = model
    with _runtime(path, 0.2 * one / MB) as rt:
        monkeypatch.setattr(rt, "_prepare", lambda *a, **k: pytest.fail("prepared an adapter over the budget"))
        with pytest.raises(ConfigError, match=r"at least .* \(from its entries\)"):
            rt.load_adapter(_adapter(info, 1, "a"))
        assert rt.adapters == []


def test_exact_figure_refuses_when_the_estimate_was_short(model):
    """Between the lower bound and the exact figure: prepared, then refused and dropped."""
    path, info, one = model
    with _runtime(path, 0.95 * one / MB) as rt:
        with pytest.raises(ConfigError, match=r"would keep \d") as e:
            rt.load_adapter(_adapter(info, 1, "a"))
        assert "at least" not in str(e.value) and rt.adapters == [] and rt.footprint["adapters_mb"] == 0


def test_concurrent_loads_do_not_both_take_the_last_room(model):
    path, info, one = model
    with _runtime(path, 1.5 * one / MB) as rt:
        errors, go = [], threading.Barrier(4)

        def load(i):
            go.wait()
            try:
                rt.load_adapter(_adapter(info, 10 + i, f"x{i}"))
            except ConfigError as e:
                errors.append(e)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(rt.adapters) == 1 and len(errors) == 3 and rt.footprint["room_mb"] >= 0


def test_no_budget_no_check(model):
    path, info, one = model
    tight = _profile(1e-6)
    with Runtime(path, backend="onnxruntime", strategy="bound", device=tight, enforce_memory_budget=False) as rt:
        for i in range(3):
            rt.load_adapter(_adapter(info, i, f"a{i}"))
        assert rt.footprint["budget_mb"] is None and rt.footprint["room_mb"] is None
    with Runtime(path, backend="onnxruntime") as rt:  # no device profile
        rt.load_adapter(_adapter(info, 1, "a"))
        assert rt.footprint["room_mb"] is None


def test_a_backend_that_predicts_nothing_counts_the_model_file(tmp_path, monkeypatch):
    """A backend that predicts no footprint: the model's part is its file's size (the bytes it keeps at least), named
    so. (LiteRT predicts one, tests/device/test_litert_footprint.py; here it is made to predict none.)"""
    import _tiny_tflite

    from runtimes.litert import LiteRTBackend

    monkeypatch.setattr(LiteRTBackend, "predicted_mb", lambda self, strategy=None: None)
    path = tmp_path / "m.tflite"
    info = _tiny_tflite.make_mlp(path, sizes=(10, 256, 3))
    with Runtime(path, backend="tflite") as free:
        free.load_adapter(_adapter(info, 1, "p"))  # named as short as "a": its name counts
        one = free.footprint["adapters_mb"] * MB
    budget = path.stat().st_size / MB + 1.5 * one / MB
    with Runtime(path, backend="tflite", strategy="hybrid", device=_profile(budget)) as rt:  # auto would not fit
        assert rt.footprint["predicted_mb"] is None
        rt.load_adapter(_adapter(info, 1, "a"))
        assert rt.footprint["room_mb"] == pytest.approx(budget - path.stat().st_size / MB - one / MB)
        with pytest.raises(ConfigError, match=r"its file's size \(tflite predicts no footprint\)"):
            rt.load_adapter(_adapter(info, 2, "b"))
        assert rt.adapters == ["a"]


def test_auto_hybrid_names_what_bound_would_free(model):
    """auto keeps no headroom for adapters (a model-only device must not lose hybrid); a refusal then says how much
    strategy bound would free."""
    path, info, one = model
    with Runtime(path, backend="onnxruntime", strategy="hybrid") as free:
        hybrid, bound = free.backend.predicted_mb("hybrid"), free.backend.predicted_mb("bound")
    assert hybrid > bound
    with Runtime(path, backend="onnxruntime", device=_profile(hybrid + 0.5 * one / MB)) as rt:
        assert rt.strategy == "hybrid"
        with pytest.raises(ConfigError, match=r"strategy bound .* MB less"):
            rt.load_adapter(_adapter(info, 1, "a"))


def test_router_growth_door(model):
    """Growth under a runtime's budget picks from the room it has left, and a grown adapter is loaded through
    the same check."""
    from edge.learn.space import Budget

    path, info, one = model
    with _runtime(path, 1.5 * one / MB) as rt:
        assert Budget.of(rt).memory_mb == pytest.approx(rt.footprint["room_mb"])
        rt.load_adapter(_adapter(info, 1, "a"))
        b = Budget.of(rt)
        assert b.memory_mb == pytest.approx(rt.footprint["room_mb"]) and b.memory_mb < one / MB
        assert b.latency_ms == rt.device.budgets.latency_p95_ms
        with pytest.raises(ConfigError, match="would keep"):
            rt.load_adapter(_adapter(info, 5, "grown"))
        assert rt.adapters == ["a"]
    with Runtime(path, backend="onnxruntime") as rt, pytest.raises(ConfigError, match="no budget"):
        Budget.of(rt)


def _write_profile(folder, memory_mb: float):
    data = yaml.safe_load(open(load_profile("x86-dev").source).read())
    data.update(name="tight", budgets={**data["budgets"], "memory_mb": memory_mb})
    for b in data["backends"]:
        if b["backend"] == "onnxruntime":
            b["strategy"] = "bound"
    (folder / "tight.yaml").write_text(yaml.safe_dump(data))


def test_profile_cli_refuses_with_one_line_and_reports_the_held_total(model, tmp_path, capsys):
    path, info, _ = model
    for i in (1, 2):
        _adapter(info, i, f"a{i}").save(tmp_path / f"a{i}.safetensors")
    with Runtime(path, backend="onnxruntime", strategy="bound") as free:
        predicted = free.footprint["predicted_mb"]
        free.load_adapter(tmp_path / "a1.safetensors")  # from its file, as the profile loads it: the bytes count
        one = free.footprint["adapters_mb"] * MB
    _write_profile(tmp_path, predicted + 1.5 * one / MB)
    adapters = [str(tmp_path / "a1.safetensors"), str(tmp_path / "a2.safetensors")]
    argv = ["profile", str(path), "--device", "tight", "--devices-dir", str(tmp_path), "--backend", "onnxruntime"]
    fast = ["--runs", "3", "--warmup", "1", "--switches", "1", "--engine-rounds", "0", "-q"]
    assert main([*argv, *fast, "--adapters", *adapters]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'a2' would keep" in err and "Traceback" not in err
    out = tmp_path / "p.json"
    assert main([*argv, *fast, "--adapters", adapters[0], "--json", str(out), "--md", str(tmp_path / "p.md")]) == 0
    import json

    mem = json.loads(out.read_text())["memory"]
    assert mem["adapters_mb"] == pytest.approx(one / MB) and mem["room_mb"] == pytest.approx(0.5 * one / MB)
    assert "adapter(s) held" in (tmp_path / "p.md").read_text()


def test_profile_holds_every_adapter_as_the_device_does(model, tmp_path):
    """`edge profile` keeps each adapter loaded (the device serves them all): the held total is what they keep
    together, and a file given twice is held under a second name, not replaced."""
    from edge.profiling import ProfileConfig, profile_model

    path, info, _ = model
    a = _adapter(info, 1, "a")
    a.save(tmp_path / "a.safetensors")
    files = [tmp_path / "a.safetensors", tmp_path / "a.safetensors"]
    config = ProfileConfig(runs=3, warmup=1, switches=1, progress=False, engine_runs=0)
    r = profile_model(path, "x86-dev", adapters=files, backend="onnxruntime", config=config)
    assert [x["name"] for x in r["adapters"]] == ["a", "a#2"]
    with Runtime(path, backend="onnxruntime") as rt:  # from its file, as the profile loads it: the bytes count
        rt.load_adapter(files[0])
        one = rt.footprint["adapters_mb"] * MB
        rt.load_adapter(files[1], name="a#2")
        together = rt.footprint["adapters_mb"] * MB
    assert r["memory"]["adapters_mb"] * MB == together < 2 * one  # the second shares the first's positions
    assert r["memory"]["room_mb"] == pytest.approx(
        r["budgets"]["memory_mb"]["budget"] - r["memory"]["predicted_mb"] - together / MB
    )
