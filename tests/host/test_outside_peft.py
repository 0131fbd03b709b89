"""Adapters made by the real ``peft`` library on models this project did not write, as a user brings them.

Models are Hugging Face classes built from configs with random weights (DistilBERT, GPT-2's Conv1D layers,
T5's encoder) and a plain MLP, exported by ``torch.onnx.export`` and made adapter-ready by ``import_onnx``;
BERT exported by this project's exporter with LoRA slots. Every accepted adapter must answer as PEFT's own
merged model (1e-5) and undo bit for bit; every refused one raises one typed line saying what to do. Low-bit
(1, 2, 4, 8 bits) and ComPEFT round trips run on imported adapters, and their hostile files are refused.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save, save_file  # noqa: E402

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.convert.peft import import_peft  # noqa: E402
from edge.errors import AdapterMismatchError, ConfigError, FormatError  # noqa: E402
from edge.format import quant  # noqa: E402
from edge.format.adapter import Adapter, DenseDelta, SparseDelta, adapter_from_bytes, load_adapter  # noqa: E402
from edge.format.compress import compeft, decompress, from_bytes, to_bytes  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

T = transformers
MODELS = {  # name -> (module, example input)
    "mlp": (lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)), (2, 8)),
    "cnn": (  # a 3x3 and a 1x1 convolution: PEFT's conv LoRA, A [r, in, kh, kw] and B [out, r, 1, 1]
        lambda: torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 1), torch.nn.Flatten()
        ),
        (2, 3, 5, 5),
    ),
    "gpt2": (
        lambda: T.GPT2Model(
            T.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
        ),
        (2, 6),
    ),
    "distilbert": (
        lambda: T.DistilBertModel(
            T.DistilBertConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16)
        ),
        (2, 6),
    ),
    "t5": (
        lambda: T.T5EncoderModel(T.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)),
        (2, 6),
    ),
}


class Wrap(torch.nn.Module):
    """The model with one tensor in and out, as a user exports it."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x) if isinstance(self.m, torch.nn.Sequential) else self.m(input_ids=x).last_hidden_state


def _model(kind: str):
    torch.manual_seed(0)
    return MODELS[kind][0]().eval()


def _x(kind: str) -> torch.Tensor:
    g, shape = torch.Generator().manual_seed(3), MODELS[kind][1]
    return torch.randn(shape, generator=g) if kind in ("mlp", "cnn") else torch.randint(2, 40, shape, generator=g)


def _out(model, x) -> np.ndarray:
    with torch.no_grad():
        return Wrap(model).eval()(x).numpy()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (torch model, adapter-ready .onnx from torch.onnx.export + import_onnx)."""
    root, out = tmp_path_factory.mktemp("outside-peft"), {}
    for kind in MODELS:
        model, raw, path = _model(kind), root / f"{kind}-raw.onnx", root / f"{kind}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Wrap(model),
                (_x(kind),),
                str(raw),
                dynamo=False,
                opset_version=17,
                input_names=["x"],
                output_names=["y"],
            )
        import_onnx(raw, path, state_dict={k: v.detach().numpy() for k, v in model.state_dict().items()})
        out[kind] = (model, path)
    return out


def _save_peft(model, config, folder: Path, seed: int = 5, **kw):
    """PEFT's own model with every trainable weight moved (seeded), saved; returns PEFT's merged model."""
    pm = peft.get_peft_model(copy.deepcopy(model), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in pm.parameters() if p.requires_grad):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(folder), **kw)
    return pm.merge_and_unload().eval()


def _lora(**kw):
    return peft.LoraConfig(init_lora_weights=False, **kw)


ACCEPTED = {  # name -> (model kind, PEFT config)
    "mlp-rslora": ("mlp", _lora(r=4, lora_alpha=3, use_rslora=True, target_modules=["0", "2"])),
    "cnn-conv-lora": ("cnn", _lora(r=2, lora_alpha=3, target_modules=["0", "2"])),  # was refused: not 2-D
    "mlp-shira": ("mlp", peft.ShiraConfig(r=1, target_modules=["0", "2"], random_seed=0)),
    # was refused as "trained on a different base": PEFT transposes an embedding's B @ A whatever fan_in_fan_out says
    "gpt2-embedding-and-conv1d-fan-in-fan-out": (
        "gpt2",
        _lora(r=2, lora_alpha=4, target_modules=["wte", "c_attn"], fan_in_fan_out=True),
    ),
    "gpt2-regex-all-linear": ("gpt2", _lora(r=2, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=True)),
    "distilbert-rank-alpha-pattern": (
        "distilbert",
        _lora(
            r=2, lora_alpha=4, target_modules=["q_lin", "v_lin"], rank_pattern={"q_lin": 3}, alpha_pattern={"v_lin": 7}
        ),
    ),
    "distilbert-shira": ("distilbert", peft.ShiraConfig(r=1, target_modules=["q_lin", "lin1"], random_seed=1)),
    "t5-regex": ("t5", _lora(r=3, lora_alpha=5, target_modules=r".*\.(k|wi)")),
    "t5-mica": ("t5", peft.LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights="mica")),
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_adapters_answer_as_peft_merged_and_undo_bit_exactly(models, tmp_path, name):
    kind, config = ACCEPTED[name]
    model, path = models[kind]
    merged = _save_peft(model, config, tmp_path / name)
    x = _x(kind)
    adapter = import_peft(tmp_path / name, path, lora_as="merged")
    with Runtime(path) as rt:
        y0 = rt.run({"x": x.numpy()})["y"]
        base = {t: rt.weights(t).copy() for t in adapter.tensors}
        rt.load_adapter(adapter, "peft")
        rt.switch("peft")
        rt.wait_settled(10)
        want = _out(merged, x)
        assert np.abs(want - y0).max() > 1e-2, "the adapter changes nothing: the case proves nothing"
        np.testing.assert_allclose(rt.run({"x": x.numpy()})["y"], want, atol=1e-5, rtol=0)
        rt.switch(None)
        rt.wait_settled(10)
        for t, w in base.items():
            np.testing.assert_array_equal(rt.weights(t), w, err_msg=t)
        np.testing.assert_array_equal(rt.run({"x": x.numpy()})["y"], y0)


def _lora_ga(model, folder):
    """LoRA-GA as PEFT runs it: gradients first, then an init that subtracts scaling * B @ A from the base weight."""
    from peft.tuners.lora.loraga import preprocess_loraga

    config = peft.LoraConfig(
        r=2, target_modules=["0", "2"], init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig()
    )
    m = copy.deepcopy(model)

    def step():
        m(torch.randn(4, 8, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()

    preprocess_loraga(m, config, step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _save_peft(m, config, folder)


REFUSED = {  # name -> (model kind, config or a function saving the folder, error, what the line must say)
    "dora": ("mlp", _lora(r=2, target_modules=["0"], use_dora=True), ConfigError, "use_dora=True is not supported"),
    "loha": ("mlp", peft.LoHaConfig(r=2, target_modules=["0"], init_weights=False), ConfigError, "'LOHA' is not sup"),
    "lokr": ("mlp", peft.LoKrConfig(r=2, target_modules=["0"], init_weights=False), ConfigError, "'LOKR' is not sup"),
    "ia3": ("mlp", peft.IA3Config(target_modules=["0"], feedforward_modules=[]), ConfigError, "'IA3' is not sup"),
    "bias-all": ("gpt2", _lora(r=2, target_modules=["c_attn"], fan_in_fan_out=True, bias="all"), ConfigError, "bias"),
    "bias-lora-only": ("mlp", _lora(r=2, target_modules=["0"], bias="lora_only"), ConfigError, "biases"),
    "modules-to-save": (
        "distilbert",
        _lora(r=2, target_modules=["q_lin"], modules_to_save=["v_lin"]),
        ConfigError,
        "modules_to_save",
    ),
    "kasa": ("mlp", _lora(r=2, target_modules=["0"], kasa_config=peft.KasaConfig()), ConfigError, "KaSA truncates"),
    "lora-ga": ("mlp", _lora_ga, ConfigError, "path_initial_model_for_weight_conversion"),
    "pickle": ("mlp", _lora(r=2, target_modules=["0"]), FormatError, "safe_serialization=True"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_adapters_say_what_to_do_in_one_line(models, tmp_path, name):
    kind, config, error, match = REFUSED[name]
    model, path = models[kind]
    folder = tmp_path / name
    if callable(config):
        config(model, folder)
    else:
        _save_peft(model, config, folder, safe_serialization=name != "pickle")
    with pytest.raises(error, match=match) as e:
        import_peft(folder, path)
    assert "\n" not in str(e.value)


# -- hostile PEFT folders --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "lora"
    _save_peft(models["mlp"][0], _lora(r=2, lora_alpha=4, target_modules=["0", "2"]), folder)
    return folder


def _copy(good: Path, d: Path, config=None, tensors=None) -> Path:
    d.mkdir()
    cfg = json.loads((good / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_bytes(
        config if isinstance(config, bytes) else json.dumps({**cfg, **(config or {})}).encode()
    )
    save_file(
        tensors if tensors is not None else load_file(good / "adapter_model.safetensors"),
        d / "adapter_model.safetensors",
    )
    return d


def _dup(t):
    k = "base_model.model.0.lora_A.weight"
    return {**t, "0.lora_A.weight": t[k] * 5}  # the same module again, without PEFT's wrapper prefix


def _wide(t):
    return {k: np.zeros((2, 11), np.float32) if k.endswith("0.lora_A.weight") else v for k, v in t.items()}


HOSTILE = {  # name -> (config edit, tensors edit, error, match)
    "config 2 MiB": (b'{"peft_type": "LORA", "x": "' + b"a" * (2 << 20) + b'"}', None, FormatError, "over the limit"),
    "config not JSON": (b"peft_type: LORA\n", None, FormatError, "not valid JSON"),
    "config key twice": (
        b'{"peft_type": "LORA", "use_dora": true, "use_dora": false}',
        None,
        FormatError,
        "duplicated",
    ),
    "unknown option set": ({"use_magic_scaling": True}, None, ConfigError, r"\['use_magic_scaling'\] are unknown"),
    "module stored twice": (None, _dup, FormatError, "stored twice"),
    "weights of another model": (None, _wide, AdapterMismatchError, r"is \(16, 11\), model .* has \(16, 8\)"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_peft_folders_are_refused(models, good, tmp_path, name):
    config, edit, error, match = HOSTILE[name]
    tensors = load_file(good / "adapter_model.safetensors")
    folder = _copy(good, tmp_path / "a", config, edit(tensors) if edit else None)
    with pytest.raises(error, match=match) as e:
        import_peft(folder, models["mlp"][1])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_link_to_dev_zero_is_named_as_one(models, good, tmp_path, name):
    folder = _copy(good, tmp_path / "a")
    (folder / name).unlink()
    (folder / name).symlink_to("/dev/zero")
    with pytest.raises(FormatError, match="a link to /dev/zero"):
        import_peft(folder, models["mlp"][1])


def test_base_model_named_elsewhere_is_kept_as_information(models, good, tmp_path):
    """PEFT's base_model_name_or_path is free text: the shapes decide, and the name is carried along."""
    folder = _copy(good, tmp_path / "a", {"base_model_name_or_path": "/etc/passwd"})
    assert import_peft(folder, models["mlp"][1]).info["base_model_name_or_path"] == "/etc/passwd"


# -- low-bit and ComPEFT on imported adapters ------------------------------------------------------------------------

SEQ = 6


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """BERT exported by this project with rank-2 LoRA slots, and a rank-2 PEFT LoRA imported as a branch."""
    from exporters.hf import export_hf_encoder

    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = T.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, attn_implementation="eager",
    )  # fmt: skip
    model = T.BertModel(cfg, add_pooling_layer=False).eval()
    path = root / "bert.onnx"
    export_hf_encoder(
        copy.deepcopy(model), path, seq_len=SEQ, lora_slots=["query", "value"], lora_rank=2, progress=False
    )
    _save_peft(model, _lora(r=2, lora_alpha=4, target_modules=["query", "value"]), root / "lora")
    adapter = import_peft(root / "lora", path)
    assert adapter.method == "lora"
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(2, 40, (3, SEQ)), "attention_mask": np.ones((3, SEQ), np.int64)}
    feeds["token_type_ids"] = np.zeros((3, SEQ), np.int64)
    return model, path, adapter, feeds


def _pooled(model, feeds, slots: dict) -> np.ndarray:
    """Torch reference: each slot pair merged into its weight (W + B @ A), mean-pooled as the exporter pools."""
    from exporters.hf import PooledEncoder

    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, a in slots.items():
            if ".lora_A." in name:
                b = slots[name.replace(".lora_A.", ".lora_B.")]
                params[name.removeprefix("bert.").replace(".lora_A", "")] += torch.from_numpy(b @ a)
        enc = PooledEncoder.wrap(m, pooling="mean").eval()
        return enc(*(torch.from_numpy(feeds[n].astype(np.int64)) for n in enc.input_names))[0].numpy()


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_low_bit_imported_lora_sizes_round_trip_and_runs_as_decoded(bert, tmp_path, bits):
    model, path, adapter, feeds = bert
    enc = {t: quant.encode(d.values, "gq", bits) for t, d in adapter.tensors.items()}
    for t, e in enc.items():  # documented size: packed codes plus (mu, sigma) per matrix
        assert quant.nbytes(e) == -(-adapter.tensors[t].values.size * bits // 8) + 8
    dec = {t: quant.decode(e) for t, e in enc.items()}
    low = Adapter(f"b{bits}", adapter.base_fingerprint, {t: DenseDelta(v) for t, v in dec.items()}, adapter.shapes,
                  method="lora", encodings=enc)  # fmt: skip
    back = load_adapter(low.save(tmp_path / "low.safetensors"))
    for t, v in dec.items():
        np.testing.assert_array_equal(back.tensors[t].values, v)
    with Runtime(path) as rt:
        y0 = rt.run(feeds)["embeddings"]
        rt.load_adapter(back)
        rt.switch(back.name)
        rt.wait_settled(10)
        got = rt.run(feeds)["embeddings"]
        np.testing.assert_allclose(got, _pooled(model, feeds, dec), atol=1e-5, rtol=0)
        rt.switch(None)
        rt.wait_settled(10)
        np.testing.assert_array_equal(rt.run(feeds)["embeddings"], y0)


def test_compeft_of_imported_adapters_round_trips_and_runs(bert, models, tmp_path):
    model, path, adapter, feeds = bert
    t = compeft({k: d.values for k, d in adapter.tensors.items()}, 0.25)
    back, _ = from_bytes(to_bytes(t))
    values = decompress(back)
    assert all(np.array_equal(values[k], v) for k, v in decompress(t).items())
    with Runtime(path) as rt:
        rt.load_adapter(Adapter("c", adapter.base_fingerprint, {k: DenseDelta(v) for k, v in values.items()},
                                adapter.shapes, method="lora"))  # fmt: skip
        rt.switch("c")
        rt.wait_settled(10)
        np.testing.assert_allclose(rt.run(feeds)["embeddings"], _pooled(model, feeds, values), atol=1e-5, rtol=0)
    kind = "distilbert"  # SHiRA from PEFT: values compressed, indices ride along as they are
    base, mpath = models[kind]
    _save_peft(base, peft.ShiraConfig(r=1, target_modules=["q_lin", "lin1"], random_seed=0), tmp_path / "s")
    shira = import_peft(tmp_path / "s", mpath)
    idx = {f"{k}.indices": d.indices for k, d in shira.tensors.items()}
    t = compeft({k: d.values for k, d in shira.tensors.items()}, 0.5, passthrough=idx)
    back = decompress(from_bytes(to_bytes(t))[0])
    sparse = {k: SparseDelta(back[f"{k}.indices"], back[k]) for k in shira.tensors}
    assert sum(np.count_nonzero(d.values) for d in sparse.values()) == round(0.5 * shira.nnz)
    merged = copy.deepcopy(base)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for k, d in sparse.items():
            params[k][tuple(torch.from_numpy(d.indices.astype(np.int64)))] += torch.from_numpy(d.values)
    x = _x(kind)
    with Runtime(mpath) as rt:
        rt.load_adapter(Adapter("c", shira.base_fingerprint, sparse, shira.shapes))
        rt.switch("c")
        rt.wait_settled(10)
        np.testing.assert_allclose(rt.run({"x": x.numpy()})["y"], _out(merged, x), atol=1e-5, rtol=0)


def _encoded_file(stats: list[float], scheme: str = "gq", bits: int = 1) -> bytes:
    codes = np.zeros(-(-32 * bits // 8), np.uint8)
    meta = {
        "format": "edge.adapter", "version": 1, "method": "lora", "name": "x", "base_fingerprint": "sha256:" + "0" * 64,
        "dtype": "float32", "targets": {"w": [2, 16]}, "encodings": {"w": {"scheme": scheme, "bits": bits}}, "info": {},
    }  # fmt: skip
    return save({"w.codes": codes, "w.stats": np.array(stats, np.float32)}, metadata={"edge": json.dumps(meta)})


@pytest.mark.parametrize(
    "stats,scheme,bits,match",
    [
        ([0.0, -1.0], "gq", 1, "negative scale"),  # was accepted: every decoded value mirrored
        ([0.0, 3e38], "gq", 2, "beyond float32"),  # was refused only after decoding to inf, with a numpy warning
        ([-3e38, 3e38], "gq", 1, "beyond float32"),
        ([0.0, 3e38], "gq", 1, None),  # 1-bit codes are +-0.6745: 2e38 still fits float32
        ([-0.5], "sign", 1, "negative scale"),  # was accepted: BitDelta's scale mean|W| is never negative
        ([0.0, float("nan")], "gq", 1, "NaN or Inf"),
    ],
)
def test_low_bit_stats_out_of_range_are_refused_before_decoding(stats, scheme, bits, match):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning: refused before decoding
        if match is None:
            assert np.isfinite(adapter_from_bytes(_encoded_file(stats, scheme, bits)).tensors["w"].values).all()
            return
        with pytest.raises(FormatError, match=match):
            adapter_from_bytes(_encoded_file(stats, scheme, bits))


def _compeft_blob(edit) -> bytes:
    import struct

    blob = to_bytes(compeft({"a": np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)}, 0.5))
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = json.loads(header.pop("__metadata__")["edge"])
    edit(meta)
    from safetensors.numpy import load

    return save(load(blob), metadata={"edge": json.dumps(meta)})


@pytest.mark.parametrize(
    "value",
    ["0.5", "nan", "1e400", True, -1.0, 1e39],  # strings and booleans were read by float(); -1 flipped signs; 1e39: inf
)
@pytest.mark.parametrize("where", ["scale", "alpha"])
def test_compeft_scales_must_be_numbers_in_float32_range(value, where):
    def edit(meta):
        if where == "scale":
            meta["scales"]["a"] = value
        else:
            meta["alpha"] = value

    with pytest.raises(FormatError, match="not a number in"):
        from_bytes(_compeft_blob(edit))


def test_compeft_refuses_a_negative_alpha():
    with pytest.raises(ConfigError, match="alpha must be"):
        compeft({"a": np.ones((2, 2), np.float32)}, 0.5, alpha=-1.0)


def test_grouped_convolution_lora_is_refused_and_conv_lora_has_no_slots(tmp_path):
    """PEFT's grouped conv LoRA has B [out, r / groups, 1, 1] (PEFT cannot merge it either): it is refused."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2)).eval()
    x = torch.randn(1, 4, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(tmp_path / "raw.onnx"), dynamo=False, input_names=["x"], output_names=["y"])
    import_onnx(
        tmp_path / "raw.onnx", tmp_path / "m.onnx", state_dict={k: v.numpy() for k, v in model.state_dict().items()}
    )
    peft.get_peft_model(copy.deepcopy(model), _lora(r=2, target_modules=["0"])).save_pretrained(tmp_path / "grouped")
    with pytest.raises(ConfigError, match="grouped convolution") as e:
        import_peft(tmp_path / "grouped", tmp_path / "m.onnx", lora_as="merged")
    assert "\n" not in str(e.value)
    plain = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3)).eval()
    _save_peft(plain, _lora(r=2, target_modules=["0"]), tmp_path / "plain")
    with pytest.raises(ConfigError, match="lora_as='merged'"):
        import_peft(tmp_path / "plain", tmp_path / "m.onnx", lora_as="branch")
