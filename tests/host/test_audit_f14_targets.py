"""Audit F14: a CRNN's recurrent weights on the host (conv features read as a sequence by a GRU/LSTM, then a Linear).

`select_targets(model, ["rnn"])` refused the GRU without saying that its weights are adaptable by parameter name;
they are: SHiRA on `rnn.weight_ih_l0`/`weight_hh_l0`, exported by `export_onnx` (torch's layout kept, sliced into
ONNX's gate order in the graph), switches on onnxruntime as torch computes it, and undoes bit for bit.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from edge.errors import ConfigError  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from exporters import export_onnx, make_masks, merge_shira, select_targets, shira_adapter, train_shira  # noqa: E402

torch.set_num_threads(1)


class CRNN(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.rnn = getattr(nn, kind)(4 * 4, 6, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))  # [B, 4, 4, W]
        b, c, hh, w = h.shape
        out, _ = self.rnn(h.permute(0, 3, 1, 2).reshape(b, w, c * hh))
        return self.fc(out.mean(1))


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_a_recurrent_module_refused_by_module_name_names_its_weights(kind):
    torch.manual_seed(0)
    model = CRNN(kind)
    assert select_targets(model) == ["conv.weight", "fc.weight"]
    with pytest.raises(ConfigError, match=r"make_masks\(model, \['rnn.weight_ih_l0', 'rnn.weight_hh_l0'\]"):
        select_targets(model, ["rnn"])


def test_shira_on_gru_weights_switches_on_the_device_as_torch_computes(tmp_path):
    torch.manual_seed(0)
    model = CRNN("GRU").eval()
    rng = np.random.default_rng(0)
    x = rng.random((24, 1, 4, 6), dtype=np.float32)
    y = rng.integers(0, 3, 24)
    info = export_onnx(  # dynamic batch from an example batch of 2 (with 1, torch.export fixes the GRU's batch)
        model, (torch.as_tensor(x[:2]),), tmp_path / "m.onnx", input_names=["x"], output_names=["logits"],
        name="crnn", progress=False,
    )  # fmt: skip
    targets = ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]
    assert set(targets) <= set(info.tensors)
    trained = train_shira(model, make_masks(model, targets, density=0.1), x, y, epochs=2, lr=5e-2, progress=False)
    merged = merge_shira(copy.deepcopy(model), trained)
    with torch.no_grad():
        want0, want1 = model(torch.as_tensor(x[:3])).numpy(), merged(torch.as_tensor(x[:3])).numpy()
    assert np.abs(want1 - want0).max() > 1e-3
    for strategy in ("bound", "rebuild"):
        with Runtime(tmp_path / "m.onnx", strategy=strategy) as rt:
            before = {k: rt.weights(k) for k in targets}
            y0 = rt.run({"x": x[:3]})["logits"]
            np.testing.assert_allclose(y0, want0, atol=1e-5)
            rt.load_adapter(shira_adapter(trained, info, "rnn", model=model))
            rt.switch("rnn")
            np.testing.assert_allclose(rt.run({"x": x[:3]})["logits"], want1, atol=1e-5)
            rt.switch(None)
            assert all(rt.weights(k).tobytes() == before[k].tobytes() for k in targets)
            np.testing.assert_array_equal(rt.run({"x": x[:3]})["logits"], y0)


def test_a_batch_of_one_that_torch_export_fixes_says_to_give_two(tmp_path):
    """The README's example exports at batch 1; with a GRU, torch.export fixed the batch and the refusal said only
    'export with dynamic_batch=False'; an example batch of 2 exports a dynamic batch (the test above). In a fresh
    process: after an export at batch 2 in the same process, torch exports the batch-1 example dynamic too."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_audit_f14_targets import CRNN
from edge.errors import ExportValidationError
from exporters import export_onnx
torch.manual_seed(0)
try:
    export_onnx(CRNN("GRU").eval(), (torch.rand(1, 1, 4, 6),), {str(tmp_path / "m.onnx")!r}, input_names=["x"],
                output_names=["logits"], name="crnn", progress=False)
except ExportValidationError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert "example batch of 2 or more" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert not (tmp_path / "m.onnx").exists()
