"""Taps on a CNN with GroupNorm (ResNet-GN, wav2vec2's feature encoder: ``nn.GroupNorm`` in 2-D and 1-D CNNs).

torch exports ``GroupNorm`` (TorchScript at opsets 17 and 18, dynamo alike) as ``Reshape`` to ``[B, G, -1]``,
``InstanceNormalization``, ``Reshape`` back to the map's own ``Shape`` (dynamo's with ``start=0``), then the affine
``Mul``/``Add``. Before:

- ``Layouts`` stopped at that ``Reshape``: a map after a GroupNorm that nothing but a mean reads (the last stage)
  was refused by name, 'the graph does not tell its layout' (the rank alone had tapped it as NCHW before);
- ``taps="stages"`` lost the resolution levels at the first GroupNorm: one stage of three.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from edge.route.taps import FEATURES, tap_model  # noqa: E402


class GroupNormCNN(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.dims = dims
        self.c1, self.g1 = conv(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.c2, self.g2 = conv(8, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16)
        self.c3, self.g3 = conv(16, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.g1(self.c1(x)))
        x = torch.relu(self.g2(self.c2(x)))
        x = torch.relu(self.g3(self.c3(x)))
        return self.fc(x.mean(tuple(range(2, 2 + self.dims))))


SHAPES = {2: (2, 3, 16, 16), 1: (2, 3, 64)}


EXPORTS = {"script-17": (False, 17), "script-18": (False, 18), "dynamo-18": (True, 18)}


def _export(path, dims: int, export: str) -> np.ndarray:
    torch.manual_seed(0)
    x = torch.randn(*SHAPES[dims])
    dynamo, opset = EXPORTS[export]
    torch.onnx.export(GroupNormCNN(dims).eval(), (x,), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=dynamo, opset_version=opset)  # fmt: skip
    return x.numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(dims, export) -> (path, x)``: each export made once for the module (both tests below read the same ones;
    tap_model writes its own file)."""
    made = {}

    def get(dims: int, export: str):
        if (dims, export) not in made:
            path = tmp_path_factory.mktemp(f"gn-{dims}-{export}") / "gn.onnx"
            made[dims, export] = path, _export(path, dims, export)
        return made[dims, export]

    return get


def _raw(path, tensors) -> ort.InferenceSession:
    m = onnx.load(path)
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
    return ort.InferenceSession(m.SerializeToString())


@pytest.mark.parametrize("export", list(EXPORTS))
@pytest.mark.parametrize("dims", [2, 1])
def test_a_groupnorm_cnn_gets_a_stage_per_resolution_each_pooled_over_its_spatial_axes(
    exported, tmp_path, dims, export
):
    path, x = exported(dims, export)
    t = tap_model(path, tmp_path / "gn.tapped.onnx", "stages")
    assert len(t.tensors) == 3 and t.width == 8 + 16 + 16
    raw = _raw(path, t.tensors).run(list(t.tensors), {"x": x})
    assert [r.shape[1:2] for r in raw] == [(8,), (16,), (16,)] and all(r.ndim == dims + 2 for r in raw)
    assert [r.shape[2] for r in raw] == [SHAPES[dims][2], SHAPES[dims][2] // 2, SHAPES[dims][2] // 4]
    feats = ort.InferenceSession(str(t.path)).run([FEATURES], {"x": x})[0]
    want = np.concatenate([r.mean(tuple(range(2, r.ndim))) for r in raw], 1)
    np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("export", ["script-17", "dynamo-18"])
@pytest.mark.parametrize("dims", [2, 1])
def test_the_map_after_the_last_groupnorm_is_tapped_by_name_as_channels_first(exported, tmp_path, dims, export):
    path, x = exported(dims, export)
    last = "relu_2" if export.startswith("dynamo") else "/Relu_2_output_0"  # relu(GroupNorm(conv)), read by a mean
    t = tap_model(path, tmp_path / "gn.tapped.onnx", [last])
    assert t.width == 16
    (raw,) = _raw(path, [last]).run([last], {"x": x})
    feats = ort.InferenceSession(str(t.path)).run([FEATURES], {"x": x})[0]
    np.testing.assert_allclose(feats, raw.mean(tuple(range(2, raw.ndim))), rtol=1e-5, atol=1e-6)
