"""The LiteRT backend predicts its resident memory from the file's tensor table, and the memory budget counts it.

Before: LiteRT predicted nothing and the budget counted the ``.tflite`` file's size, while XNNPACK holds a packed
copy of the weights it takes (MiniLM-L6 fp32: an 85.7 MB file held 129.6 MB under rebuild): a device could be
OOM-killed by a model the budget admitted. Now :func:`runtimes.litert_footprint.predict_mb` counts the model's
bytes, its tensor table, XNNPACK's packed weights and the interpreters' arenas per strategy; ``load_adapter``,
``strategy="auto"`` under a budget and ``edge profile`` use it.

How close the prediction came to measurements is in :mod:`runtimes.litert_footprint`'s doc.
"""

from __future__ import annotations

from dataclasses import replace

import _tiny_tflite
import numpy as np
import pytest
import yaml

from edge.cli import main
from edge.devices import load_profile
from edge.errors import ConfigError
from edge.format.adapter import Adapter, SparseDelta
from edge.format.tflite import read_tflite
from edge.runtime import Runtime
from runtimes.litert_footprint import ARENA_FACTOR, INTERPRETER_MB, SCALE_BYTES, TABLE_BYTES, litert_parts

pytest.importorskip("ai_edge_litert.interpreter", reason="the LiteRT backend needs ai-edge-litert")

MB = 2**20


def _mlp(tmp_path, **kw):
    path = tmp_path / "m.tflite"
    return path, _tiny_tflite.make_mlp(path, sizes=(10, 256, 3), **kw)


def test_parts_of_a_model_whose_tensors_are_known(tmp_path):
    """x[1,10] -> FC(256) -> h[1,256] -> FC(3) -> y[1,3]: every part from the tensor table, by hand."""
    path, _ = _mlp(tmp_path)
    data = path.read_bytes()
    parts = litert_parts(read_tflite(data), len(data))
    assert parts.model == len(data)
    assert parts.tables == 7 * TABLE_BYTES  # x, h, logits, two weights, two biases; no quantization scale
    assert parts.packed == (256 * 10 * 4 + 256 * 4) + (3 * 256 * 4 + 3 * 4)  # each filter and its bias, float32
    assert parts.peak == (10 + 256) * 4  # x and h alive at the first FULLY_CONNECTED; h and y after it: less
    assert parts.peak_builtin == parts.peak  # no CONV_2D, no im2col
    arena = parts.peak * ARENA_FACTOR / MB + INTERPRETER_MB
    base = (len(data) + parts.tables) / MB
    assert parts.mb("builtin") == pytest.approx(base + arena)
    assert parts.mb("rebuild") == pytest.approx(base + parts.packed / MB + arena)
    assert parts.mb("hybrid") == pytest.approx(base + parts.packed / MB + 2 * arena)
    with pytest.raises(ConfigError, match="unknown tflite strategy 'bound'"):
        parts.mb("bound")


def test_int8_filters_pack_as_int8_with_their_channel_words(tmp_path):
    path = tmp_path / "q.tflite"
    _tiny_tflite.make_int8_mlp(path, sizes=(10, 256, 3))
    data = path.read_bytes()
    parts = litert_parts(read_tflite(data), len(data))
    assert parts.packed == (256 * 10 + 12 * 256) + (3 * 256 + 12 * 3)  # int8 filter; bias, scale, row sum a channel
    assert parts.tables == 7 * TABLE_BYTES + (256 + 3) * SCALE_BYTES  # a scale per output channel


def test_conv_filter_and_activations(tmp_path):
    path = tmp_path / "c.tflite"
    _tiny_tflite.make_conv(path)
    data = path.read_bytes()
    parts = litert_parts(read_tflite(data), len(data))
    assert parts.packed == 5 * 3 * 3 * 4 * 4 + 5 * 4  # OHWI filter, float32, and its bias
    assert parts.peak == 6 * 6 * (4 + 5) * 4  # input and output of the one CONV_2D
    assert parts.peak_builtin == parts.peak + 6 * 6 * (3 * 3 * 4) * 4  # and the built-in kernel's im2col
    im2col = (parts.peak_builtin - parts.peak) * ARENA_FACTOR / MB
    builtin_arena = parts.mb("builtin") - (parts.model + parts.tables) / MB
    assert builtin_arena == pytest.approx(parts.peak * ARENA_FACTOR / MB + INTERPRETER_MB + im2col)
    assert parts.mb("hybrid") - parts.mb("rebuild") == pytest.approx(builtin_arena)  # hybrid: both interpreters


def test_backend_reports_the_prediction_per_strategy(tmp_path):
    path, _ = _mlp(tmp_path)
    data = path.read_bytes()
    parts = litert_parts(read_tflite(data), len(data))
    for strategy in ("hybrid", "rebuild", "builtin"):
        with Runtime(path, backend="tflite", strategy=strategy) as rt:
            assert rt.footprint["predicted_mb"] == pytest.approx(parts.mb(strategy), abs=1e-3)  # arena padding
            assert rt.backend.predicted_mb("builtin") < rt.backend.predicted_mb("rebuild")
            assert rt.backend.predicted_mb("rebuild") < rt.backend.predicted_mb("hybrid")


def test_builtin_kernels_only_pack_nothing(tmp_path):
    """``providers=["CPU"]``: every interpreter runs the built-in kernels, so no strategy holds a packed copy."""
    path = tmp_path / "c.tflite"
    _tiny_tflite.make_conv(path)
    data = path.read_bytes()
    xnn, cpu = litert_parts(read_tflite(data), len(data)), litert_parts(read_tflite(data), len(data), xnnpack=False)
    assert cpu.packed == 0 and cpu.peak == cpu.peak_builtin == xnn.peak_builtin
    assert cpu.mb("rebuild") == pytest.approx(xnn.mb("builtin"))
    with Runtime(path, backend="tflite", strategy="rebuild", providers=["CPU"]) as rt:
        assert rt.backend.providers == ["CPU"]
        assert rt.footprint["predicted_mb"] == pytest.approx(cpu.mb("rebuild"), abs=1e-3)


def _adapter(info, seed: int, name: str) -> Adapter:
    rng = np.random.default_rng(seed)
    tensors, shapes = {}, {}
    for k, t in info.tensors.items():
        size = int(np.prod(t.shape))
        flat = np.sort(rng.choice(size, max(2, size // 3), replace=False))
        idx = np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)
        tensors[k], shapes[k] = SparseDelta(idx, (rng.standard_normal(flat.size) * 1e-2).astype(np.float32)), t.shape
    return Adapter(name, info.fingerprint, tensors, shapes)


def _profile(memory_mb: float):
    p = load_profile("x86-dev")
    return replace(p, budgets=replace(p.budgets, memory_mb=memory_mb))


def test_budget_refuses_an_adapter_the_file_size_stand_in_admitted(tmp_path):
    """The file's size plus 1.5 adapters: the stand-in left room for one; the predicted footprint (XNNPACK's packed
    copy and the arenas on top of the file) leaves none, and says where the figure comes from."""
    path, info = _mlp(tmp_path)
    with Runtime(path, backend="tflite") as free:
        free.load_adapter(_adapter(info, 1, "p"))  # named as short as "a": its name counts
        one = free.footprint["adapters_mb"] * MB  # its data and the objects holding it, as the budget counts
    file_mb = path.stat().st_size / MB
    with Runtime(
        path,
        backend="tflite",
        strategy="hybrid",
        device=_profile(file_mb + 1.5 * one / MB),
        enforce_memory_budget=False,
    ) as rt:
        assert rt.footprint["predicted_mb"] > file_mb + 1.5 * one / MB  # the model alone is over it: since ...
    with pytest.raises(ConfigError, match=r"strategy 'hybrid' would take [\d.]+ MB .* \(predicted\)"):
        Runtime(path, backend="tflite", strategy="hybrid", device=_profile(file_mb + 1.5 * one / MB))  # ... refused
    predicted = litert_parts(read_tflite(path.read_bytes()), path.stat().st_size).mb("hybrid")
    with Runtime(path, backend="tflite", strategy="hybrid", device=_profile(predicted + 1.5 * one / MB)) as rt:
        rt.load_adapter(_adapter(info, 1, "a"))
        assert rt.footprint["room_mb"] == pytest.approx(rt.footprint["budget_mb"] - predicted - one / MB, abs=1e-3)
        with pytest.raises(ConfigError, match=r"the model takes [\d.]+ MB \(predicted for strategy hybrid\)"):
            rt.load_adapter(_adapter(info, 2, "b"))
        assert rt.adapters == ["a"]


def test_auto_refusal_offers_litert_s_own_lightest_strategy(tmp_path):
    """Under strategy auto a refusal's hint names the backend's lightest strategy and what it frees: LiteRT's
    ``builtin`` (no packed copy), not onnxruntime's ``bound``; the refusal still names the budget and the figures."""
    path, info = _mlp(tmp_path)
    parts = litert_parts(read_tflite(path.read_bytes()), path.stat().st_size)
    with Runtime(path, backend="tflite", device=_profile(parts.mb("hybrid") + 1e-4)) as rt:
        assert rt.backend.strategy == "hybrid"
        with pytest.raises(ConfigError, match=r"memory budget .* \(predicted for strategy hybrid\)") as e:
            rt.load_adapter(_adapter(info, 1, "a"))
        freed = parts.mb("hybrid") - parts.mb("builtin")
        assert f"run strategy builtin (strategy: builtin in the profile's backend: {freed:.3f} MB less)" in str(e.value)
        assert "bound" not in str(e.value) and rt.adapters == []
        with pytest.raises(ConfigError, match="unknown tflite strategy 'bound'"):
            rt.backend.predicted_mb("bound")


def test_auto_takes_the_first_strategy_the_budget_admits(tmp_path):
    path, _ = _mlp(tmp_path)
    parts = litert_parts(read_tflite(path.read_bytes()), path.stat().st_size)
    between = (parts.mb("builtin") + parts.mb("rebuild")) / 2
    with Runtime(path, backend="tflite", device=_profile(parts.mb("hybrid") + 1)) as rt:
        assert rt.backend.strategy == "hybrid"
    with Runtime(path, backend="tflite", device=_profile(between)) as rt:
        assert rt.backend.strategy == "builtin"
    with pytest.raises(ConfigError, match=r"no tflite strategy fits the memory budget .* builtin [\d.]+ MB"):
        Runtime(path, backend="tflite", device=_profile(parts.mb("builtin") * 0.99))


def test_profile_names_the_prediction(tmp_path, capsys):
    """`edge profile` on a .tflite weighs the predicted footprint, and its report says "predicted"."""
    path, info = _mlp(tmp_path)
    _adapter(info, 1, "a").save(tmp_path / "a.safetensors")
    data = yaml.safe_load(open(load_profile("x86-dev").source).read())
    data.update(name="roomy", budgets={**data["budgets"], "memory_mb": 64})
    (tmp_path / "roomy.yaml").write_text(yaml.safe_dump(data))
    argv = ["profile", str(path), "--device", "roomy", "--devices-dir", str(tmp_path), "--backend", "tflite"]
    argv += ["--runs", "3", "--warmup", "1", "--switches", "1", "--engine-rounds", "0", "-q"]
    argv += ["--adapters", str(tmp_path / "a.safetensors"), "--json", str(tmp_path / "p.json")]
    assert main([*argv, "--md", str(tmp_path / "p.md")]) == 0
    import json

    mem = json.loads((tmp_path / "p.json").read_text())["memory"]
    with Runtime(path, backend="tflite") as rt:
        assert mem["predicted_mb"] == pytest.approx(rt.backend.predicted_mb(), abs=1e-3)
    assert mem["predicted_mb"] > path.stat().st_size / MB
    assert "| model (predicted) + 1 adapter(s) held" in (tmp_path / "p.md").read_text()
