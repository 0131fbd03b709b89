"""SHiRA masks, training and merging on tiny models (PEFT-style 10->20->2 MLP, tiny DigitsEncoder)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edge.errors import AdapterMismatchError, ConfigError
from exporters.masks import STRUCTURED  # tested in tests/host/test_masks.py
from exporters.shira import MASKS, make_masks, merge_shira, register_mask, select_targets, train_shira
from lab.datasets import load_domains
from lab.digits_model import DigitsEncoder, evaluate, load_checkpoint, pretrain, save_checkpoint

torch.set_num_threads(1)


class MLP(nn.Module):
    """PEFT's test model: 10 -> 20 -> 2 with a LayerNorm (whose 1-D weight must never be targeted)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.norm = nn.LayerNorm(20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.norm(self.lin0(x))))


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def _toy_data(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 10)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)


def _loss(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        out = model(torch.as_tensor(x))
        return float(F.cross_entropy(out[0] if isinstance(out, tuple) else out, torch.as_tensor(y)))


def _calib_scores_grad(model: nn.Module, name: str, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """Reference |dL/dW| on one batch, computed the plain way."""
    model = copy.deepcopy(model)
    model.zero_grad()
    F.cross_entropy(model(torch.as_tensor(x)), torch.as_tensor(y)).backward()
    return dict(model.named_parameters())[name].grad.abs()


# One case per registered mask kind: does it need calibration data, and which scores must it rank by
# (None: no reference, e.g. random, checked for seed determinism instead).
MASK_CASES = {
    "random": dict(needs_calib=False, reference=None),
    "wm": dict(needs_calib=False, reference=lambda m, n, x, y: dict(m.named_parameters())[n].detach().abs()),
    "grad": dict(needs_calib=True, reference=_calib_scores_grad),
    "snip": dict(
        needs_calib=True,
        reference=lambda m, n, x, y: (dict(m.named_parameters())[n].detach() * _calib_scores_grad(m, n, x, y)).abs(),
    ),
}
TARGETS = ["lin0.weight", "lin1.weight"]
UNSTRUCTURED = sorted(set(MASKS) - set(STRUCTURED))


def test_every_registered_mask_has_a_case():
    assert set(UNSTRUCTURED) == set(MASK_CASES), "add a MASK_CASES entry (structured kinds: test_masks.py)"


@pytest.mark.parametrize("kind", sorted(MASKS))
@pytest.mark.parametrize("density", [0.01, 0.1, 0.5])
def test_mask_count_range_sorted_unique(kind, density):
    model, calib = _mlp(), _toy_data()
    masks = make_masks(model, TARGETS, density=density, kind=kind, calib=calib)
    assert list(masks) == TARGETS
    params = dict(model.named_parameters())
    for name, idx in masks.items():
        rows, cols = params[name].shape
        assert idx.dtype == np.int64 and idx.shape == (2, max(1, round(density * rows * cols)))
        assert idx[0].min() >= 0 and idx[0].max() < rows and idx[1].min() >= 0 and idx[1].max() < cols
        flat = idx[0] * cols + idx[1]
        assert np.all(np.diff(flat) > 0), "row-major sorted and unique"


@pytest.mark.parametrize("kind", UNSTRUCTURED)
def test_mask_picks_top_scores(kind):
    case = MASK_CASES[kind]
    model, (x, y) = _mlp(), _toy_data()
    masks = make_masks(model, TARGETS, density=0.1, kind=kind, calib=(x, y), seed=3)
    again = make_masks(model, TARGETS, density=0.1, kind=kind, calib=(x, y), seed=3)
    for name in TARGETS:
        np.testing.assert_array_equal(masks[name], again[name])
    if case["reference"] is None:
        other = make_masks(model, TARGETS, density=0.1, kind=kind, calib=(x, y), seed=4)
        assert not np.array_equal(masks["lin0.weight"], other["lin0.weight"])
        return
    for name, idx in masks.items():
        scores = case["reference"](model, name, x, y).numpy()
        chosen = np.zeros(scores.shape, dtype=bool)
        chosen[idx[0], idx[1]] = True
        assert scores[chosen].min() >= scores[~chosen].max() - 1e-7


@pytest.mark.parametrize("kind", [k for k, c in MASK_CASES.items() if c["needs_calib"]])
def test_calibrated_masks_need_calib(kind):
    assert MASKS[kind].needs_calib
    with pytest.raises(ConfigError, match="calib"):
        make_masks(_mlp(), TARGETS, kind=kind)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(kind="nope"), "registered kinds"), (dict(density=0.0), "density"), (dict(density=1.5), "density")],
)
def test_make_masks_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_masks(_mlp(), TARGETS, **kwargs)


def test_duplicate_mask_registration_rejected():
    with pytest.raises(ConfigError, match="already registered"):
        register_mask("wm")(lambda w, g, rng: w)


def test_select_targets_suffix_regex_and_errors():
    enc = DigitsEncoder(dim=16, depth=2, heads=2)
    assert select_targets(enc, ["q", "fc1"]) == [
        "blocks.0.attn.q.weight",
        "blocks.0.mlp.fc1.weight",
        "blocks.1.attn.q.weight",
        "blocks.1.mlp.fc1.weight",
    ]
    assert select_targets(enc, r"blocks\.1\.attn\.(q|v)") == ["blocks.1.attn.q.weight", "blocks.1.attn.v.weight"]
    assert select_targets(enc, ["head", "embed"]) == ["embed.weight", "head.weight"]
    with pytest.raises(ConfigError, match="available modules") as info:
        select_targets(enc, ["norm", "ln1"])  # LayerNorm weights are 1-D: never targets
    assert "blocks.0.attn.q" in str(info.value)
    with pytest.raises(ConfigError, match="regex"):
        select_targets(enc, "blocks[")


def test_training_touches_only_masked_entries_and_leaves_base_intact():
    model, (x, y) = _mlp(), _toy_data()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks = make_masks(model, TARGETS, density=0.1, kind="snip", calib=(x, y))
    adapter = train_shira(model, masks, x, y, epochs=5, lr=5e-2, batch_size=16, progress=False)

    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"base weight {k} changed"
    assert all(p.grad is None for p in model.parameters())
    assert not model.training

    merged = merge_shira(model, adapter)
    for name, param in merged.named_parameters():
        changed = (param.detach() != before[name]).numpy()
        if name not in adapter:
            assert not changed.any(), f"{name} is not a target but changed"
            continue
        idx, delta = adapter[name]
        np.testing.assert_array_equal(idx, masks[name])
        assert idx.dtype == np.int32 and delta.dtype == np.float32 and delta.shape == (idx.shape[1],)
        allowed = np.zeros_like(changed)
        allowed[idx[0], idx[1]] = True
        assert not (changed & ~allowed).any(), f"{name} changed outside its mask"
        assert changed.sum() >= 0.9 * idx.shape[1]
        got = param.detach().numpy()[idx[0], idx[1]] - before[name].numpy()[idx[0], idx[1]]
        np.testing.assert_allclose(got, delta, atol=1e-6)


def test_training_is_deterministic_and_merge_alpha_zero_is_identity():
    model, (x, y) = _mlp(), _toy_data()
    masks = make_masks(model, TARGETS, density=0.2, kind="random", seed=1)
    a = train_shira(model, masks, x, y, epochs=3, lr=1e-2, batch_size=16, seed=7, progress=False)
    b = train_shira(model, masks, x, y, epochs=3, lr=1e-2, batch_size=16, seed=7, progress=False)
    for name in a:
        np.testing.assert_array_equal(a[name][1], b[name][1])
    zero = merge_shira(model, a, alpha=0.0)
    for (_, p), (_, q) in zip(model.named_parameters(), zero.named_parameters(), strict=True):
        assert torch.equal(p, q)


def test_merge_rejects_mismatched_adapters():
    model = _mlp()
    good = (np.array([[0], [0]], dtype=np.int32), np.zeros(1, np.float32))
    with pytest.raises(AdapterMismatchError, match="not in the model"):
        merge_shira(model, {"lin9.weight": good})
    with pytest.raises(AdapterMismatchError, match="out of range"):
        merge_shira(model, {"lin1.weight": (np.array([[2], [0]], dtype=np.int32), np.zeros(1, np.float32))})
    with pytest.raises(AdapterMismatchError, match="deltas"):
        merge_shira(model, {"lin1.weight": (good[0], np.zeros(3, np.float32))})
    with pytest.raises(ConfigError, match="2-D"):
        train_shira(model, {"norm.weight": good[0]}, *_toy_data(), progress=False)


@pytest.fixture(scope="module")
def tiny_encoder():
    domains = load_domains(("rotate",), seed=0)
    model = pretrain(
        domains["clean"], epochs=10, lr=1e-2, batch_size=32, dim=32, depth=1, heads=2, seed=0, progress=False
    )
    return model, domains


def test_short_training_reduces_loss_on_shifted_domain(tiny_encoder):
    model, domains = tiny_encoder
    assert evaluate(model, domains["clean"].x_test, domains["clean"].y_test) > 0.85
    d = domains["rotate"]
    targets = select_targets(model, ["q", "k", "v", "proj", "fc1", "fc2"])
    masks = make_masks(model, targets, density=0.05, kind="snip", calib=(d.x_train, d.y_train))
    adapter = train_shira(model, masks, d.x_train, d.y_train, epochs=3, lr=5e-2, batch_size=64, progress=False)
    merged = merge_shira(model, adapter)
    base_loss, new_loss = _loss(model, d.x_test, d.y_test), _loss(merged, d.x_test, d.y_test)
    assert new_loss < 0.6 * base_loss
    assert evaluate(merged, d.x_test, d.y_test) > evaluate(model, d.x_test, d.y_test) + 0.15


def test_digits_encoder_shapes_and_checkpoint_roundtrip(tiny_encoder, tmp_path):
    model, domains = tiny_encoder
    x = torch.as_tensor(domains["clean"].x_test[:5])
    logits, features = model(x)
    assert logits.shape == (5, 10) and features.shape == (5, 32)
    path = tmp_path / "enc.safetensors"
    save_checkpoint(model, path)
    again = load_checkpoint(path)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    assert torch.equal(again(x)[0], logits)
    assert all(
        torch.equal(p, q) for p, q in zip(DigitsEncoder(seed=3).parameters(), DigitsEncoder(seed=3).parameters())
    )
