"""Bring your own model, SHiRA: every registered mask on Linear, Conv1d, Conv2d (regular, depthwise, grouped) and
Embedding weights; DataLoader input and custom losses; a torch CNN exported to ONNX and switched on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from edge.errors import AdapterMismatchError, ConfigError
from exporters.masks import STRUCTURED  # their runs and ranking: tests/host/test_masks.py
from exporters.shira import (
    MASKS,
    make_masks,
    merge_shira,
    saliency,
    select_targets,
    shira_adapter,
    train_shira,
    train_snip,
)

torch.set_num_threads(1)


class Net(nn.Module):
    """``fc(pool(tanh(body(x))))``: one adaptable layer under test plus a small classifier."""

    def __init__(self, body: nn.Module, width: int, pool: tuple[int, ...]) -> None:
        super().__init__()
        self.body, self.fc, self.pool = body, nn.Linear(width, 3), pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return self.fc(h.mean(self.pool) if self.pool else h)


def _floats(*shape):
    return lambda n, rng: rng.standard_normal((n, *shape)).astype(np.float32)


# layer kind -> (body, width after it, pooled axes, input maker); the target is always "body.weight"
LAYERS = {
    "linear": (lambda: nn.Linear(10, 12), 12, (), _floats(10)),
    "conv1d": (lambda: nn.Conv1d(3, 6, 3, padding=1), 6, (2,), _floats(3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, padding=1), 6, (2, 3), _floats(3, 6, 6)),
    "depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), 4, (2, 3), _floats(4, 6, 6)),
    "grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), 6, (2, 3), _floats(4, 6, 6)),
    "embedding": (lambda: nn.Embedding(20, 8), 8, (1,), lambda n, rng: rng.integers(0, 20, (n, 5))),
}
TARGET = "body.weight"


def _case(kind: str, n: int = 48, seed: int = 0):
    body, width, pool, inputs = LAYERS[kind]
    torch.manual_seed(seed)
    model = Net(body(), width, pool).eval()
    rng = np.random.default_rng(seed)
    x = inputs(n, rng)
    with torch.no_grad():  # learnable labels: a perturbed copy of the model's own argmax
        y = model(torch.as_tensor(x)).argmax(1).numpy()
    y = np.where(rng.random(n) < 0.4, rng.integers(0, 3, n), y)
    return model, x, y


def _grad(model: nn.Module, x, y) -> torch.Tensor:
    """Reference ``dL/dW`` of the target on all of ``(x, y)``, computed the plain way."""
    w = dict(model.named_parameters())[TARGET]
    return torch.autograd.grad(F.cross_entropy(model(torch.as_tensor(x)), torch.as_tensor(y)), w)[0]


# mask kind -> reference scores (None: no reference, checked for seed determinism instead)
MASK_REFERENCE = {
    "random": None,
    "wm": lambda m, x, y: dict(m.named_parameters())[TARGET].detach().abs(),
    "grad": lambda m, x, y: _grad(m, x, y).abs(),
    "snip": lambda m, x, y: (dict(m.named_parameters())[TARGET].detach() * _grad(m, x, y)).abs(),
}
CROSS = [(k, layer) for k in sorted(MASKS) for layer in LAYERS]


def test_every_registered_mask_has_a_reference_case():
    assert set(MASKS) - set(STRUCTURED) == set(MASK_REFERENCE), "add a MASK_REFERENCE entry for each mask kind"


@pytest.mark.parametrize("kind,layer", CROSS)
@pytest.mark.parametrize("density", [0.05, 0.3])
def test_masks_have_the_density_and_pick_top_scores(kind, layer, density):
    model, x, y = _case(layer)
    shape = tuple(dict(model.named_parameters())[TARGET].shape)
    masks = make_masks(model, [TARGET], density=density, kind=kind, calib=(x, y), seed=2, batch_size=len(x))
    idx = masks[TARGET]
    n = max(1, round(density * int(np.prod(shape))))
    assert idx.dtype == np.int64 and idx.shape == (len(shape), n)
    assert idx.min() >= 0 and np.all(idx.max(axis=1) < np.asarray(shape))
    flat = np.ravel_multi_index(tuple(idx), shape)
    assert np.all(np.diff(flat) > 0), "row-major sorted, unique"
    np.testing.assert_array_equal(np.stack(np.unravel_index(flat, shape)), idx)
    again = make_masks(model, [TARGET], density=density, kind=kind, calib=(x, y), seed=2, batch_size=len(x))
    np.testing.assert_array_equal(again[TARGET], idx)
    if kind in STRUCTURED:
        return  # ranked by units of the stored layout: tests/host/test_masks.py
    ref = MASK_REFERENCE[kind]
    if ref is None:
        other = make_masks(model, [TARGET], density=density, kind=kind, calib=(x, y), seed=3)
        assert not np.array_equal(other[TARGET], idx)
        return
    scores = ref(model, x, y).numpy()
    chosen = np.zeros(shape, dtype=bool)
    chosen[tuple(idx)] = True
    assert scores[chosen].min() >= scores[~chosen].max() - 1e-7


@pytest.mark.parametrize("kind,layer", CROSS)
def test_training_changes_only_masked_entries_and_merge_is_weight_plus_scatter(kind, layer):
    model, x, y = _case(layer)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks = make_masks(model, [TARGET, "fc.weight"], density=0.2, kind=kind, calib=(x, y))
    trained = train_shira(model, masks, x, y, epochs=3, lr=5e-2, batch_size=16, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the base model changed"

    merged = merge_shira(model, trained, alpha=0.5)
    for name, p in merged.named_parameters():
        if name not in trained:
            assert torch.equal(p, before[name]), f"{name} is not a target but changed"
            continue
        idx, delta = trained[name]
        np.testing.assert_array_equal(idx, masks[name])
        assert idx.dtype == np.int32 and delta.dtype == np.float32 and delta.shape == (idx.shape[1],)
        want = (
            before[name]
            .clone()
            .index_put_(tuple(torch.as_tensor(idx, dtype=torch.long)), 0.5 * torch.as_tensor(delta), accumulate=True)
        )
        assert torch.equal(p.detach(), want)
        changed = (p.detach() != before[name]).numpy()
        allowed = np.zeros_like(changed)
        allowed[tuple(idx)] = True
        assert not (changed & ~allowed).any() and changed.sum() >= 0.9 * idx.shape[1]


@pytest.mark.parametrize("layer", ["conv2d", "embedding"])
def test_training_reduces_the_loss(layer):
    model, x, y = _case(layer, n=96)
    masks = make_masks(model, select_targets(model), density=0.3, kind="snip", calib=(x, y))
    trained = train_shira(model, masks, x, y, epochs=15, lr=5e-2, batch_size=32, progress=False)
    with torch.no_grad():
        losses = [
            F.cross_entropy(m(torch.as_tensor(x)), torch.as_tensor(y)).item()
            for m in (model, merge_shira(model, trained))
        ]
    assert losses[1] < 0.9 * losses[0]


@pytest.mark.parametrize("layer", ["conv2d", "embedding"])
def test_dataloader_input_equals_the_same_batches_as_a_list(layer):
    model, x, y = _case(layer)
    loader = DataLoader(TensorDataset(torch.as_tensor(x), torch.as_tensor(y)), batch_size=16, shuffle=False)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(x), 16)]  # numpy batches, a plain list
    for kind in ("grad", "snip"):
        want = make_masks(model, [TARGET], density=0.1, kind=kind, calib=(x, y), batch_size=16)
        np.testing.assert_array_equal(
            make_masks(model, [TARGET], density=0.1, kind=kind, calib=loader)[TARGET], want[TARGET]
        )
        np.testing.assert_array_equal(
            make_masks(model, [TARGET], density=0.1, kind=kind, calib=batches)[TARGET], want[TARGET]
        )
    masks = make_masks(model, [TARGET], density=0.1, kind="wm")
    a = train_shira(model, masks, loader, epochs=2, lr=1e-2, progress=False)
    b = train_shira(model, masks, batches, epochs=2, lr=1e-2, progress=False)
    np.testing.assert_array_equal(a[TARGET][0], b[TARGET][0])
    np.testing.assert_allclose(a[TARGET][1], b[TARGET][1], rtol=1e-6, atol=1e-7)
    assert np.abs(a[TARGET][1]).min() > 0
    # saliency of the mean loss: batch-weighted gradients equal the one-batch gradient
    np.testing.assert_allclose(
        saliency(model, loader, params=[TARGET])[TARGET], saliency(model, x, y, [TARGET])[TARGET], rtol=1e-4, atol=1e-8
    )
    snip = train_snip(model, [TARGET], loader, density=0.1, epochs=1, lr=1e-2)
    snip_mask = make_masks(model, [TARGET], density=0.1, kind="snip", calib=loader)[TARGET]
    np.testing.assert_array_equal(snip[TARGET][0], snip_mask)
    with pytest.raises(ConfigError, match="one-shot"):
        train_shira(model, masks, iter(batches), epochs=2, progress=False)
    with pytest.raises(ConfigError, match="one-shot"):
        train_snip(model, [TARGET], iter(batches), density=0.1, epochs=1)
    with pytest.raises(ConfigError, match="pair"):
        train_shira(model, masks, [x], epochs=1, progress=False)


class DictOut(nn.Module):
    """A regression model returning an HF-style mapping: ``{"logits": [B, 2], "hidden": ...}``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.conv(x)).mean(2)
        return {"hidden": h, "logits": self.out(h) * (1.0 if scale is None else scale)}


def test_custom_loss_on_a_mapping_output_and_keyword_inputs():
    torch.manual_seed(0)
    model = DictOut().eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 2, 8)).astype(np.float32)
    target = np.stack([x[:, 0].mean(1), x[:, 1].std(1)], 1).astype(np.float32)
    seen = []

    def mse(out, t):
        seen.append(tuple(out.shape))
        return F.mse_loss(out, t)

    masks = make_masks(model, select_targets(model), density=0.5, kind="snip", calib=(x, target), loss=mse)
    trained = train_shira(model, masks, x, target, loss=mse, epochs=20, lr=5e-2, batch_size=16, progress=False)
    assert set(seen) == {(16, 2), (64, 2)}  # the loss saw "logits" (not "hidden"), per batch and for calibration
    with torch.no_grad():
        errs = [
            F.mse_loss(m(torch.as_tensor(x))["logits"], torch.as_tensor(target)).item()
            for m in (model, merge_shira(model, trained))
        ]
    assert errs[1] < 0.7 * errs[0]
    kw = [
        ({"x": torch.as_tensor(x[i : i + 16]), "scale": torch.tensor(2.0)}, torch.as_tensor(target[i : i + 16]))
        for i in range(0, 64, 16)
    ]
    assert train_shira(model, masks, kw, loss=mse, epochs=1, progress=False).keys() == masks.keys()
    with pytest.raises(ConfigError, match="scalar"):
        train_shira(model, masks, x, target, loss=lambda o, t: (o - t) ** 2, epochs=1, progress=False)


def test_select_targets_defaults_and_errors_name_every_missing_pattern():
    model = CNN()
    assert select_targets(model) == ["stem.weight", "dw.weight", "pw.weight", "fc.weight"]
    assert select_targets(model, ["dw", "fc"]) == ["dw.weight", "fc.weight"]
    assert select_targets(model, r"(dw|pw)") == ["dw.weight", "pw.weight"]
    emb = Net(nn.Embedding(20, 8), 8, (1,))
    assert select_targets(emb, ["body"]) == ["body.weight"]
    with pytest.raises(ConfigError) as err:
        select_targets(model, ["dw", "nope", "bn"])
    msg = str(err.value)
    assert "'nope'" in msg and "'bn'" in msg and "'dw'" not in msg.split("available")[0]
    assert "not adaptable" in msg and "stem" in msg  # bn exists but has a 1-D weight; the adaptable ones are listed
    with pytest.raises(ConfigError, match=r"\['conv\\\\d'\] match no adaptable module"):
        select_targets(model, r"conv\d")
    with pytest.raises(ConfigError, match="nothing to adapt"):
        select_targets(nn.Sequential(nn.ReLU()))


class CNN(nn.Module):
    """conv -> BatchNorm -> ReLU -> depthwise conv -> ReLU -> pointwise conv -> mean -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.dw(torch.relu(self.bn(self.stem(x)))))
        return self.fc(self.pw(h).mean((2, 3)))


@pytest.fixture(scope="module")
def exported_cnn(tmp_path_factory):
    from exporters.onnx import export_onnx

    torch.manual_seed(0)
    model = CNN()
    with torch.no_grad():  # non-trivial batch-norm statistics, so folding would show
        model.bn.running_mean.normal_(0, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    model.eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3, 6, 6)).astype(np.float32)
    y = rng.integers(0, 4, 32)
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    info = export_onnx(
        model, (torch.as_tensor(x[:2]),), path, input_names=["x"], output_names=["logits"], name="cnn", progress=False
    )
    return model, x, y, path, info


def test_export_keeps_conv_weight_names_and_shapes(exported_cnn):
    model, _, _, _, info = exported_cnn
    params = dict(model.named_parameters())
    assert set(info.tensors) == {"stem.weight", "dw.weight", "pw.weight", "fc.weight"}
    for name, t in info.tensors.items():
        assert tuple(t.shape) == tuple(params[name].shape) and not t.slot


@pytest.mark.parametrize("strategy", ["hybrid", "bound", "rebuild"])
def test_conv_adapter_switches_on_the_device(exported_cnn, tmp_path, strategy):
    from edge.format.adapter import load_adapter
    from edge.runtime import Runtime

    model, x, y, path, info = exported_cnn
    targets = select_targets(model, ["stem", "dw", "pw"])
    masks = make_masks(model, targets, density=0.25, kind="snip", calib=(x, y))
    trained = train_shira(model, masks, x, y, epochs=3, lr=5e-2, batch_size=16, progress=False)
    adapter = shira_adapter(trained, info, "cnn-a", {"mask": "snip"}, model=model)
    assert adapter.shapes == {k: tuple(model.get_parameter(k).shape) for k in targets}
    back = load_adapter(adapter.save(tmp_path / "a.safetensors"))
    for k in targets:
        np.testing.assert_array_equal(back.tensors[k].indices, trained[k][0])
        assert back.tensors[k].indices.shape[0] == 4
    merged = merge_shira(model, trained)
    with torch.no_grad():
        want_base, want = model(torch.as_tensor(x)).numpy(), merged(torch.as_tensor(x)).numpy()
    with Runtime(path, strategy=strategy) as rt:
        base = {k: rt.weights(k).copy() for k in targets}
        y0 = rt.run({"x": x})["logits"]
        np.testing.assert_allclose(y0, want_base, atol=1e-5, rtol=1e-4)
        rt.load_adapter(tmp_path / "a.safetensors", name="a")
        rt.switch("a")
        rt.wait_settled(30)
        for k in targets:
            np.testing.assert_array_equal(rt.weights(k), merged.get_parameter(k).detach().numpy())
        np.testing.assert_allclose(rt.run({"x": x})["logits"], want, atol=1e-5, rtol=1e-4)
        assert np.abs(want - want_base).max() > 1e-3, (
            "the adapter must change the outputs for this test to mean anything"
        )
        rt.switch(None)
        rt.wait_settled(30)
        for k in targets:
            np.testing.assert_array_equal(rt.weights(k), base[k])
        np.testing.assert_array_equal(rt.run({"x": x})["logits"], y0)


def test_shira_adapter_names_every_misfit(exported_cnn):
    model, x, y, _, info = exported_cnn
    good = (np.array([[0], [0], [0], [0]], np.int32), np.ones(1, np.float32))
    trained = {
        "dw.weight": good,
        "bn.weight": (np.array([[0]], np.int32), np.ones(1, np.float32)),  # 1-D: never exported as a target
        "renamed.weight": good,
        "pw.weight": (np.array([[0], [0]], np.int32), np.ones(1, np.float32)),  # a 4-D weight needs 4 index rows
    }
    with pytest.raises(AdapterMismatchError) as err:
        shira_adapter(trained, info, "bad")
    msg = str(err.value)
    assert (
        all(f"'{k}'" in msg for k in ("bn.weight", "renamed.weight", "pw.weight"))
        and "'dw.weight'" not in msg.split(". The")[0]
    )
    other = CNN()
    other.dw = nn.Conv2d(8, 8, 5, padding=2, groups=8)
    with pytest.raises(AdapterMismatchError, match="torch shape"):
        shira_adapter({"dw.weight": good}, info, "bad", model=other)
    assert shira_adapter({"dw.weight": good}, info, "ok").shapes == {"dw.weight": (8, 1, 3, 3)}
