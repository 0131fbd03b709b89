"""`edge bench switch --backend tflite --model-file M.tflite --inputs X.npz` (README, LiteRT on the device) with
inputs the file was not exported for: one line and exit 2, before any timing.

The runtime runs a batch larger than the file's in chunks, but the plain interpreter the bench compares it with
does not: inputs of batch 3 for a batch-1 file ended in LiteRT's "Dimension mismatch" traceback (exit 1).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edge.cli import main
from edge.errors import ConfigError
from lab.bench_switch import bench_switch

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny-mlp-v1.tflite"  # x[1, 10] -> logits[1, 2]


@pytest.mark.parametrize(
    "feeds",
    [{"x": np.zeros((3, 10), np.float32)}, {"pixels": np.zeros((1, 10), np.float32)}],
    ids=["batch-3-for-a-batch-1-file", "another-input-name"],
)
def test_litert_bench_refuses_inputs_the_plain_interpreter_cannot_take(tmp_path, feeds):
    pytest.importorskip("ai_edge_litert")
    shutil.copy(GOLDEN, tmp_path / "m.tflite")
    with pytest.raises(ConfigError, match=r"m\.tflite takes inputs \{'x': \(1, 10\)\}"):
        bench_switch(tmp_path / "m.tflite", feeds, backend="tflite", runs=2, rounds=1, switches=1, progress=False)


def test_the_readme_command_exits_2_with_one_line(tmp_path, capsys):
    pytest.importorskip("ai_edge_litert")
    shutil.copy(GOLDEN, tmp_path / "encoder.tflite")
    np.savez(tmp_path / "x.npz", x=np.zeros((3, 10), np.float32))
    args = ["bench", "switch", "--backend", "tflite", "--model-file", str(tmp_path / "encoder.tflite")]
    assert main([*args, "--inputs", str(tmp_path / "x.npz"), "--runs", "2", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edge: error: encoder.tflite takes inputs") and "\n" not in err, err
