"""What a model's load leaves for later (M20) still behaves as before: the engine cache's measuring names, an
adapter's size limit, output names, signatures and file writes.

:mod:`edge.engine_cache` imports :mod:`edge.engines` at the first choice that measures (a test may still replace
one of its names); :mod:`edge.adapters_held` imports the adapter format and the fusion at the first adapter;
``plain_name`` lives in :mod:`edge.format.feeds` (re-exported by :mod:`edge.fusion`); tempfile and base64 are imported
by the write or the signature that needs them. Which modules a load imports: tests/device/test_coldstart_cli.py.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from _blocking import ROOT

from edge.errors import ConfigError, FormatError

GOLDEN = ROOT / "tests" / "golden"


def test_the_engine_cache_names_are_the_engines_own_and_a_test_can_still_replace_one(monkeypatch):
    from edge import engine_cache as ec
    from edge import engine_choice, engines

    assert ec.decide is engines.decide and ec.find_engines is engines.find_engines  # on first use, edge.engines'
    assert engines.EngineChoice is engine_choice.EngineChoice is ec.EngineChoice and engines.MARGIN == 0.03
    assert ec.cached_engine.__kwdefaults__["margin"] == engines.MARGIN
    monkeypatch.setattr(ec, "decide", "replaced")
    assert ec.decide == "replaced" and ec._m("decide") == "replaced"  # what the choice calls: the replacement
    monkeypatch.undo()
    with monkeypatch.context() as m:  # replaced on edge.engines: read there on each call, nothing copied goes stale
        m.setattr(engines, "compare_engines", "elsewhere")
        assert ec._m("compare_engines") == "elsewhere"
    assert ec._m("compare_engines") is engines.compare_engines
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ec.nope  # noqa: B018


def test_an_explicit_choice_is_the_same_as_before():
    from edge.engine_cache import explicit_engine

    c = explicit_engine("onnxruntime", GOLDEN / "tiny-mlp-v1.onnx", given=False)
    assert (c.backend, c.path.name, c.comparison, dict(c.skipped), c.twins) == (
        "onnxruntime",
        "tiny-mlp-v1.onnx",
        None,
        {},
        (),
    )
    assert c.reason == "onnxruntime: the engine of .onnx files (no device profile), not measured"
    with pytest.raises(ConfigError, match="is a .onnx file, which backend 'onnxruntime' runs, not 'tflite'"):
        explicit_engine("tflite", GOLDEN / "tiny-mlp-v1.onnx")


def test_the_adapter_size_limit_computed_at_the_first_adapter_equals_the_one_set_at_load():
    from edge import Runtime
    from edge.format.adapter import max_adapter_bytes

    with Runtime(GOLDEN / "tiny-mlp-v1.onnx") as rt:
        want = max_adapter_bytes(rt.info)
        assert want > 0
        rt._max_adapter_bytes = None  # as a runtime that leaves it to the first adapter file
        assert rt.load_adapter(GOLDEN / "adapter-v1.safetensors") == "golden-a"
        assert rt._max_adapter_bytes == want
        x, param = np.ones((1, 10), np.float32), sorted(rt.info.tensors)[0]
        base, w = rt.run({"x": x})["logits"], rt.weights(param)
        rt.switch("golden-a")
        assert not np.array_equal(rt.weights(param), w) and not np.allclose(rt.run({"x": x})["logits"], base)
        rt.switch(None)
        assert np.array_equal(rt.weights(param), w)  # bit-exact undo
        assert np.allclose(rt.run({"x": x})["logits"], base, rtol=1e-6, atol=1e-6)
        rt.unload_adapter(np.str_("golden-a"))  # a str subclass: taken as its plain characters
        assert rt.adapters == []
        with pytest.raises(ConfigError, match="adapter 'golden-a' is not loaded"):
            rt.adapter("golden-a")


def test_plain_name_moved_to_feeds_is_fusions_own_and_output_names_are_checked_as_before():
    from edge import Runtime, fusion
    from edge.format import feeds

    assert fusion.plain_name is feeds.plain_name
    assert feeds.plain_name(np.str_("a")) == "a" and type(feeds.plain_name(np.str_("a"))) is str
    with pytest.raises(ConfigError, match="output name must be a string, got int 3"):
        feeds.plain_name(3, "output name")
    with Runtime(GOLDEN / "tiny-mlp-v1.onnx") as rt:
        assert list(rt.run({"x": np.ones((1, 10), np.float32)}, outputs=[np.str_("logits")])) == ["logits"]
        with pytest.raises(ConfigError, match=r"\['nope'\] are not outputs of"):
            rt.run({"x": np.ones((1, 10), np.float32)}, outputs=["nope"])


def test_a_bad_model_file_is_still_refused_when_the_runtime_is_built(tmp_path):
    from edge import Runtime

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x0a\xff\xff\xff\xff\x0f not a model")
    with pytest.raises(FormatError):
        Runtime(bad)


def test_writes_and_channel_scales_import_what_they_need_on_first_use(tmp_path):
    from edge.format.io import atomic_write_bytes, check_writable
    from edge.format.modelinfo import ModelInfo

    out = atomic_write_bytes(tmp_path / "a" / "f.bin", b"abc")
    assert out.read_bytes() == b"abc" and check_writable(tmp_path / "b" / "g.bin") == tmp_path / "b" / "g.bin"
    from runtimes import read_model_info

    info = read_model_info(GOLDEN / "tiny-mlp-v1.onnx")
    name, t = next(iter(info.tensors.items()))
    scale = tuple(float(v) for v in np.linspace(0.5, 2.0, t.shape[0], dtype=np.float32))
    scaled = replace(info, tensors={**info.tensors, name: replace(t, channel_scale=scale)})
    assert ModelInfo.from_json(scaled.to_json()).tensors[name].channel_scale == scale  # base64 both ways
