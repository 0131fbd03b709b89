"""A demo cache from before source fingerprints: its ONNX export is made again from the cached torch weights,
never retrained, and only when the new file stores the same tensors its adapters were made for."""

from __future__ import annotations

import json
import shutil

import pytest

from edge.errors import ConfigError

pytest.importorskip("torch")
pytest.importorskip("sklearn")

SHORT = {"pretrain_epochs": 2, "shira_epochs": 1, "domains": ("rotate",)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short CNN demo for the module (training is most of its cost)."""
    from lab.pipeline import DemoConfig, prepare_demo

    cache = tmp_path_factory.mktemp("demo") / "cache"
    prepare_demo(cache, DemoConfig(model="cnn", **SHORT), progress=False)
    return cache


@pytest.fixture()
def built(trained, tmp_path, monkeypatch):  # each test edits the export: a copy of the module's demo of its own
    from lab.pipeline import DemoConfig, prepare_demo

    cache = tmp_path / "cache"
    shutil.copytree(trained, cache)
    cfg = DemoConfig(model="cnn", **SHORT)
    with monkeypatch.context() as m:  # the copy is current: read, nothing trained again
        _refuse_training(m)
        art = prepare_demo(cache, cfg, progress=False)
    assert art.model.is_relative_to(cache)
    return cache, cfg, art


def _rewrite_info(path, **change) -> None:
    """Edit the ModelInfo stored in an ONNX file's metadata (as an older exporter would have written it)."""
    import onnx

    from edge.format.modelinfo import META_KEY

    proto = onnx.load(str(path))
    (prop,) = [p for p in proto.metadata_props if p.key == META_KEY]
    info = json.loads(prop.value)
    for key, value in change.items():
        if key == "source_fingerprint":
            if value is None:
                info["extra"].pop(key)
            else:
                info["extra"][key] = value
        else:
            info[key] = value
    prop.value = json.dumps(info)
    onnx.save(proto, str(path))


def _refuse_training(monkeypatch) -> None:
    from exporters import shira
    from lab import digits_model

    def refuse(*a, **k):
        raise AssertionError("the demo trained again")

    monkeypatch.setattr(digits_model, "pretrain", refuse)
    monkeypatch.setattr(shira, "train_shira", refuse)


@pytest.fixture()
def no_training(monkeypatch):
    _refuse_training(monkeypatch)


def test_an_export_without_source_fingerprint_is_made_again_and_keeps_its_adapters(built, no_training):
    from edge.format.adapter import load_adapter
    from exporters.onnx import load_model_info
    from lab.pipeline import prepare_demo

    cache, cfg, art = built
    root = art.model.parent
    before = load_model_info(art.model)
    source = before.extra["source_fingerprint"]
    _rewrite_info(art.model, source_fingerprint=None)  # a file exported before twins
    assert "source_fingerprint" not in load_model_info(art.model).extra
    kept = {p.name: p.stat().st_mtime_ns for p in (root / "encoder.safetensors", *art.adapters.values())}

    again = prepare_demo(cache, cfg, progress=False)
    info = load_model_info(again.model)
    assert info.extra["source_fingerprint"] == source and info.fingerprint == before.fingerprint
    assert info.extra["taps"] == before.extra["taps"]  # the CNN's declared taps are recorded again
    assert {p.name: p.stat().st_mtime_ns for p in (root / "encoder.safetensors", *again.adapters.values())} == kept
    assert load_adapter(again.adapters["rotate"]).base_fingerprint == info.fingerprint
    assert not list(root.glob(".encoder.reexport*")) and not list(root.glob("*.tmp"))
    assert prepare_demo(cache, cfg, progress=False).info == info  # current now: read, not exported again


def test_a_reexport_storing_other_tensors_keeps_the_cached_file(built, no_training, caplog):
    from lab.pipeline import prepare_demo

    cache, cfg, art = built
    _rewrite_info(art.model, source_fingerprint=None, fingerprint="sha256:" + "0" * 32)
    old = art.model.read_bytes()
    with caplog.at_level("WARNING", logger="lab.demo"):
        kept = prepare_demo(cache, cfg, progress=False)
    assert "stores other tensors" in caplog.text and "the cached file is kept" in caplog.text
    assert art.model.read_bytes() == old and kept.info.fingerprint == "sha256:" + "0" * 32
    assert not list(art.model.parent.glob(".encoder.reexport*"))


def test_an_export_from_other_weights_is_refused(built, no_training):
    from lab.pipeline import prepare_demo

    cache, cfg, art = built
    _rewrite_info(art.model, source_fingerprint="source:" + "1" * 32, fingerprint=art.info.fingerprint)
    with pytest.raises(ConfigError, match="exported from other weights .* move .* away"):
        prepare_demo(cache, cfg, progress=False)


def test_a_stale_tflite_twin_without_litert_torch_is_kept_with_a_warning(built, no_training, monkeypatch, caplog):
    import importlib.util

    import _tiny_tflite

    from lab.pipeline import prepare_demo

    pytest.importorskip("ai_edge_litert")
    cache, cfg, art = built
    twin = art.model.with_suffix(".tflite")
    _tiny_tflite.make_mlp(twin, seed=1)  # a .tflite with no source fingerprint (here: not even the same model)
    old = twin.read_bytes()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "litert_torch" else find_spec(n, *a))
    with caplog.at_level("WARNING", logger="lab.demo"):
        prepare_demo(cache, cfg, progress=False)
    assert twin.read_bytes() == old
    (record,) = [r for r in caplog.records if "lacks the source fingerprint" in r.getMessage()]
    assert "make demo-tflite" in record.getMessage() and str(twin) in record.getMessage()


@pytest.mark.parametrize("backend, why", [(None, "the engine of .onnx files"), ("auto", "the only engine")])
def test_the_demo_reports_the_engine_that_ran(built, backend, why):
    from lab.datasets import load_domains
    from lab.demo import evaluate_demo

    _, cfg, art = built
    result = evaluate_demo(art.model, art.adapters, load_domains(cfg.domains, seed=cfg.seed), backend=backend)
    assert result["backend"] == "onnxruntime" and why in result["engine"]
    assert 0 <= result["domains"][0]["adapter_acc"] <= 1
