"""The layout's rules, checked on every `make test`: what ships to a device imports nothing of the host.

* import-linter's contracts in pyproject.toml (device never imports host, lab or torch; backends
  import only the shared formats; layers; no cycles);
* no dynamic import of the host or lab from the device packages (contracts see only static imports);
* modules stay small enough to read in one sitting (device, host and lab alike);
* no private name of one module imported by another;
* the device commands and a switch run with torch, scikit-learn, tqdm, the exporters and the lab blocked.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ("edge", "runtimes")
PROJECT = ("edge", "runtimes", "exporters", "lab")
MAX_LINES = 460  # "about 450" (STYLE.md)


def _sources(packages=DEVICE):
    for pkg in packages:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def test_import_contracts():
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.fail("import-linter is not installed: pip install 'edge-adapt[test]'")
    r = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_no_dynamic_import_of_host_or_lab_from_device():
    pattern = re.compile(r"""["'](exporters|lab)(\.[A-Za-z_.]+)?(:[A-Za-z_]+)?["']""")
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.fullmatch(repr(node.value)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "device code names host or lab modules (dynamic import?):\n" + "\n".join(found)


def test_modules_are_small():
    long = {
        str(p.relative_to(ROOT)): n for p in _sources(PROJECT) if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines; split them along their concerns: {long}"


def test_no_private_names_imported_across_modules():
    found = []
    for path in _sources(PROJECT):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {alias.name}")
    assert not found, "private names imported across modules (make them public or move them):\n" + "\n".join(found)


BLOCK = """
import importlib.abc, sys
BLOCKED = ("torch", "sklearn", "tqdm", "transformers", "peft", "exporters", "lab")
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the device install does not have it")
sys.meta_path.insert(0, _Block())
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["devices"],
        ["inspect", "tests/golden/tiny-mlp-v1.onnx"],
        ["inspect", "tests/golden/adapter-v1.safetensors"],
    ],
    ids=["help", "devices", "inspect-model", "inspect-adapter"],
)
def test_device_commands_without_host_packages(args):
    code = BLOCK + "from edge.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr


def test_switch_on_golden_model_without_host_packages():
    code = BLOCK + (
        "import numpy as np, edge\n"
        "with edge.Runtime('tests/golden/tiny-mlp-v1.onnx') as rt:\n"
        "    rt.load_adapter('tests/golden/adapter-v1.safetensors')\n"
        "    base = rt.run({rt.info.inputs[0]: np.ones((2, 10), np.float32)})\n"
        "    rt.switch('golden-a'); rt.switch(None)\n"
        "    again = rt.run({rt.info.inputs[0]: np.ones((2, 10), np.float32)})\n"
        "    assert all(np.array_equal(base[k], again[k]) for k in base)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
