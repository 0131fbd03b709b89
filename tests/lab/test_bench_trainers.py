"""The trainer comparison of ``edge bench update`` (lab.bench_trainers) on a tiny digits CNN; no torch on the device."""

from __future__ import annotations

import numpy as np
import pytest

from edge.errors import ConfigError, EdgeError

pytest.importorskip("torch")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    import torch

    from exporters.onnx import export_onnx
    from lab import digits_model as dm
    from lab.datasets import load_domains

    domains = load_domains(("invert",), seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = dm.pretrain(
            domains["clean"], epochs=4, lr=1e-2, batch_size=64, arch="cnn", width=8, hidden=16, progress=False
        )
        root = tmp_path_factory.mktemp("trainers")
        dm.save_checkpoint(model, root / "encoder.safetensors")
        export_onnx(
            model,
            (torch.as_tensor(domains["clean"].x_test[:4]),),
            root / "encoder.onnx",
            input_names=["pixels"],
            output_names=["logits", "features"],
            name="tiny-cnn",
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    return root, domains["invert"]


def test_same_tail_same_steps_and_no_torch_on_the_device(cnn):
    from lab.bench_trainers import Encoder, TrainerConfig, compare_trainers, markdown

    root, d = cnn
    rng = np.random.default_rng(0)
    idx = rng.choice(len(d.x_train), 64, replace=False)
    cfg = TrainerConfig(runs=((0.5, 256), (0.5, 16)), epochs=30, seeds=(0, 1))
    r = compare_trainers(
        {"cnn": Encoder(root / "encoder.onnx", root / "encoder.safetensors")},
        {"invert": (d.x_train[idx], d.y_train[idx])},
        {"invert": (d.x_test, d.y_test)},
        cfg,
    )
    e = r["encoders"]["cnn"]
    assert e["targets"] == ["pre.weight", "head.weight"] and e["torch_imported_on_device"] is False
    full, mini = e["summary"]
    assert (full["batch"], mini["batch"]) == (256, 16)
    assert full["seeds"] == [0] and mini["seeds"] == [0, 1]  # full batch: the seed changes nothing
    assert len(e["rows"]) == 3 and len(mini["ratio_per_seed"]) == 2
    assert mini["ratio_worst_seed"] == min(mini["ratio_per_seed"])
    assert full["mask_overlap"] == 1.0 and mini["mask_overlap"] == 1.0
    # full-batch steps: the same adapter up to float32 vs float64, so the same accuracy and loss
    assert full["acc_device"] == pytest.approx(full["acc_host"], abs=0.01)
    assert full["loss_device"] == pytest.approx(full["loss_host"], rel=1e-3)
    assert full["host_gain"] > 0.1 and full["ratio"] == pytest.approx(1.0, abs=0.05)
    for s in (full, mini):  # both trained, to comparable losses (minibatches: different shuffles)
        assert s["loss_device"] < 0.7 * s["loss_base"] and s["loss_host"] < 0.7 * s["loss_base"]
    assert abs(mini["loss_device"] - mini["loss_host"]) < 0.1 * mini["loss_base"]
    assert all(row["seconds_device"] > 0 and row["seconds_host"] > 0 for row in e["rows"])
    assert r["samples"] == 64 and r["met"] == all(s["ratio_worst_seed"] >= 0.9 for s in e["summary"])
    text = markdown(r)
    assert "| cnn | `pre.weight`, `head.weight` | 0.5 | 256 | 1 |" in text and "no torch imported (none)" in text


def test_a_failing_child_is_named(cnn, tmp_path):
    from lab.bench_trainers import Encoder, TrainerConfig, compare_trainers

    root, d = cnn
    with pytest.raises(EdgeError, match="the device trainer on .*missing.onnx failed"):
        compare_trainers(
            {"cnn": Encoder(tmp_path / "missing.onnx", root / "encoder.safetensors")},
            {"invert": (d.x_train[:8], d.y_train[:8])},
            {"invert": (d.x_test, d.y_test)},
            TrainerConfig(runs=((0.5, 8),), epochs=1),
        )
    with pytest.raises(ConfigError, match="runs must be"):
        TrainerConfig(runs=((0.0, 8),))
