"""Cold start of ``edge update --taps`` on a device: the first run taps the model (and imports onnx); a second run
with the same model file reuses the tapped copy and imports no onnx (:mod:`edge.route.tapcache`). Each run is a
fresh interpreter that lists the modules it added to ``sys.modules`` (as tests/device/test_coldstart_cli.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_coldstart_cli import WRAPPER  # run edge ARGV in-process, print the modules it imported

ROOT = Path(__file__).resolve().parents[2]
DEMO = Path.home() / ".cache" / "edge" / "digits-07d9c19ac5e7" / "encoder.onnx"


def _onnx(modules: list[str]) -> list[str]:
    """onnx's modules, but for its generated classes loaded alone (edge.format.onnx_proto: what loading runs)."""
    return [m for m in modules if (m == "onnx" or m.startswith("onnx.")) and m != "onnx.onnx_ml_pb2"]


@pytest.mark.skipif(not DEMO.is_file(), reason="needs the demo model (make demo)")
def test_a_second_update_over_taps_imports_no_onnx(tmp_path):
    shutil.copyfile(DEMO, tmp_path / "enc.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((8, 1, 8, 8)).astype(np.float32), y=np.arange(8) % 2)
    argv = ["update", "--model", str(tmp_path / "enc.onnx"), "--data", str(tmp_path / "d.npz"), "--taps", "auto"]
    env = {**os.environ, "EDGE_TAP_CACHE": str(tmp_path / "taps")}
    runs = []
    for _ in range(2):
        r = subprocess.run(
            [sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env
        )
        assert r.returncode == 0, r.stderr
        runs.append(json.loads(r.stdout.splitlines()[-1]))
    (first, second) = runs
    assert first["code"] == second["code"] == 0
    assert "onnx" in first["added"]  # the first run taps: the test measures something
    assert not _onnx(second["added"]), _onnx(second["added"])
    assert not [m for m in second["added"] if m in ("edge.route.taps", "edge.route.tapsets", "ml_dtypes")]
    assert "onnxruntime" in second["added"] and "edge.route.tapcache" in second["added"]


@pytest.mark.skipif(not DEMO.is_file(), reason="needs the demo model (make demo)")
def test_two_updates_at_once_tap_the_model_once(tmp_path):
    """Both start before either has tapped: one taps under the entry's lock, the other waits and reads its copy."""
    shutil.copyfile(DEMO, tmp_path / "enc.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((8, 1, 8, 8)).astype(np.float32), y=np.arange(8) % 2)
    env = {**os.environ, "EDGE_TAP_CACHE": str(tmp_path / "taps")}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edge.cli",
                "-v",
                "update",
                "--model",
                str(tmp_path / "enc.onnx"),
                "--data",
                str(tmp_path / "d.npz"),
                "--taps",
                "auto",
                "--method",
                "ncm",
                "--json",
                str(tmp_path / f"r{i}.json"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    tapped = [line for e in errs for line in e.splitlines() if line.startswith("edge.taps: tapped /")]
    assert len(tapped) == 1, errs
    (entry,) = [p for p in (tmp_path / "taps").iterdir() if p.is_dir()]
    assert sorted(p.name for p in entry.iterdir()) == ["enc.onnx", "tap.json"]
    reports = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    assert reports[0]["samples_seen"] == reports[1]["samples_seen"] == 8
