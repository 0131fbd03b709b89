"""Regenerate the golden int8 files (issue 18) from ``tiny-mlp-v1.onnx`` (onnxruntime's quantizer; no torch).

    python tests/golden/make_int8.py

``tiny-mlp-int8-v1.onnx``: the golden MLP quantized by ``exporters.quantize_onnx`` (dynamic,
per tensor, 3x headroom). ``adapter-int8-v1.safetensors``: an integer SHiRA adapter for it
(int8 ``qvalues`` plus float reference deltas). ``expected-int8-v1.npz``: the inputs, the
integers the adapted weights must hold, and both outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]

from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from exporters.qshira import quantized_base  # noqa: E402
from exporters.quantize import quantize_onnx  # noqa: E402


def main() -> None:
    rng = np.random.default_rng(18)
    x = np.load(HERE / "expected-v1.npz")["x"]
    model = HERE / "tiny-mlp-int8-v1.onnx"
    calib = rng.standard_normal((64, x.shape[1])).astype(np.float32)
    quantize_onnx(HERE / "tiny-mlp-v1.onnx", model, mode="dynamic", calib={"x": calib}, headroom=3.0)
    info, base = quantized_base(model)
    tensors, shapes, adapted = {}, {}, {}
    for name, b in base.items():
        flat = np.sort(rng.choice(b.q.size, max(2, b.q.size // 5), replace=False))
        idx = np.stack(np.unravel_index(flat, b.q.shape)).astype(np.int32)
        q = np.clip(b.q[tuple(idx)].astype(np.int64) + rng.integers(-20, 21, flat.size), *b.bounds).astype(b.dtype)
        scale = np.broadcast_to(b.scale, b.q.shape)[tuple(idx)]
        tensors[name] = SparseDelta(idx, ((q.astype(np.float32) - b.q[tuple(idx)]) * scale).astype(np.float32), q)
        shapes[name] = b.q.shape
        w = b.q.copy()
        w[tuple(idx)] = q
        adapted[f"w:{name}"] = w
    Adapter("golden-int8", info.fingerprint, tensors, shapes, info={"golden": 1}).save(
        HERE / "adapter-int8-v1.safetensors"
    )
    with Runtime(model) as rt:
        out = {"x": x, "base": rt.run(x)["logits"]}
        rt.load_adapter(HERE / "adapter-int8-v1.safetensors")
        rt.switch("golden-int8")
        rt.wait_settled(30)
        out["adapted"] = rt.run(x)["logits"]
    np.savez(HERE / "expected-int8-v1.npz", **out, **adapted)


if __name__ == "__main__":
    main()
