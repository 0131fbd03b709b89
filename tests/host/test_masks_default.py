"""The default SHiRA mask: make_masks without ``kind`` is the measured best (``wm``), the demo's too."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import nn

from exporters.shira import MASKS, make_masks
from lab.pipeline import DemoConfig

torch.set_num_threads(1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 3)).eval()


def test_default_kind_is_weight_magnitude_and_needs_no_data():
    model = _net()
    targets = ["0.weight", "2.weight"]
    default = make_masks(model, targets, density=0.1)  # no calib: wm reads only the weights
    for name, idx in default.items():
        np.testing.assert_array_equal(idx, make_masks(model, targets, density=0.1, kind="wm")[name])
        w = dict(model.named_parameters())[name].detach().abs().numpy()
        chosen = np.zeros(w.shape, bool)
        chosen[tuple(idx)] = True
        assert w[chosen].min() >= w[~chosen].max()  # the largest |w|, not a gradient score
    assert not MASKS["wm"].needs_calib


def test_library_and_demo_defaults_agree():
    default = inspect.signature(make_masks).parameters["kind"].default
    assert default == DemoConfig().mask == DemoConfig(model="cnn").mask == "wm"
