"""Regenerate the golden ``.tflite`` files with the real converter (host side, litert-torch).

    python tests/golden/make_tflite.py      # in a venv with litert-torch (the tflite-export extra)

``tiny-mlp-v1.tflite``: the torch twin of ``tiny-mlp-v1.onnx`` (same weights, read from
it), exported with a fixed batch of 1; the ONNX golden outputs must be reproduced.
``branch-mlp-v1.tflite``: ``_tiny.make_branch_mlp``'s math as a torch module with the
bottleneck branch exported as slots (graph inputs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]

from exporters.tflite import export_tflite  # noqa: E402


class Mlp(torch.nn.Module):
    def __init__(self, d_in=10, d_hid=20, d_out=2) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d_in, d_hid), torch.nn.Linear(d_hid, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class BranchMlp(torch.nn.Module):
    def __init__(self, d_in=10, d_hid=16, r=4) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, d_hid)
        self.fc2 = torch.nn.Linear(d_hid, 2, bias=False)
        self.branch = torch.nn.Module()
        self.branch.down = torch.nn.Linear(d_in, r, bias=False)
        self.branch.up = torch.nn.Linear(r, d_hid, bias=False)

    def forward(self, x):
        h = torch.relu(self.fc1(x)) + self.branch.up(torch.relu(self.branch.down(x)))
        return self.fc2(h)


def main() -> None:
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(HERE / "tiny-mlp-v1.onnx")).graph.initializer}
    mlp = Mlp().eval()
    with torch.no_grad():
        mlp.fc1.weight.copy_(torch.as_tensor(inits["fc1.weight"].T))  # stored transposed in the ONNX file
        mlp.fc1.bias.copy_(torch.as_tensor(inits["fc1.bias"]))
        mlp.fc2.weight.copy_(torch.as_tensor(inits["fc2.weight"]))
        mlp.fc2.bias.copy_(torch.as_tensor(inits["fc2.bias"]))
    x = torch.as_tensor(np.load(HERE / "expected-v1.npz")["x"][:1])
    export_tflite(
        mlp, (x,), HERE / "tiny-mlp-v1.tflite", name="tiny-mlp", input_names=["x"], output_names=["logits"],
        dynamic_batch=False,
    )  # fmt: skip

    rng = np.random.default_rng(0)
    branch = BranchMlp().eval()
    with torch.no_grad():
        branch.fc1.weight.copy_(torch.as_tensor(rng.standard_normal((16, 10)).astype(np.float32) * 0.5))
        branch.fc1.bias.copy_(torch.as_tensor(rng.standard_normal(16).astype(np.float32) * 0.1))
        branch.fc2.weight.copy_(torch.as_tensor(rng.standard_normal((2, 16)).astype(np.float32) * 0.5))
        branch.branch.down.weight.zero_()
        branch.branch.up.weight.zero_()
    export_tflite(
        branch, (torch.zeros(2, 10),), HERE / "branch-mlp-v1.tflite", name="branch-mlp", input_names=["x"],
        output_names=["logits"], slots=["branch.down.weight", "branch.up.weight"], dynamic_batch=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
