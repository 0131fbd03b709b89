"""On the demo's dynamic-range int8 ViT (.tflite, a copy): LiteRT's built-in FULLY_CONNECTED kernel misreads -128 in
a symmetric int8 weight (TFLite's spec: [-127, 127]), so an integer adapter written by the old trainer (-128 in 20
entries: built-in vs XNNPACK logits 2.19 apart) is refused, and a rotate adapter in range (the old one kept in
range, the bench's retrained one where cached, and, slow, one retrained here) keeps built-in and XNNPACK as close
as the base model's own two kernels are (edge.format.qrange)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edge.errors import AdapterMismatchError
from edge.format.adapter import Adapter, SparseDelta, load_adapter
from edge.runtime import Runtime

VIT = Path.home() / ".cache" / "edge" / "digits-07d9c19ac5e7"
FOUND = sorted((VIT / "quantized").glob("encoder.dynamic.*.tflite")) if VIT.is_dir() else []


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A copy of the demo's dynamic-range int8 .tflite."""
    if not FOUND:
        pytest.skip(f"no dynamic int8 .tflite cached in {VIT} (run `edge bench quantized --backend tflite` once)")
    path = tmp_path_factory.mktemp("int8range-litert") / FOUND[0].name
    shutil.copyfile(FOUND[0], path)
    return path


def _beside(name: str) -> Path | None:
    """``{model}.{name}-rotate.safetensors`` beside the cached model (the newest, for a glob), or None."""
    found = sorted(FOUND[0].parent.glob(f"{FOUND[0].stem}.{name}-rotate.safetensors")) if FOUND else []
    return found[-1] if found else None


def _kept_in_range(a: Adapter) -> Adapter:
    """``a`` with -128 raised to -127: the least the new trainer changes (it keeps to the grid from the start)."""
    t = {
        k: SparseDelta(d.indices, d.values, np.maximum(d.qvalues, -127).astype(d.qvalues.dtype))
        for k, d in a.tensors.items()
    }
    return Adapter("rotate", a.base_fingerprint, t, dict(a.shapes), method=a.method)


def _gaps(path: Path, adapter: Adapter) -> tuple[float, float, float]:
    """Built-in vs XNNPACK (``rebuild``) logits on the base and with ``adapter``, and how far it moves them."""
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    out = {}
    for strategy in ("builtin", "rebuild"):
        with Runtime(path, strategy=strategy, threads=1) as rt:
            base = rt.run({"pixels": x})["logits"].copy()
            rt.load_adapter(adapter)
            rt.switch(adapter.name)
            out[strategy] = base, rt.run({"pixels": x})["logits"].copy()
    (bb, ab), (bx, ax) = out["builtin"], out["rebuild"]
    return float(np.abs(bb - bx).max()), float(np.abs(ab - ax).max()), float(np.abs(ax - bx).max())


def _check(path: Path, adapter: Adapter) -> None:
    q = np.concatenate([d.qvalues for d in adapter.tensors.values()])
    assert int(q.min()) >= -127 and int((q == -127).sum()) >= 1  # at the grid's end, not past it
    base_gap, gap, moved = _gaps(path, adapter)
    assert 0 < base_gap < 0.5
    assert moved > 10 * base_gap  # the adapter does change the outputs
    assert gap <= 2 * base_gap, (gap, base_gap)


def test_the_old_trainers_adapter_is_refused(demo):
    old = _beside("ishira")
    if old is None or not any((d.qvalues == -128).any() for d in load_adapter(old).tensors.values()):
        pytest.skip("no integer rotate adapter with -128 of the old trainer cached beside the model")
    with Runtime(demo, strategy="builtin") as rt, pytest.raises(AdapterMismatchError) as e:
        rt.load_adapter(old)
    msg = str(e.value)
    n = sum(int((d.qvalues == -128).sum()) for d in load_adapter(old).tensors.values())
    assert f"writes {n} entries outside their weight's range (symmetric int8" in msg and "edge bench quantized" in msg
    assert rt.adapters == []


@pytest.mark.parametrize("which", ["old-kept-in-range", "retrained-by-the-bench"])
def test_rotate_in_range_builtin_and_xnnpack_agree_as_on_the_base(demo, which):
    found = _beside("ishira") if which == "old-kept-in-range" else _beside("ishira[0-9]*")  # the trainer's version
    if found is None:
        pytest.skip(f"no {which} rotate adapter cached beside {FOUND[0].name}")
    a = load_adapter(found)
    _check(demo, _kept_in_range(a) if which == "old-kept-in-range" else a)


@pytest.mark.slow
def test_rotate_retrained_here_builtin_and_xnnpack_agree_as_on_the_base(demo):
    """The bench's recipe (mask, density) trained for 2 epochs at a high rate on 256 samples, so entries reach the
    grid's ends (~30 s: imports, data, training)."""
    import torch

    from exporters import shira
    from exporters.qshira import int_shira_adapter, train_shira_int
    from exporters.tflite_quant import tflite_quantized_base
    from lab import digits_model as dm
    from lab.datasets import load_domains
    from lab.pipeline import DemoConfig

    cfg = DemoConfig(model="vit")
    d = load_domains(["rotate"], seed=cfg.seed)["rotate"]
    model = dm.load_checkpoint(VIT / "encoder.safetensors")
    targets = shira.select_targets(model, list(cfg.targets))
    info, qbase = tflite_quantized_base(demo)
    assert {b.bounds for b in qbase.values()} == {(-127, 127)}  # LiteRT's int8 weights: symmetric
    masks = shira.make_masks(model, targets, density=cfg.density, kind=cfg.mask, calib=(d.x_train, d.y_train), seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = train_shira_int(model, masks, qbase, d.x_train[:256], d.y_train[:256], epochs=2, lr=0.2)
    finally:
        torch.set_num_threads(threads)
    _check(demo, int_shira_adapter(trained, info, "rotate"))
