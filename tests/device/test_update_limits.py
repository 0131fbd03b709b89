"""How many sample bytes `edge update` loads: a share of the device profile's memory budget, with a hard cap."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.cli import main
from edge.errors import ConfigError, FormatError
from edge.format.modelinfo import META_KEY, ModelInfo, TensorInfo, fingerprint
from edge.format.samples import MAX_ARRAY_BYTES, SAMPLES_SHARE, load_samples, sample_limit

ROOT = Path(__file__).resolve().parents[2]
MB = 1 << 20
D_IN, D_FEAT, CLASSES = 8, 16, 4
PER_SAMPLE = D_IN * 4 + 8  # float32 x row + int64 label


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """x[B,8] -> MatMul+ReLU -> features[B,16] -> Gemm -> logits[B,4], with this project's metadata."""
    rng = np.random.default_rng(0)
    stored = {
        "fc1.weight": rng.standard_normal((D_IN, D_FEAT)).astype(np.float32),
        "head.weight": rng.standard_normal((CLASSES, D_FEAT)).astype(np.float32),
        "head.bias": np.zeros(CLASSES, np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "fc1.weight"], ["h"]),
            helper.make_node("Relu", ["h"], ["features"]),
            helper.make_node("Gemm", ["features", "head.weight", "head.bias"], ["logits"], transB=1),
        ],
        "limits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D_IN])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", D_FEAT]),
        ],
        [numpy_helper.from_array(v, k) for k, v in stored.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    info = ModelInfo(
        name="limits",
        fingerprint=fingerprint(stored),
        tensors={"head.weight": TensorInfo("head.weight", (CLASSES, D_FEAT))},
        inputs=("x",),
        outputs=("logits", "features"),
    )
    helper.set_model_props(proto, {META_KEY: info.to_json()})
    path = tmp_path_factory.mktemp("limits") / "encoder.onnx"
    onnx.save(proto, str(path))
    return path


def _samples(path: Path, n: int) -> Path:
    rng = np.random.default_rng(n)
    np.savez(path, x=rng.standard_normal((n, D_IN)).astype(np.float32), y=np.arange(n, dtype=np.int64) % CLASSES)
    with np.load(path) as f:
        assert sum(f[k].nbytes for k in f.files) == n * PER_SAMPLE
    return path


def _profile(tmp_path: Path, memory_mb: float) -> Path:
    text = (ROOT / "devices" / "x86-dev.yaml").read_text()
    text, n = re.subn(r"(?m)^  memory_mb: \d+", f"  memory_mb: {memory_mb}", text)
    assert n == 1
    path = tmp_path / f"small-{memory_mb}.yaml"
    path.write_text(text.replace("name: x86-dev", f"name: small-{memory_mb}"))
    return path


def _update(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = main(["update", "--method", "ncm", "--threads", "1", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_sample_limit_is_a_share_of_what_the_update_leaves():
    limit, why = sample_limit(1024, 64, source="device rpi4")
    assert limit == int(SAMPLES_SHARE * 960 * MB) == 335_544_320
    assert "device rpi4's memory_mb 1024 MB" in why and "update's 64 MB" in why and "960 MB" in why
    limit, why = sample_limit(8192, 64)  # a third of 8128 MB is over the hard cap
    assert limit == MAX_ARRAY_BYTES and "hard cap" in why
    for memory_mb, update_mb, match in [(64, 64, "leaves nothing"), (0, 1, "must be positive"), (10, -1, "positive")]:
        with pytest.raises(ConfigError, match=match):
            sample_limit(memory_mb, update_mb)


def test_update_bounds_samples_by_the_device_memory_budget(model, tmp_path, capsys):
    """memory_mb 67 with the update's 64 MB leaves 3 MB; the samples may take a third: 1 MiB."""
    profile = _profile(tmp_path, 67)
    limit = MB
    fits = _samples(tmp_path / "fits.npz", limit // PER_SAMPLE // 2)
    over = _samples(tmp_path / "over.npz", limit // PER_SAMPLE + 1)
    common = ["--model", str(model), "--device", str(profile)]

    code, out, err = _update(capsys, *common, "--data", str(fits))
    assert code == 0, err
    assert out["samples_limit_bytes"] == limit and out["budget_mb"] == 64.0
    assert "memory_mb 67 MB" in out["samples_limit_from"] and out["samples_seen"] == limit // PER_SAMPLE // 2

    code, _, err = _update(capsys, *common, "--data", str(over))
    assert code == 2
    total = (limit // PER_SAMPLE + 1) * PER_SAMPLE  # 'x' fits alone, 'y' tips it over
    assert f"arrays would take {total} bytes" in err and f"over the limit of {limit} bytes" in err, err
    assert "memory_mb 67 MB" in err and "update's 64 MB" in err and "fewer samples at a time" in err

    # --eval is held beside the samples and takes from the same limit
    code, out, err = _update(capsys, *common, "--data", str(fits), "--eval", str(fits))  # twice half: fits
    assert code == 0 and 0 <= out["eval_acc"] <= 1, err
    big_eval = _samples(tmp_path / "eval.npz", limit // PER_SAMPLE // 2 + 100)
    code, _, err = _update(capsys, *common, "--data", str(fits), "--eval", str(big_eval))
    assert code == 2 and f"over the limit of {limit - (limit // PER_SAMPLE // 2) * PER_SAMPLE} bytes" in err, err

    # the same data with a device that has the memory passes; the update's own budget is taken off first
    code, out, err = _update(capsys, *common[:2], "--device", str(_profile(tmp_path, 80)), "--data", str(over))
    assert code == 0 and out["samples_limit_bytes"] == int(16 * MB / 3), err
    code, _, err = _update(capsys, *common, "--memory-mb", "67", "--data", str(fits))
    assert code == 2 and "leaves nothing of device" in err and "memory_mb 67 MB" in err, err


def test_update_without_a_device_keeps_the_hard_cap(model, tmp_path, capsys):
    code, out, err = _update(capsys, "--model", str(model), "--data", str(_samples(tmp_path / "d.npz", 40)))
    assert code == 0, err
    assert out["samples_limit_bytes"] == MAX_ARRAY_BYTES and "no --device" in out["samples_limit_from"]


def test_a_file_larger_than_what_is_left_is_refused_before_it_is_read(tmp_path):
    """Its bytes would be resident while read: the file may be at most the arrays' limit plus header slack."""
    path = tmp_path / "big.npz"
    np.savez(path, x=np.zeros((2 * MB // 32, D_IN), np.float32), y=np.zeros(2 * MB // 32, np.int64))
    with pytest.raises(
        FormatError,
        match=r"data file \(limit: a test budget; update with fewer samples at a time\) .* over the limit of \d+ bytes",
    ):
        load_samples(path, max_array_bytes=1000, limit_from="a test budget")
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(3):
        _samples(folder / f"{i}.npz", 100)
    got = load_samples(folder, max_array_bytes=3 * 100 * PER_SAMPLE)  # exactly fits, summed over the folder
    assert [len(y) for _, _, y in got] == [100, 100, 100]
    with pytest.raises(FormatError, match="over the limit of 3999 bytes"):
        load_samples(folder, max_array_bytes=3 * 100 * PER_SAMPLE - 1)
