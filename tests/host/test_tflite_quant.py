"""LiteRT int8 bases with fused integer SHiRA adapters (issue 18): export, integer arena, switch and undo.

The demo ViT and CNN (random weights) and one Hugging Face family (DistilBERT, tiny config) are
exported with :func:`exporters.export_tflite`, quantized with :func:`exporters.tflite_quant.quantize_tflite`
(the AI Edge Quantizer: dynamic-range int8 and full integer), and an integer adapter is switched in on every
strategy: the int8 entries read back are the adapter's, the outputs equal a fresh interpreter over the file
with those integers written in, and undo restores every byte. Needs litert-torch and ai-edge-quantizer, which
only the TFLite venv has::

    make test-tflite
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip(
    "litert_torch",
    reason="TFLite export needs litert-torch, which the main .venv does not have: run `make test-tflite`",
)
pytest.importorskip("ai_edge_quantizer", reason="TFLite quantization needs ai-edge-quantizer: run `make test-tflite`")

from edge.errors import ConfigError, FormatError  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.format.tflite import read_tflite  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from exporters.qshira import int_shira_adapter, train_shira_int  # noqa: E402
from exporters.shira import make_masks, select_targets  # noqa: E402
from exporters.tflite import export_tflite  # noqa: E402
from exporters.tflite_quant import quantize_tflite, tflite_activation_grid, tflite_quantized_base  # noqa: E402
from runtimes.base import BackendOptions  # noqa: E402
from runtimes.litert import LiteRTBackend  # noqa: E402

STRATEGIES = ("hybrid", "rebuild", "builtin")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The demo ViT and CNN, random weights, exported to .tflite (batch 1), and calibration digits."""
    from lab import digits_model as dm

    d = tmp_path_factory.mktemp("tq")
    rng = np.random.default_rng(0)
    data = rng.random((32, 1, 8, 8)).astype(np.float32)
    out = {}
    for arch in ("vit", "cnn"):
        torch.manual_seed(0)
        model = dm.build(arch).eval()
        with torch.no_grad():  # BatchNorm statistics far from the identity: the fold shows in every conv filter
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.running_var.uniform_(0.5, 2.0)
        path = d / f"{arch}.tflite"
        export_tflite(
            model,
            (torch.as_tensor(data[:1]),),
            path,
            name=arch,
            input_names=["pixels"],
            output_names=["logits", "features"],
        )
        out[arch] = (model, path)
    return out, data


def int_adapter(path, seed: int = 0, n: int = 6, where: dict | None = None) -> tuple[Adapter, dict]:
    """A random integer adapter on every quantized target of ``path``: ``n`` entries moved by whole steps
    (``where``: only these targets, each among the given flat indices)."""
    info, base = tflite_quantized_base(path)
    rng = np.random.default_rng(seed)
    tensors, want = {}, {}
    for k, b in base.items():
        if where is not None and k not in where:
            continue
        pool = np.arange(b.q.size) if where is None else np.asarray(where[k])
        flat = rng.choice(pool, size=min(n, pool.size), replace=False)
        idx = np.stack(np.unravel_index(flat, b.q.shape)).astype(np.int32)
        old = b.q[tuple(idx)].astype(np.int64)
        new = np.clip(old + rng.integers(-20, 21, old.size), -127, 127).astype(np.int8)
        scale = np.broadcast_to(b.scale, b.q.shape)[tuple(idx)]
        tensors[k] = SparseDelta(idx, ((new - old) * scale).astype(np.float32), new)
        want[k] = (idx, new)
    shapes = {k: tuple(info.tensors[k].shape) for k in tensors}
    return Adapter("ints", info.fingerprint, tensors, shapes, method="shira"), want


def merged_file(path, info, want) -> bytes:
    """The quantized file with the adapter's integers written into its int8 tensors (the reference)."""
    data = bytearray(path.read_bytes())
    fb = read_tflite(bytes(data))
    by_name = {t.name: t for t in fb.tensors}
    for k, (idx, new) in want.items():
        t = info.tensors[k]
        st = by_name[t.initializer]
        stored = np.frombuffer(data, np.int8, st.nbytes, st.start)
        src = t.from_stored(stored)
        src[tuple(idx)] = new
        data[st.start : st.start + st.nbytes] = t.to_stored(src).astype(np.int8).tobytes()
    return bytes(data)


def reference(data: bytes, strategy: str, feeds) -> dict:
    ref = LiteRTBackend(data, BackendOptions(strategy=strategy, verify=False))
    try:
        return ref.run(feeds)
    finally:
        ref.close()


def switch_and_undo(path, feeds, strategies=STRATEGIES, where: dict | None = None) -> None:
    """On each strategy: the adapter's integers land, outputs equal the merged file's, undo is bit-exact."""
    adapter, want = int_adapter(path, where=where)
    info = tflite_quantized_base(path)[0]
    merged = merged_file(path, info, want)
    for strategy in strategies:
        with Runtime(path, backend="tflite", strategy=strategy) as rt:
            before = {k: rt.weights(k).copy() for k in want}
            base_out = rt.run(feeds)
            rt.load_adapter(adapter)
            rt.switch("ints")
            for k, (idx, new) in want.items():
                w = rt.weights(k)
                assert w.dtype == np.int8
                np.testing.assert_array_equal(w[tuple(idx)], new)
            rt.wait_settled(30)
            got = rt.run(feeds)
            kernels = "rebuild" if strategy == "hybrid" else strategy  # hybrid settles on a fresh XNNPACK build
            for name, want_out in reference(merged, kernels, feeds).items():
                np.testing.assert_array_equal(got[name], want_out, err_msg=f"{strategy}: {name}")
            assert any(np.any(got[n] != base_out[n]) for n in got)  # the switch changed the outputs
            rt.switch(None)
            rt.wait_settled(30)
            for k in want:
                np.testing.assert_array_equal(rt.weights(k), before[k])  # undo: every integer back
            for name, out in rt.run(feeds).items():
                np.testing.assert_array_equal(out, base_out[name])


@pytest.mark.parametrize("arch,per_channel", [("vit", True), ("cnn", True), ("vit", False), ("cnn", False)])
def test_dynamic_int8_maps_targets_and_switches_integer_adapters_on_every_strategy(digits, arch, per_channel, tmp_path):
    models, data = digits
    model, path = models[arch]
    out = tmp_path / "q.tflite"
    report = quantize_tflite(path, out, mode="dynamic", calib={"pixels": data}, headroom=2.0, per_channel=per_channel)
    q = report.info
    assert report.bytes_after < report.bytes_before and min(report.cosine.values()) > 0.98
    assert q.extra["quantization"]["float_fingerprint"] != q.fingerprint
    assert set(report.quantized) | set(report.float_targets) == set(q.tensors) and not report.dropped
    axes = {k: q.tensors[k].quant.axis for k in report.quantized}
    assert axes["head.weight"] == (0 if per_channel else None)  # FULLY_CONNECTED: per channel or per tensor
    # depthwise filters (the CNN's stem has one input channel: a depthwise conv) stay per channel: LiteRT's
    # dynamic-range depthwise kernel reads one scale per channel
    assert all(axes[k] is not None for k in axes if k.startswith(("dw", "stem")))
    if arch == "cnn":  # hybrid CONV_2D would cache row sums of its filter: 1x1 convs stay float targets
        assert any(k.startswith("pw") for k in report.float_targets)
        assert any(k.startswith("dw") for k in report.quantized)  # depthwise reads its int8 filter every run
    _, base = tflite_quantized_base(out)
    for b in base.values():  # headroom 2: the largest weight of each channel (or tensor) sits near half the range
        assert 50 <= int(np.abs(b.q).max()) <= 64
    with Runtime(out, backend="tflite") as rt:
        want = model(torch.as_tensor(data[:4]))[0].detach().numpy()
        got = rt.run({"pixels": data[:4]})["logits"]
        assert float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)) > 0.98
    switch_and_undo(out, {"pixels": data[:2]})


@pytest.mark.parametrize("arch,per_channel,headroom", [("vit", True, 1.0), ("cnn", True, 1.0), ("vit", False, 4.0)])
def test_full_integer_model_takes_int8_inputs_and_switches_on_every_strategy(
    digits, arch, per_channel, headroom, tmp_path
):
    models, data = digits
    _, path = models[arch]
    out = tmp_path / "s.tflite"
    report = quantize_tflite(
        path, out, mode="static", calib={"pixels": data}, per_channel=per_channel, headroom=headroom
    )
    assert not report.float_targets and len(report.quantized) == len(report.info.tensors)  # every op integer
    assert min(report.cosine.values()) > 0.98  # headroom: the int32 biases were rescaled with the weights
    _, base = tflite_quantized_base(out)
    for b in base.values():
        assert (b.scale.size > 1) == per_channel
        assert int(np.abs(b.q).max()) <= 127 / headroom + 1
    fb = read_tflite(out.read_bytes())
    x = next(t for t in fb.tensors if t.name == "pixels")
    assert x.dtype is np.int8 and x.scale  # full integer: the caller quantizes with the input's scale
    pixels = np.clip(np.round(data[:1] / x.scale[0]) + x.zero_point[0], -128, 127).astype(np.int8)
    switch_and_undo(out, {"pixels": pixels})


def test_int8_weights_under_a_caching_kernel_are_refused_for_in_place_strategies(digits, tmp_path):
    models, data = digits
    _, path = models["cnn"]
    out = tmp_path / "c.tflite"
    ops = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D")
    report = quantize_tflite(path, out, mode="dynamic", calib={"pixels": data}, op_types=ops)
    assert any(k.startswith("pw") for k in report.quantized)
    for strategy in ("hybrid", "builtin"):
        with pytest.raises(ConfigError, match="dynamic-range CONV_2D reads"):
            Runtime(out, backend="tflite", strategy=strategy)
    switch_and_undo(out, {"pixels": data[:1]}, strategies=("rebuild",))  # a rebuilt interpreter sees the write


def test_tampered_scale_and_bad_arguments_are_refused(digits, tmp_path):
    models, data = digits
    _, path = models["vit"]
    out = tmp_path / "q.tflite"
    report = quantize_tflite(path, out, mode="dynamic", check={"pixels": data[:1]})
    raw = bytearray(out.read_bytes())
    fb = read_tflite(bytes(raw))
    t = next(t for t in fb.tensors if t.name == report.info.tensors[report.quantized[0]].initializer)
    scale = np.float32(t.scale[0]).tobytes()
    at = bytes(raw).find(scale + np.float32(t.scale[1]).tobytes())
    assert at > 0
    raw[at : at + 4] = np.float32(t.scale[0] * 2).tobytes()  # one channel's scale doubled, the integers untouched
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="fingerprint"):
        Runtime(bad, backend="tflite")
    with pytest.raises(ConfigError, match="calib"):
        quantize_tflite(path, tmp_path / "x.tflite", mode="static", check={"pixels": data[:1]})
    with pytest.raises(ConfigError, match="headroom"):
        quantize_tflite(path, tmp_path / "x.tflite", mode="static", calib={"pixels": data}, headroom=0.5)
    with pytest.raises(ConfigError, match="quantized already"):
        quantize_tflite(out, tmp_path / "x.tflite", check={"pixels": data[:1]})
    assert not (tmp_path / "x.tflite").exists()


@pytest.mark.parametrize("arch", ["vit", "cnn"])
def test_integer_shira_trained_on_the_tflite_grid_is_what_the_device_writes(digits, arch, tmp_path):
    models, data = digits
    model, path = models[arch]
    out = tmp_path / "q.tflite"
    quantize_tflite(path, out, mode="dynamic", calib={"pixels": data}, headroom=4.0)
    qinfo, base = tflite_quantized_base(out)
    x = torch.as_tensor(data)
    y = (model(x)[0].argmax(1).numpy() + 1) % 10  # a shifted task to learn
    masks = make_masks(model, select_targets(model), density=0.1, kind="wm")
    trained = train_shira_int(model, masks, base, data, y, epochs=15, lr=2e-2)
    adapter = int_shira_adapter(trained, qinfo, "shift")
    weights = {k: torch.as_tensor(b.dequantized()) for k, b in base.items()}  # what training saw, in torch units
    with torch.no_grad():
        seen_base = torch.func.functional_call(model, weights, (x,))[0].numpy()
        for k, (idx, applied, _) in trained.items():
            start = weights.get(k, dict(model.named_parameters())[k].detach())
            weights[k] = start.index_put(tuple(torch.as_tensor(idx).long()), torch.as_tensor(applied), accumulate=True)
        seen_adapted = torch.func.functional_call(model, weights, (x,))[0].numpy()
    with Runtime(out, backend="tflite", strategy="builtin") as rt:
        got_base = rt.run({"pixels": data})["logits"]
        rt.load_adapter(adapter)
        rt.switch("shift")
        for k, (idx, _, qv) in trained.items():
            if qv is not None:
                np.testing.assert_array_equal(rt.weights(k)[tuple(idx)], qv)
        got = rt.run({"pixels": data})["logits"]
        rt.switch(None)
        for k, b in base.items():
            np.testing.assert_array_equal(rt.weights(k), b.q)
    for want, have in ((seen_base, got_base), (seen_adapted, got)):  # the device computes what training saw
        cos = float((want * have).sum() / np.linalg.norm(want) / np.linalg.norm(have))
        assert cos > 0.99, cos  # (activations quantized at run time by the dynamic-range kernels: not bit for bit)
    base_acc = float((got_base.argmax(1) == y).mean())
    assert float((got.argmax(1) == y).mean()) > base_acc + 0.2


@pytest.fixture(scope="module")
def distilbert(tmp_path_factory):
    """A tiny DistilBERT exported to .tflite (its word and position embeddings are EMBEDDING_LOOKUP ops), and
    calibration ids."""
    pytest.importorskip("transformers")
    from test_hf_families import SEQ, build

    from exporters.hf import export_hf_encoder

    model = build("distilbert")
    path = tmp_path_factory.mktemp("hf") / "m.tflite"
    info = export_hf_encoder(model, path, seq_len=SEQ, file_format="tflite")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, model.config.vocab_size, (8, SEQ)).astype(np.int32)
    return path, {k: (ids if "ids" in k else np.ones_like(ids)) for k in info.inputs}


WORDS = "distilbert.embeddings.word_embeddings.weight"


def table_rows(path, name: str, ids: np.ndarray) -> dict:
    """Flat indices of the rows ``ids`` of the table ``name`` (what a lookup of those ids reads)."""
    cols = tflite_quantized_base(path)[1][name].q.shape[1]
    return {name: (np.unique(ids)[:, None] * cols + np.arange(cols)).reshape(-1)}


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_hugging_face_encoder_int8_on_litert_with_an_int8_embedding_table(distilbert, mode, tmp_path):
    path, calib = distilbert
    out = tmp_path / "q.tflite"
    ops = None if mode == "dynamic" else ["FULLY_CONNECTED", "EMBEDDING_LOOKUP"]
    report = quantize_tflite(path, out, mode=mode, calib=calib, op_types=ops)
    assert len(report.quantized) >= 6 and min(report.cosine.values()) > 0.98  # on XNNPACK and built-in kernels
    # EMBEDDING_LOOKUP (in the dynamic default; static: the quantizer has no full-integer one, the table takes the
    # dynamic-range config): the table is int8 with one scale per row, proved by dequantizing like every target
    assert WORDS in report.quantized and WORDS not in report.float_targets
    assert report.info.tensors[WORDS].quant.axis == 0
    _, base = tflite_quantized_base(out)
    assert base[WORDS].scale.size == base[WORDS].q.shape[0]
    stored = next(t for t in read_tflite(out.read_bytes()).tensors if t.name == WORDS)
    assert stored.dtype is np.int8 and stored.nbytes == base[WORDS].q.size  # one byte an entry (float: four)
    feeds = {k: v[:1] for k, v in calib.items()}
    switch_and_undo(out, feeds)
    # entries on the rows the input looks up: the lookup kernel reads the int8 table in place on every strategy
    # (XNNPACK leaves EMBEDDING_LOOKUP to it), equal to a fresh interpreter on the merged file, undone bit-exactly
    switch_and_undo(out, feeds, where=table_rows(out, WORDS, feeds["input_ids"]))


def test_activation_grids_of_a_full_integer_model_are_its_ops_input_and_output_quantization(digits, tmp_path):
    models, data = digits
    for arch in ("vit", "cnn"):
        _, path = models[arch]
        quantize_tflite(path, tmp_path / "d.tflite", mode="dynamic", calib={"pixels": data})
        assert tflite_activation_grid(tmp_path / "d.tflite") == {}  # float activations: nothing to simulate
        report = quantize_tflite(path, tmp_path / "s.tflite", mode="static", calib={"pixels": data})
        grids = tflite_activation_grid(tmp_path / "s.tflite")
        assert set(grids) == set(report.quantized)
        fb = read_tflite((tmp_path / "s.tflite").read_bytes())
        by_name = {t.name: t for t in fb.tensors}
        for name, g in grids.items():
            t = report.info.tensors[name]
            op = next(op for op in fb.ops if by_name[t.initializer].index in op.inputs)
            x = fb.tensors[op.inputs[0]]
            assert g.op == ("Gemm" if op.code == 9 else "Conv")
            assert (g.input.scale, g.input.zero_point) == (np.float32(x.scale[0]), x.zero_point[0])
            assert (g.output is None) == (t.channel_scale is not None)  # a folded BatchNorm: output after it


def test_cnn_dynamic_depthwise_left_to_built_in_kernels_holds_xnnpack_to_one_thread(digits, tmp_path, caplog):
    """XNNPACK (ai-edge-litert 2.3.0) leaves the dynamic-range DEPTHWISE_CONV_2D to the built-in kernels, which
    collapse on 2 threads: the XNNPACK interpreter of such a model runs on 1 thread and the log says why;
    quantizing without the depthwise convs keeps XNNPACK's threads."""
    models, data = digits
    _, path = models["cnn"]
    runs = {}
    for op_types in (None, ("FULLY_CONNECTED",)):
        out = tmp_path / f"q{len(runs)}.tflite"
        quantize_tflite(path, out, mode="dynamic", calib={"pixels": data}, headroom=2.0, op_types=op_types)
        caplog.clear()
        with caplog.at_level("WARNING", logger="edge.runtimes.litert"):
            b = LiteRTBackend(out, BackendOptions(strategy="hybrid", threads=2))
        try:
            runs[op_types] = (b.interpreter_threads, " ".join(r.message for r in caplog.records))
        finally:
            b.close()
    held, why = runs[None]
    assert held == {"xnnpack": 1, "builtin": 1}
    assert "XNNPACK interpreter runs on 1 thread, not 2" in why and "DEPTHWISE_CONV_2D" in why
    held, why = runs[("FULLY_CONNECTED",)]
    assert held == {"xnnpack": 2, "builtin": 1}  # built-in: the adaptable 1x1 CONV_2D filters (conv.cc rule)
    assert "XNNPACK interpreter" not in why


def test_static_int8_on_some_ops_keeps_the_float_models_input_and_output_names(digits, tmp_path):
    """Quantizing only FULLY_CONNECTED, the quantizer renames an output it dequantizes (``logits`` ->
    ``logits_dequant``); the file keeps the float model's names, so the runtime and adapters find them."""
    models, data = digits
    model, path = models["vit"]
    out = tmp_path / "q.tflite"
    report = quantize_tflite(
        path, out, mode="static", calib={"pixels": data}, headroom=4.0, per_channel=False, op_types=["FULLY_CONNECTED"]
    )
    fb = read_tflite(out.read_bytes())
    names = [t.name for t in fb.tensors]
    assert [names[i] for i in fb.inputs] == ["pixels"] and [names[i] for i in fb.outputs] == ["logits", "features"]
    assert len(set(names)) == len(names)  # the inner tensor that held a name took the quantizer's in exchange
    assert report.quantized and all(k.endswith("weight") for k in report.quantized)
    with Runtime(out, backend="tflite") as rt:
        got = rt.run({"pixels": data[:4]})["logits"]
    want = model(torch.as_tensor(data[:4]))[0].detach().numpy()
    assert got.dtype == np.float32  # dequantized before the output: float logits
    assert float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)) > 0.95
