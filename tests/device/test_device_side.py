"""The device side (edge, runtimes) works with torch absent, and `edge --help` needs only numpy."""

import subprocess
import sys

from _blocking import BLOCK_TORCH, ROOT

SCRIPT = (
    BLOCK_TORCH
    + """
from pathlib import Path
import numpy as np
import edge
from edge.runtime import Runtime
golden = Path(sys.argv[1])
with Runtime(golden / "tiny-mlp-v1.onnx") as rt:
    rt.load_adapter(golden / "adapter-v1.safetensors")
    for strategy_switch in ["golden-a", None, {"golden-a": 0.5}]:
        rt.switch(strategy_switch)
    rt.wait_settled(30)
    rt.run(np.zeros((1, 10), np.float32))
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
print("ok", rt.strategy)
"""
)


def test_runtime_without_torch():
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "tests" / "golden")], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok hybrid")


def test_cli_help_and_inspect_without_torch():
    for args in (["--help"], ["inspect", str(ROOT / "tests" / "golden" / "adapter-v1.safetensors")]):
        code = BLOCK_TORCH + "from edge.cli import main; sys.exit(main(sys.argv[1:]))"
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
    assert '"golden-a"' in r.stdout


def test_demo_without_torch_says_what_to_install():
    code = BLOCK_TORCH + "from edge.cli import main; sys.exit(main(['demo', '-q', '--cache', sys.argv[1]]))"
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / ".no-cache")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "needs torch" in r.stderr and "edge-adapt[host]" in r.stderr
