"""HF PEFT adapters (SHiRA, LoRA merged and as a branch) imported on the device match PEFT's merged model."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from edge.convert.peft import import_peft, read_peft, resolve_module  # noqa: E402
from edge.errors import AdapterMismatchError, ConfigError, FormatError  # noqa: E402
from edge.format.adapter import load_adapter  # noqa: E402
from edge.format.modelinfo import ModelInfo, TensorInfo  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

SEQ = 8
SLOT_RANK = 4
ADAPTERS = {  # name -> (PEFT config, how it is imported: lora_as and the resulting method)
    "shira": (lambda: peft.ShiraConfig(r=1, target_modules=["query", "dense"], random_seed=0), "auto", "shira"),
    "lora-branch": (lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]), "auto", "lora"),
    "lora-merged": (lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]), "merged", "shira"),
    "lora-rslora-emb": (
        lambda: peft.LoraConfig(
            r=3, lora_alpha=2, use_rslora=True, target_modules=["key", "word_embeddings"], alpha_pattern={"key": 5}
        ),
        "auto",
        "shira",
    ),
}


def tiny_bert(hidden: int = 16, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def batch(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 40, (n, SEQ)).astype(np.int64)
    mask = np.ones((n, SEQ), np.int64)
    mask[::2, SEQ - 3 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def pooled(bert, feeds) -> np.ndarray:
    from exporters.hf import PooledEncoder

    enc = PooledEncoder.wrap(bert, pooling="mean").eval()
    with torch.no_grad():
        return enc(*(torch.from_numpy(feeds[n]) for n in enc.input_names))[0].numpy()


def train_peft(base, config, out_dir, steps: int = 4):
    """A few Adam steps of PEFT itself on a regression target, then save_pretrained; returns the merged model."""
    model = peft.get_peft_model(copy.deepcopy(base), config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=5e-2)
    feeds = {k: torch.from_numpy(v) for k, v in batch(6, seed=1).items()}
    target = torch.randn(6, base.config.hidden_size, generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        hidden = model(**feeds).last_hidden_state
        m = feeds["attention_mask"].unsqueeze(-1).float()
        loss = (((hidden * m).sum(1) / m.sum(1) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(out_dir))
    return model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One tiny BERT exported with LoRA slots on query/value, and one PEFT adapter per ADAPTERS entry."""
    from exporters.hf import export_hf_encoder

    tmp = tmp_path_factory.mktemp("peft")
    base = tiny_bert()
    path = tmp / "bert.onnx"
    info = export_hf_encoder(
        copy.deepcopy(base), path, seq_len=SEQ, lora_slots=["query", "value"], lora_rank=SLOT_RANK, progress=False
    )
    merged = {name: train_peft(base, make(), tmp / name) for name, (make, _, _) in ADAPTERS.items()}
    return {"tmp": tmp, "base": base, "path": path, "info": info, "merged": merged}


def test_imported_adapters_match_peft_merged_model(setup):
    feeds = batch(5, seed=7)
    with Runtime(setup["path"]) as rt:
        y0 = rt.run(feeds)["embeddings"]
        np.testing.assert_allclose(y0, pooled(setup["base"], feeds), atol=1e-5)
        for name, (_, lora_as, method) in ADAPTERS.items():
            adapter = import_peft(setup["tmp"] / name, setup["path"], lora_as=lora_as)
            assert adapter.method == method, name
            adapter.save(setup["tmp"] / f"{name}.safetensors")
            rt.load_adapter(setup["tmp"] / f"{name}.safetensors")
        for name in ADAPTERS:
            rt.switch(name)
            want = pooled(setup["merged"][name], feeds)
            assert np.abs(want - y0).max() > 1e-3, f"{name}: training changed nothing"
            assert np.abs(want - y0).max() > 1e-3, f"{name}: training changed nothing"
            np.testing.assert_allclose(rt.run(feeds)["embeddings"], want, atol=1e-5, err_msg=name)
        rt.switch(None)
        np.testing.assert_array_equal(rt.run(feeds)["embeddings"], y0)


def test_shira_indices_and_values_are_peft_s(setup):
    adapter = import_peft(setup["tmp"] / "shira", setup["info"])
    saved = load_file(str(setup["tmp"] / "shira" / "adapter_model.safetensors"))
    key = "base_model.model.encoder.layer.1.attention.self.query"
    d = adapter.tensors["bert.encoder.layer.1.attention.self.query.weight"]
    order = np.lexsort(saved[f"{key}.shira_indices"][::-1])
    np.testing.assert_array_equal(d.indices, saved[f"{key}.shira_indices"][:, order])
    np.testing.assert_array_equal(d.values, saved[f"{key}.shira_weight"][order])
    assert adapter.info["peft_type"] == "SHIRA" and adapter.base_fingerprint == setup["info"].fingerprint


def test_branch_rank_larger_than_slots_is_refused(setup, tmp_path):
    train_peft(setup["base"], peft.LoraConfig(r=SLOT_RANK + 1, target_modules=["query"]), tmp_path / "big", steps=1)
    with pytest.raises(AdapterMismatchError, match="lora_rank >= 5"):
        import_peft(tmp_path / "big", setup["info"], lora_as="branch")
    assert import_peft(tmp_path / "big", setup["info"]).method == "shira"  # auto falls back to merged


def test_cli_import_peft(setup, tmp_path, capsys):
    from edge.cli import main

    out = tmp_path / "a.safetensors"
    args = ["import-peft", str(setup["tmp"] / "lora-branch"), "--base", str(setup["path"]), "--out", str(out)]
    assert main([*args, "--lora-as", "merged"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "shira"
    assert load_adapter(out).info["dense"] is True
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04never unpickled")
    assert main(["import-peft", str(tmp_path / "pickled"), "--base", str(setup["path"]), "--out", str(out)]) == 2
    assert "pickle" in capsys.readouterr().err


# -- errors -----------------------------------------------------------------------------------------------------------


def _fake(tmp_path, config: dict, tensors: dict[str, np.ndarray], name: str = "fake"):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def _lora(module: str, r: int, n_in: int, n_out: int):
    rng = np.random.default_rng(0)
    p = f"base_model.model.{module}"
    return {
        f"{p}.lora_A.weight": rng.standard_normal((r, n_in)).astype(np.float32),
        f"{p}.lora_B.weight": rng.standard_normal((n_out, r)).astype(np.float32),
    }


INFO = ModelInfo(
    "m",
    "sha256:0",
    {
        "net.a.proj.weight": TensorInfo("net.a.proj.weight", (4, 6), transposed=True),
        "net.b.proj.weight": TensorInfo("net.b.proj.weight", (4, 6)),
        "net.c1d.weight": TensorInfo("net.c1d.weight", (6, 4)),  # Conv1D layout [in, out]
    },
)
LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}


@pytest.mark.parametrize(
    "config,tensors,error,match",
    [
        ({"peft_type": "IA3"}, {"base_model.model.a.ia3_l": np.ones(4, np.float32)}, ConfigError, "IA3.*LORA, SHIRA"),
        ({"peft_type": "LORA", "use_dora": True}, _lora("a.proj", 2, 6, 4), ConfigError, "use_dora"),
        ({**LORA, "init_lora_weights": "pissa"}, _lora("a.proj", 2, 6, 4), ConfigError, "base weights"),
        (LORA, _lora("proj", 2, 6, 4), AdapterMismatchError, "several parameters.*net.a.proj.weight"),
        (LORA, _lora("net.z.proj", 2, 6, 4), AdapterMismatchError, "no weight.*closest: .*net.a.proj.weight"),
        (LORA, _lora("a.proj", 2, 5, 4), AdapterMismatchError, r"\(4, 5\).*different base"),
        (LORA, {**_lora("a.proj", 2, 6, 4), "base_model.model.head.weight": np.ones((2, 2), np.float32)},
         ConfigError, "modules_to_save"),
        (LORA, {"base_model.model.a.proj.lora_A.weight": np.ones((2, 6), np.float32)}, FormatError, "lora_B"),
        ({"peft_type": "SHIRA", "r": 1}, {"base_model.model.a.proj.shira_indices": np.array([[0, 4], [0, 0]], np.int32),
          "base_model.model.a.proj.shira_weight": np.ones(2, np.float32)}, AdapterMismatchError, "different base"),
    ],
)  # fmt: skip
def test_errors_say_what_and_how(tmp_path, config, tensors, error, match):
    with pytest.raises(error, match=match):
        import_peft(_fake(tmp_path, config, tensors), INFO)


def test_missing_target_module_on_a_real_export(setup, tmp_path):
    saved = load_file(str(setup["tmp"] / "lora-merged" / "adapter_model.safetensors"))
    renamed = {k.replace("layer.1.", "layer.7."): v for k, v in saved.items()}
    config = json.loads((setup["tmp"] / "lora-merged" / "adapter_config.json").read_text())
    with pytest.raises(AdapterMismatchError, match=r"encoder\.layer\.7\.attention\.self\.(query|value).*no weight"):
        import_peft(_fake(tmp_path, config, renamed), setup["path"])


def test_mismatched_base_model(setup, tmp_path):
    train_peft(tiny_bert(hidden=24), peft.LoraConfig(r=2, target_modules=["value"]), tmp_path / "wide", steps=1)
    with pytest.raises(AdapterMismatchError, match="different base"):
        import_peft(tmp_path / "wide", setup["path"], lora_as="merged")
    with pytest.raises(AdapterMismatchError, match="slots"):
        import_peft(tmp_path / "wide", setup["path"], lora_as="branch")


def test_merged_lora_math_fan_in_fan_out_and_bf16(tmp_path):
    """delta = transpose(B @ A, fan_in_fan_out) * alpha / r, as PEFT's get_delta_weight; bf16 files widen exactly."""
    t = _lora("c1d", 2, 6, 4)
    d = _fake(tmp_path, {**LORA, "fan_in_fan_out": True}, t)
    got = import_peft(d, INFO).tensors["net.c1d.weight"]
    want = ((t["base_model.model.c1d.lora_B.weight"] @ t["base_model.model.c1d.lora_A.weight"]) * 2.0).T
    dense = np.zeros((6, 4), np.float32)
    dense[tuple(got.indices)] = got.values
    np.testing.assert_allclose(dense, want, rtol=1e-6)

    bf = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in _lora("a.proj", 2, 6, 4).items()}
    from safetensors.torch import save_file as save_torch

    (tmp_path / "bf").mkdir()
    (tmp_path / "bf" / "adapter_config.json").write_text(json.dumps(LORA))
    save_torch(bf, str(tmp_path / "bf" / "adapter_model.safetensors"))
    arrays = read_peft(tmp_path / "bf").modules["a.proj"]
    np.testing.assert_array_equal(arrays["lora_A.weight"], bf["base_model.model.a.proj.lora_A.weight"].float().numpy())


def test_resolve_module_by_suffix_both_ways():
    assert resolve_module("net.a.proj", INFO) == "net.a.proj.weight"
    assert resolve_module("a.proj", INFO) == "net.a.proj.weight"  # the model has a wrapper prefix
    assert resolve_module("model.net.a.proj", INFO) == "net.a.proj.weight"  # the adapter has one


@pytest.mark.parametrize("prefix", ["", "0.auto_model.", "base_model.model.0.auto_model."])
def test_keys_saved_by_the_transformers_and_sentence_transformers_integrations(tmp_path, prefix):
    t = {k.replace("base_model.model.", prefix): v for k, v in _lora("a.proj", 2, 6, 4).items()}
    assert list(import_peft(_fake(tmp_path, LORA, t), INFO).tensors) == ["net.a.proj.weight"]


@pytest.mark.slow
def test_minilm_peft_adapters_match_peft_merged_model(tmp_path):
    """all-MiniLM-L6-v2: PEFT SHiRA and LoRA (branch and merged) trained here, imported, vs PEFT's merged model."""
    from exporters.hf import PooledEncoder, export_hf_encoder, load_hf_encoder
    from exporters.minilm import minilm_dir

    path = tmp_path / "minilm.onnx"
    export_hf_encoder(minilm_dir(), path, seq_len=32, lora_slots=["query", "value"], lora_rank=8, progress=False)
    base, _ = load_hf_encoder(minilm_dir())
    base.pooler = None
    with Runtime(path) as rt:
        from edge.text import Tokenizer

        feeds = Tokenizer.for_model(rt).encode(["Sparse adapters on the edge.", "A second, longer sentence here."])
        y0 = rt.run(feeds)["embeddings"]
        configs = {
            "shira": (peft.ShiraConfig(r=2, target_modules=["query", "dense"], random_seed=0), "auto"),
            "lora-branch": (peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]), "branch"),
            "lora-merged": (peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"]), "auto"),
        }
        for name, (config, lora_as) in configs.items():
            merged = _train_on(base, config, tmp_path / name, feeds)
            rt.load_adapter(import_peft(tmp_path / name, rt, lora_as=lora_as))
            rt.switch(name)
            enc = PooledEncoder.wrap(merged, pooling="mean", normalize=True).eval()
            with torch.no_grad():
                want = enc(*(torch.from_numpy(feeds[n]) for n in enc.input_names))[0].numpy()
            assert np.abs(want - y0).max() > 1e-3, f"{name}: training changed nothing"
            np.testing.assert_allclose(rt.run(feeds)["embeddings"], want, atol=1e-5, err_msg=name)


def _train_on(base, config, out_dir, feeds, steps: int = 2):
    model = peft.get_peft_model(copy.deepcopy(base), config)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
    for _ in range(steps):
        loss = model(**tensors).last_hidden_state[:, 0].square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(out_dir))
    return model.merge_and_unload().eval()


def test_patterns_match_like_peft_in_linear_time():
    """alpha_pattern/rank_pattern keys are user text: RE2 (linear time), never Python's backtracking re."""
    import time

    from edge.convert.peft import _pattern

    assert _pattern({"key": 5}, "encoder.layer.0.attention.self.key", 1) == 5
    assert _pattern({"layer\\.0\\..*key": 7}, "encoder.layer.0.attention.self.key", 1) == 7
    assert _pattern({"query": 5}, "encoder.layer.0.attention.self.key", 1) == 1
    assert _pattern({"ey": 5}, "encoder.layer.0.attention.self.key", 1) == 1  # whole name parts, as PEFT
    t0 = time.perf_counter()
    assert _pattern({"(a+)+c": 9}, "x." + "a" * 5000 + "b", 1) == 1  # catastrophic for Python's re
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(ConfigError, match="RE2"):
        _pattern({r"(a)\1": 2}, "aa", 1)


def test_bf16_is_parsed_by_the_safetensors_library(tmp_path):
    """A BF16 header the library refuses (negative offsets) is a FormatError, never header bytes as weights."""
    import struct

    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    header = json.dumps(
        {"base_model.model.q.lora_A.weight": {"dtype": "BF16", "shape": [1, 4], "data_offsets": [-8, 0]}}
    ).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(FormatError, match="corrupt safetensors"):
        read_peft(folder)
    values = np.array([1.5, -2.25, 3.0, 0.0], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps(
        {"base_model.model.q.lora_A.weight": {"dtype": "BF16", "shape": [1, 4], "data_offsets": [0, 8]}}
    ).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bf16)
    np.testing.assert_array_equal(read_peft(folder).modules["q"]["lora_A.weight"], values.reshape(1, 4))
