"""``lab.bench_quantized_core``: what the onnxruntime and LiteRT int8 benches share (no models run here)."""

from __future__ import annotations

import argparse
import json

import pytest

import lab.bench_quantized as bq
import lab.bench_quantized_core as core
import lab.bench_quantized_litert as bl


def test_each_backend_resolves_a_family_entry_over_demo_and_per_family_values():
    assert bq.ONNX.options("int8-static", "cnn")["headroom"] == 2.0  # {"vit": 4.0, "cnn": 2.0} resolved
    assert bq.ONNX.options("int8-static", "vit")["headroom"] == 4.0
    assert bq.ONNX.options("fp32", "vit") is None
    assert bl.LITERT.options("int8-static", "vit")["op_types"] == ["FULLY_CONNECTED"]  # the ViT's own entry
    assert "op_types" not in bl.LITERT.options("int8-static", "cnn")  # the CNN takes "demo"
    assert (bq.ONNX.name, bq.ONNX.strategy, bq.ONNX.builtin_strategy) == ("onnxruntime", "bound", None)
    assert (bl.LITERT.name, bl.LITERT.strategy, bl.LITERT.builtin_strategy) == ("tflite", "rebuild", "builtin")
    assert set(bq.ONNX.bases) == set(bl.LITERT.bases)  # one --bases choice list for both


def test_litert_minilm_bases_quantize_the_embedding_table():
    """Left float, the table kept the LiteRT int8 MiniLM at 58 MB and its switchable runtime above a plain fp32
    interpreter's memory (issue 18); both int8 recipes name EMBEDDING_LOOKUP, so their cache key is new too."""
    for base in ("int8-dynamic", "int8-static"):
        assert "EMBEDDING_LOOKUP" in bl.BASES[base]["minilm"]["op_types"]


class _Report:
    def __init__(self, options):
        self.options = options

    def as_dict(self):
        return {"options": self.options}


def test_a_quantized_model_is_made_once_per_fingerprint_options_and_version(tmp_path):
    src = tmp_path / "m.tflite"
    src.write_bytes(b"float")
    made = []

    def make(s, out, **options):
        made.append(options)
        out.write_bytes(b"int8")
        return _Report(options)

    opts = {"mode": "dynamic", "headroom": 4.0, "calib": "domains", "train_activations": True}
    out, report = core.cached_quantized(src, "sha256:a", opts, 1, tmp_path, make)
    assert out.suffix == ".tflite" and out.name.startswith("m.dynamic.") and out.read_bytes() == b"int8"
    assert made == [{"mode": "dynamic", "headroom": 4.0}]  # the bench's own keys are not the quantizer's
    assert report == {"options": made[0]} and json.loads(out.with_suffix(".json").read_text()) == report
    assert core.cached_quantized(src, "sha256:a", opts, 1, tmp_path, make)[0] == out and len(made) == 1  # cached
    others = [
        core.cached_quantized(src, "sha256:b", opts, 1, tmp_path, make)[0],  # another float model
        core.cached_quantized(src, "sha256:a", opts, 2, tmp_path, make)[0],  # another exporter version
        core.cached_quantized(src, "sha256:a", {**opts, "calib": "clean"}, 1, tmp_path, make)[0],  # a bench key
    ]
    assert len({out, *others}) == 4 and len(made) == 4


@pytest.mark.parametrize("module", [bq, bl])
def test_both_benches_take_the_same_flags_into_one_measure(module, monkeypatch):
    seen = {}

    def measure(be, cache, **kw):
        seen.update(be=be, cache=cache, **kw)
        return []

    monkeypatch.setattr(core, "measure", measure)
    ap = argparse.ArgumentParser()
    module.add_arguments(ap)
    args = ap.parse_args(["--bases", "fp32", "int8-static", "--rounds", "2", "--no-memory"])
    args.cache, args.threads, args.quiet = "/tmp/c", 2, True
    assert core.measure_args(bl.LITERT if module is bl else bq.ONNX, args) == []
    assert seen["models"] == ["vit", "cnn", "minilm"] and seen["bases"] == ["fp32", "int8-static"]
    assert (seen["rounds"], seen["runs"], seen["threads"], seen["memory"], seen["progress"]) == (2, 20, 2, False, False)
    assert str(seen["cache"]) == "/tmp/c"
