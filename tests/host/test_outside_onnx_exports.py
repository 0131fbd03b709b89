"""Files exported the way other people export them (torch.onnx directly, both exporters), through `edge import-onnx`.

Every acceptance must be correct: the imported model answers as the original file does on onnxruntime, a
SHiRA adapter in the torch layout answers as the original with the delta merged into its stored weight, and
undo restores every weight bit for bit. The models are built once per session (a few seconds).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.runtime import Runtime  # noqa: E402


class Hand(nn.Module):
    """A pre-LN encoder block written by hand (q/k/v Linears, reshapes, softmax), pooled, with a head."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.f1, self.f2, self.head = nn.Linear(d, 32), nn.Linear(32, d), nn.Linear(d, 3)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        x = x + self.f2(torch.relu(self.f1(self.ln2(x))))
        return self.head(x.mean(1))


def cnn() -> nn.Module:
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 4),
    )
    for bn in (m[1], m[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
    return m


def encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Flatten(), nn.Linear(64, 3))


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), (2, 8)),
    "cnn": (cnn, (2, 3, 6, 6)),
    "hand": (Hand, (2, 4, 16)),
    "encoder": (encoder, (2, 4, 16)),
}
#: name -> (model, exporter, opset, dynamic batch, keep_initializers_as_inputs)
EXPORTS = {
    "mlp-legacy13-dyn": ("mlp", "legacy", 13, True, False),
    "cnn-legacy11-inputs": ("cnn", "legacy", 11, True, True),
    "cnn-dynamo18": ("cnn", "dynamo", 18, False, False),
    "hand-legacy14": ("hand", "legacy", 14, False, False),
    "hand-dynamo18-dyn": ("hand", "dynamo", 18, True, False),
    "encoder-legacy17": ("encoder", "legacy", 17, False, False),
}


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("outside")
    out = {}
    for name, (kind, exporter, opset, dynamic, as_inputs) in EXPORTS.items():
        make, shape = MODELS[kind]
        torch.manual_seed(0)
        model, x = make().eval(), torch.randn(shape)
        path = root / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                dims = {"x": {0: torch.export.Dim("batch", min=1, max=16)}} if dynamic else None
                prog = torch.onnx.export(
                    model,
                    (x,),
                    None,
                    dynamo=True,
                    opset_version=opset,
                    dynamic_shapes=dims,
                    input_names=["x"],
                    output_names=["y"],
                )
                prog.save(str(path))
            else:
                torch.onnx.export(
                    model,
                    (x,),
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=["x"],
                    output_names=["y"],
                    dynamic_axes={"x": {0: "b"}} if dynamic else None,
                    keep_initializers_as_inputs=as_inputs,
                )
        out[name] = (path, x.numpy())
    return out


def _merged(path, info, deltas) -> ort.InferenceSession:
    """The imported file with each torch-layout delta added to its stored weight (transposed or BN-scaled)."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    for key, (idx, values) in deltas.items():
        t = info.tensors[key]
        stored = numpy_helper.to_array(inits[t.initializer]).copy()
        view = stored.T if t.transposed else stored.reshape(t.shape)
        if t.channel_scale is not None:
            values = values * np.asarray(t.channel_scale, np.float32)[idx[0]]
        np.add.at(view, tuple(idx), values)
        inits[t.initializer].CopyFrom(numpy_helper.from_array(stored, t.initializer))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", EXPORTS)
def test_a_foreign_export_imports_switches_and_undoes_exactly(exported, tmp_path, name):
    path, x = exported[name]
    report = import_onnx(path, tmp_path / "m.edge.onnx")
    info = report.info
    assert info.tensors  # the only weights left out: those the exporter folded a BatchNorm into (no state dict given)
    assert all("folded a BatchNorm" in why for why in report.skipped.values()), report.skipped
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rng = np.random.default_rng(0)
    deltas = {}
    for key, t in info.tensors.items():
        flat = rng.choice(int(np.prod(t.shape)), size=3, replace=False)
        deltas[key] = (np.stack(np.unravel_index(flat, t.shape)).astype(np.int32), np.float32([0.3, -0.2, 0.1]))
    adapter = Adapter(
        "a",
        info.fingerprint,
        {k: SparseDelta(*d) for k, d in deltas.items()},
        {k: tuple(t.shape) for k, t in info.tensors.items()},
    )
    with Runtime(tmp_path / "m.edge.onnx", strategy="rebuild") as rt:
        base = rt.run({"x": x})["y"]
        np.testing.assert_allclose(base, want, atol=1e-5)
        before = {k: np.array(rt.weights(k)) for k in info.tensors}
        rt.load_adapter(adapter)
        rt.switch("a")
        got = rt.run({"x": x})["y"]
        np.testing.assert_allclose(
            got, _merged(tmp_path / "m.edge.onnx", info, deltas).run(None, {"x": x})[0], atol=1e-5
        )
        assert not np.allclose(got, base, atol=1e-4)
        rt.switch(None)
        assert all(np.array_equal(before[k].view(np.uint32), np.array(rt.weights(k)).view(np.uint32)) for k in before)
        np.testing.assert_array_equal(rt.run({"x": x})["y"], base)
