"""The demo's second encoder family: the digits CNN built, exported, adapted and run through the stream.

One short pipeline (a few epochs, two shifted domains) is built once per module in a
temporary cache; every test reads it.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge.errors import ConfigError

pytest.importorskip("torch")
pytest.importorskip("sklearn")

SHORT = {"pretrain_epochs": 12, "shira_epochs": 6, "domains": ("rotate", "invert")}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import torch

    from lab.datasets import load_domains
    from lab.pipeline import DemoConfig, prepare_demo

    cfg = DemoConfig(model="cnn", **SHORT)
    threads = torch.get_num_threads()
    art = prepare_demo(tmp_path_factory.mktemp("cache"), cfg, progress=False)
    assert torch.get_num_threads() == threads  # trained on one thread, then given back
    return cfg, art, load_domains(cfg.domains, seed=cfg.seed)


def test_config_defaults_per_model_and_key():
    from lab.pipeline import MODEL_DEFAULTS, DemoConfig

    vit, cnn = DemoConfig(), DemoConfig(model="cnn")
    assert vit.targets == MODEL_DEFAULTS["vit"]["targets"] and vit.density == 0.02
    assert cnn.targets == MODEL_DEFAULTS["cnn"]["targets"] and cnn.density == 0.15
    assert DemoConfig(model="cnn", density=0.05).density == 0.05
    assert cnn.key() != vit.key() and cnn.name == "digits-cnn"
    with pytest.raises(ConfigError, match="unknown demo model 'resnet'.*cnn"):
        DemoConfig(model="resnet")


def test_checkpoint_keeps_the_family(demo, tmp_path):
    from lab import digits_model as dm
    from lab.digits_cnn import DigitsCNN

    _, art, domains = demo
    model = dm.load_checkpoint(art.model.parent / "encoder.safetensors")
    assert isinstance(model, DigitsCNN)
    clean = domains["clean"]
    assert dm.evaluate(model, clean.x_test, clean.y_test) > 0.85
    with pytest.raises(ConfigError, match="unknown digits encoder"):
        dm.build("mlp")


def test_exported_cnn_has_conv_targets_stage_taps_and_a_trainable_tail(demo):
    import onnx

    from edge.learn.device_trainer import DeviceTrainer
    from edge.learn.space import candidates
    from edge.learn.tail import TAIL_SPACE
    from edge.route.taps import resolve_taps

    _, art, _ = demo
    shapes = {k: t.shape for k, t in art.info.tensors.items()}
    assert art.info.name == "digits-cnn" and art.lowbit_model is None
    assert shapes["dw1.conv.weight"] == (24, 1, 3, 3) and shapes["pw2.conv.weight"] == (48, 48, 1, 1)
    proto = onnx.load(str(art.model))
    stages, declared = resolve_taps(proto, "stages"), art.info.extra["taps"]
    assert resolve_taps(proto, "auto") == declared and len(declared) == len(stages) == 2
    pool = next(n for n in proto.graph.node if n.output[0] == declared[1])  # the model's own global average pool
    assert declared[0] == stages[0] and pool.op_type == "ReduceMean" and pool.input[0] == stages[1]
    trainer = DeviceTrainer(art.model, art.info)
    assert trainer.params == ("pre.weight", "head.weight")
    device = {"infer_ms": 0.1, "switch_ns_per_entry": 100.0}
    from edge.learn.space import Budget

    layers = {c.arch.layers: c.targets for c in candidates(art.info, Budget(), device, TAIL_SPACE)}
    assert layers == {"tail-head": ("head.weight",), "tail": ("pre.weight", "head.weight")}


def test_conv_adapters_switch_on_the_runtime_and_match_torch(demo):
    import torch

    from edge.format.adapter import load_adapter
    from edge.runtime import Runtime
    from lab import digits_model as dm

    _, art, domains = demo
    model = dm.load_checkpoint(art.model.parent / "encoder.safetensors")
    x = domains["rotate"].x_test[:64]
    with Runtime(art.model, strategy="bound") as rt:
        base = rt.run({"pixels": x})["logits"]
        for name, path in art.adapters.items():
            a = load_adapter(path)
            assert any(len(a.shapes[t]) == 4 for t in a.tensors), "SHiRA adapts the convolutions too"
            rt.load_adapter(a, name=name)
            rt.switch(name)
            got = rt.run({"pixels": x})["logits"]
            merged = {k: v.clone() for k, v in model.state_dict().items()}
            for t, d in a.tensors.items():
                merged[t][tuple(torch.as_tensor(d.indices, dtype=torch.long))] += torch.as_tensor(d.values)
            ref = type(model)(**model.config)
            ref.load_state_dict(merged)
            with torch.no_grad():
                want = ref.eval()(torch.as_tensor(x))[0].numpy()
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
            assert np.abs(got - base).max() > 1e-3
        rt.switch(None)
        assert np.array_equal(rt.run({"pixels": x})["logits"], base)
    host = load_adapter(art.adapters["invert"]).info["host_acc"]
    assert host["adapter"] > host["base"] + 0.2


def test_stream_on_the_cnn_detects_grows_and_routes(demo):
    from edge.route.router import RouterConfig
    from lab.stream import StreamConfig, run_stream

    _, art, domains = demo
    cfg = StreamConfig(sequence=("clean", "rotate", "invert"), known=("rotate",), segment=192, background=False)
    r = run_stream(
        art.model,
        art.adapters,
        art.model.parent / "encoder.safetensors",
        domains,
        cfg,
        router_config=RouterConfig(novel_buffer=160, seed=0),
        progress=False,
    )
    assert r["model"] == "digits-cnn" and r["scoring"] == "graph" and len(r["taps"]) == 2
    (g,) = r["growth"]
    assert g["truth"] == "invert" and g["chosen"]["arch"].split("/")[1].split("@")[0] in ("tail-head", "tail")
    final = {f["domain"]: f for f in r["final"]}
    assert final["invert"]["served_mostly_by"] == "new-1"
    assert final["invert"]["acc"] > final["invert"]["base_acc"] + 0.3
    assert final["rotate"]["served_mostly_by"] == "rotate" and final["clean"]["served_mostly_by"] == "clean"
    assert r["final_routing"]["routing_served"] > 0.8 and r["final_routing"]["known_rejected"] < 0.15
    assert r["overall"]["acc"] > r["overall"]["base_acc"] + 0.1


def test_grow_on_host_is_refused_for_the_cnn(tmp_path):
    import argparse

    from lab.stream import cli

    args = argparse.Namespace(model="cnn", seed=0, grow_on="host", cache=tmp_path, quiet=True)
    with pytest.raises(ConfigError, match="grow on the device"):
        cli(args)
