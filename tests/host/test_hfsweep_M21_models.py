"""Encoders a sweep of Hugging Face architectures found refused (session 21), end to end on tiny random configs.

* XLNet: its config's ``max_position_embeddings`` is -1 ("no limit": relative positions), and every ``seq_len`` was
  refused as longer than -1 positions. Past that, torch's decomposition of ``1.0 - attention_mask`` (a float
  scalar minus the int64 mask) had no aten overload, and its ``mask_emb`` (used only with ``target_mapping``) is
  not in the graph. Now it exports, runs on edge.Runtime as torch does, and takes a SHiRA adapter; ``--taps auto``
  is refused in one line (its residual stream is time-major: ``[seq, batch, hidden]``).
* LUKE on text alone: its entity tables are never read, and were refused with a Python-only remedy ("set the
  attribute to None"); now they are left out with a warning naming them.
* MRA: on a host without its CUDA kernel transformers returns zeros for attention, so the key and value weights
  are computed and dropped: refused, naming them, never left out silently.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

from edge.errors import ConfigError  # noqa: E402

torch.set_num_threads(1)
TEXT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def _pooled(model, feeds) -> np.ndarray:
    """torch's masked mean of the last hidden state: what the export's ``pooling='mean'`` computes."""
    with torch.no_grad():
        hidden = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
    mask = torch.from_numpy(feeds["attention_mask"]).unsqueeze(-1).float()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def _feeds(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[1::2, seq * 3 // 4 :] = 0
    ids = rng.integers(3, 60, (batch, seq)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@pytest.fixture(scope="module")
def xlnet(tmp_path_factory):
    """One XLNet export shared by the module: (model, path, info, warnings logged)."""
    from exporters.hf import export_hf_encoder

    torch.manual_seed(0)
    model = T.XLNetModel(T.XLNetConfig(vocab_size=64, d_model=32, n_layer=1, n_head=2, d_inner=64)).eval()
    assert model.config.max_position_embeddings == -1  # transformers' "no limit"
    path = tmp_path_factory.mktemp("xlnet") / "xlnet.onnx"
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("exporters").addHandler(handler)
    try:
        info = export_hf_encoder(model, path, pooling="mean", seq_len=8, progress=False)
    finally:
        logging.getLogger("exporters").removeHandler(handler)
    return model, path, info, [r.getMessage() for r in records]


def test_xlnet_exports_at_a_seq_len_and_says_what_it_left_out(xlnet):
    model, path, info, said = xlnet
    assert path.is_file() and info.extra["seq_len"] == 8 and info.extra["model_type"] == "xlnet"
    assert "transformer.mask_emb" not in info.tensors  # read only with target_mapping, which the graph never takes
    dropped = [m for m in said if "left out of the export" in m]
    assert len(dropped) == 1 and "1 weight(s)" in dropped[0] and "transformer.mask_emb" in dropped[0], said
    assert "transformer.layer.0.ff.layer_1.weight" in info.tensors


def test_xlnet_runs_on_edge_runtime_as_in_torch_and_takes_a_shira_adapter(xlnet, tmp_path):
    import edge
    from exporters import make_masks, select_targets, shira_adapter

    model, path, info, _ = xlnet
    feeds = _feeds(3, 8, seed=5)
    want = _pooled(model, feeds)
    rt = edge.Runtime(path)
    base = rt.run(feeds)["embeddings"]
    assert base.shape == (3, 32) and np.abs(base - want).max() < 1e-5 * max(1.0, np.abs(want).max())

    targets = select_targets(model)
    masks = make_masks(model, targets, density=0.05)
    rng = np.random.default_rng(3)
    trained = {
        k: (v.astype(np.int32), (rng.standard_normal(v.shape[1]) * 0.5).astype(np.float32)) for k, v in masks.items()
    }
    named = {f"transformer.{k}": v for k, v in trained.items()}
    assert named and all(k in info.tensors for k in named)
    shira_adapter(named, info, "a", {"mask": "wm"}).save(tmp_path / "a.safetensors")
    rt.load_adapter(tmp_path / "a.safetensors")
    rt.switch("a")
    rt.wait_settled()
    adapted = rt.run(feeds)["embeddings"]
    rt.switch(None)
    rt.wait_settled()
    assert np.array_equal(rt.run(feeds)["embeddings"], base)  # undone exactly
    merged = T.XLNetModel(model.config).eval()
    merged.load_state_dict(model.state_dict())
    with torch.no_grad():
        for k, (idx, val) in trained.items():
            merged.get_parameter(k)[tuple(torch.from_numpy(idx.astype(np.int64)))] += torch.from_numpy(val)
    want_adapted = _pooled(merged, feeds)
    assert np.abs(adapted - base).max() > 1e-3  # the adapter changes the output
    assert np.abs(adapted - want_adapted).max() < 1e-5 * max(1.0, np.abs(want_adapted).max())


def test_xlnet_taps_auto_is_refused_in_one_line_naming_the_file(xlnet, tmp_path):
    from edge.route.taps import tap_model

    _, path, _, _ = xlnet
    with pytest.raises(ConfigError) as e:
        tap_model(path, tmp_path / "t.onnx", "auto")
    said = str(e.value)
    assert "\n" not in said and str(path) in said and "first axis 8, not the batch" in said, said
    assert "edge update --taps A,B" in said and not (tmp_path / "t.onnx").exists()


def test_luke_text_only_exports_leaving_its_entity_tables_out_with_a_warning(tmp_path, caplog):
    from exporters.hf import export_hf_encoder

    torch.manual_seed(0)
    model = T.LukeModel(T.LukeConfig(**TEXT, max_position_embeddings=64, entity_vocab_size=10, entity_emb_size=16))
    with caplog.at_level(logging.WARNING, logger="exporters"):
        info = export_hf_encoder(model.eval(), tmp_path / "luke.onnx", pooling="mean", seq_len=8, progress=False)
    said = [r.getMessage() for r in caplog.records if "left out of the export" in r.getMessage()]
    assert len(said) == 1 and "12 weight(s)" in said[0] and "luke.entity_embeddings.entity_embeddings.weight" in said[0]
    left_out = [n for n in dict(model.named_parameters()) if "entity" in n or "2e_query" in n or "e2w_query" in n]
    assert len(left_out) == 12 and not any(f"luke.{n}" in info.tensors for n in left_out)
    import edge

    feeds = _feeds(2, 8, seed=1)
    got = edge.Runtime(tmp_path / "luke.onnx").run(feeds)["embeddings"]
    assert np.abs(got - _pooled(model, feeds)).max() < 1e-5


def test_mra_without_its_kernel_is_refused_naming_the_weights_not_left_out(tmp_path):
    from exporters.hf import export_hf_encoder

    torch.manual_seed(0)
    model = T.MraModel(T.MraConfig(**TEXT, max_position_embeddings=64)).eval()
    with pytest.raises(ConfigError) as e:
        export_hf_encoder(model, tmp_path / "mra.onnx", pooling="mean", seq_len=8, progress=False)
    said = str(e.value)
    assert "computes with 4 weight(s) whose result never reaches its output" in said, said
    assert "mra.encoder.layer.0.attention.self.key.weight" in said and "value.weight" in said
    assert "not supported" in said and "--seq-len N" in said and "set the attribute" not in said and "\n" not in said
    assert not list(tmp_path.iterdir())
