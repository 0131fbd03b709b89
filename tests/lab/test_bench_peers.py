"""Peers of fused-mode switching: onnxruntime's multi-LoRA API and session re-creation, on a tiny model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _tiny import base_weights, make_mlp

from edge.errors import ConfigError
from lab.bench_peers import add_lora_inputs, bench_peers

X = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)


def test_lora_inputs_are_overridable_and_match_w_plus_ab(tmp_path):
    path = tmp_path / "m.onnx"
    info = make_mlp(path)
    m = add_lora_inputs(onnx.load(str(path)), info, {"fc1.weight": 2})
    onnx.save(m, str(tmp_path / "lora.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "lora.onnx"), providers=["CPUExecutionProvider"])
    assert {i.name for i in sess.get_overridable_initializers()} == {"fc1.weight.lora_A", "fc1.weight.lora_B"}
    base = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    np.testing.assert_array_equal(sess.run(None, {"x": X})[0], base)  # zero defaults: the base model

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((10, 2)).astype(np.float32), rng.standard_normal((2, 20)).astype(np.float32)
    fmt = ort.AdapterFormat()
    fmt.set_parameters(
        {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in {"fc1.weight.lora_A": a, "fc1.weight.lora_B": b}.items()}
    )
    fmt.export_adapter(str(tmp_path / "a.onnx_adapter"))
    adapter = ort.LoraAdapter()
    adapter.Load(str(tmp_path / "a.onnx_adapter"))
    ro = ort.RunOptions()
    ro.add_active_adapter(adapter)
    w = base_weights(path, info)
    w2 = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    h = np.maximum(X @ (w["fc1.weight"].T + a @ b) + w2["fc1.bias"], 0)
    np.testing.assert_allclose(sess.run(None, {"x": X}, ro)[0], h @ w["fc2.weight"].T + w2["fc2.bias"], rtol=1e-5)


def test_gemm_weights_are_refused(tmp_path):
    info = make_mlp(tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="fc2.weight"):
        add_lora_inputs(onnx.load(str(tmp_path / "m.onnx")), info, {"fc2.weight": 1})


def test_bench_peers_reports_every_contestant(tmp_path):
    path = tmp_path / "m.onnx"
    make_mlp(path, sizes=(10, 40, 2))
    r = bench_peers(path, {"x": X}, density=0.2, targets="fc1", runs=10, rounds=2, switches=2, progress=False)
    assert set(r["peers"]) == {"default (hybrid)", "ort_multi_lora", "session_recreate"}
    for v in r["peers"].values():
        assert v["switch_ms_p50"] > 0 and v["infer_ms_p50"] > 0 and v["rss_mb"] is not None
    assert r["lora_rank_p50"] == 2 and r["targets"] == 1 and r["static_rss_mb"] is not None  # 2 = round(0.2*400/50)


def test_peers_peft_and_text_modules_need_no_torch(tmp_path):
    """lab.bench_peers, edge.convert.peft and edge.text are device side: they run with torch blocked."""
    import json
    import subprocess
    import sys

    from _blocking import BLOCK_TORCH, ROOT
    from safetensors.numpy import save_file

    info = make_mlp(tmp_path / "m.onnx")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    save_file(
        {
            "base_model.model.fc1.lora_A.weight": np.ones((1, 10), np.float32),
            "fc1.lora_B.weight": np.ones((20, 1), "f"),
        },
        str(tmp_path / "p" / "adapter_model.safetensors"),
    )
    code = BLOCK_TORCH + (
        "import lab.bench_peers, edge.text\n"
        "from edge.cli import main\n"
        "args = ['import-peft', sys.argv[1], '--base', sys.argv[2], '--out', sys.argv[3]]\n"
        "assert main(args) == 0\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules)\n"
    )
    argv = [str(tmp_path / "p"), str(tmp_path / "m.onnx"), str(tmp_path / "a.safetensors")]
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["base_fingerprint"] == info.fingerprint
