"""Cold start: `import edge`, `edge --help` and a device command import only what they use (cron runs `edge sync`).

Each run is a fresh interpreter that lists the modules the run added to ``sys.modules``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from _blocking import ROOT

from edge import cli

#: run ``edge ARGV`` in-process (as the console script does) and print the modules it imported, as JSON
WRAPPER = """
import contextlib, io, sys
before = set(sys.modules)
with contextlib.redirect_stdout(io.StringIO()):
    from edge.cli import main
    code = main(sys.argv[1:])
added = sorted(set(sys.modules) - before)
import json
print(json.dumps({"code": code, "added": added}))
"""
IMPORT_EDGE = """
import sys
before = set(sys.modules)
import edge
added = sorted(set(sys.modules) - before)
import json
print(json.dumps({"code": 0, "added": added}))
"""
HEAVY = ("torch", "numpy", "onnx", "onnxruntime", "yaml", "safetensors", "transformers", "cryptography", "tuf", "oras")
#: what neither ``from edge import Runtime`` nor a model's load and first run imports (M20): the measuring side of
#: ``backend="auto"`` (:mod:`edge.engines`; an explicit choice needs only :mod:`edge.engine_choice`), what a file
#: write takes (tempfile, with shutil, random, bz2 and lzma: ~5 ms) and base64 (a signature's or a channel scale's)
#: what a load and first answer leave out: edge's measuring, adapter and fusion modules (with the first switch or
#: adapter); and what `from edge import Runtime` itself does not import (onnxruntime may: its version's business)
NOT_ON_LOAD = ("edge.engines", "edge.fusion", "edge.format.adapter", "edge.format.deltas")
NOT_ON_IMPORT = NOT_ON_LOAD + ("tempfile", "shutil", "random", "bz2", "lzma", "base64")
#: ``from edge import Runtime``, then a float model loaded and run once, as the cold-start bench's child does
LOAD_AND_RUN = """
import sys
import numpy as np
before = set(sys.modules)
from edge import Runtime
imported = sorted(set(sys.modules) - before)
rt = Runtime(sys.argv[1])
out = rt.run({"x": np.ones((1, 10), np.float32)})
added = sorted(set(sys.modules) - before)
import json
print(json.dumps({"imported": imported, "added": added, "shape": list(out["logits"].shape)}))
"""
HOST = ("exporters", "lab")
#: what joining the host and lab commands imports: their packages and command modules (argparse only), no more
REGISTRATION = ("exporters", "exporters.commands", "lab", "lab.commands")


def _registration(module: str) -> bool:
    return module in REGISTRATION or module.rsplit(".", 1)[0] in ("exporters.commands", "lab.commands")


def _imported(*argv: str, script: str = WRAPPER) -> tuple[int, list[str]]:
    r = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    return out["code"], out["added"]


def _under(modules: list[str], tops: tuple[str, ...]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in tops]


def _device_commands() -> list[str]:
    """The device commands: those :func:`edge.cli.build_parser` registers before any parse (entry points join later)."""
    (action,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(action.choices)


def test_import_edge_imports_only_its_errors():
    _, added = _imported(script=IMPORT_EDGE)
    assert not _under(added, HEAVY + HOST + ("runtimes",)), added
    assert [m for m in added if m.startswith("edge")] == ["edge", "edge.errors"]


def test_the_public_names_of_edge_still_resolve_on_first_use():
    import edge

    assert set(edge.__all__) <= set(dir(edge))
    for name in edge.__all__:
        assert getattr(edge, name) is not None, name
    from edge import Runtime, load_adapter

    assert Runtime.__module__ == "edge.runtime" and load_adapter.__module__ == "edge.format.adapter"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        edge.Nope  # noqa: B018


def test_the_top_level_help_imports_no_engine_and_of_the_host_side_only_its_registrations():
    code, added = _imported("--help")
    assert code == 0
    assert not _under(added, HEAVY), added
    beyond = [m for m in _under(added, HOST) if not _registration(m)]
    assert not beyond, f"`edge --help` imported more of the host side than its command registrations: {beyond}"


@pytest.mark.parametrize("argv", [["--version"], ["-v", "--version"], ["sync", "--help"], ["release", "init", "-h"]])
def test_version_and_device_help_read_no_entry_points(argv):
    code, added = _imported(*argv)
    assert code == 0
    assert not _under(added, HEAVY + HOST) and "importlib.metadata" not in added, added


def test_every_device_commands_help_imports_no_host_module_and_no_engine():
    commands = _device_commands()
    assert {"inspect", "sync", "profile", "update", "devices", "keygen", "sign", "push", "release"} <= set(commands)
    for name in commands:
        code, added = _imported(name, "--help")
        assert code == 0, name
        assert not _under(added, HEAVY + HOST), (name, _under(added, HEAVY + HOST))


def test_a_device_command_run_imports_what_it_uses_and_no_host_module():
    code, added = _imported("inspect", str(ROOT / "tests" / "golden" / "adapter-v1.safetensors"))
    assert code == 0
    assert not _under(added, HOST + ("torch", "onnx", "onnxruntime")), added
    assert "edge.format.adapter" in added and "numpy" in added  # what inspecting an adapter takes


def test_help_and_version_run_with_only_the_standard_library():
    """Stronger than the style's "only numpy": numpy, onnx, yaml and the host side blocked outright."""
    block = (
        "import importlib.abc, sys\n"
        "class _Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {HEAVY + HOST!r}:\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, _Block())\n"
        "from edge.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for argv in (["--help"], ["--version"], ["sync", "--help"], ["profile", "--help"]):
        r = subprocess.run([sys.executable, "-c", block, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0 and r.stdout and not r.stderr, (argv, r.stderr)
    r = subprocess.run([sys.executable, "-c", block, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "sync" in r.stdout and "inspect" in r.stdout


def test_an_entry_point_reusing_a_device_commands_name_is_refused_in_one_line(monkeypatch, capsys):
    """``keygen`` is registered by edge.commands.sign: a name the module's own name does not give away."""
    import importlib.metadata

    taken = importlib.metadata.EntryPoint("keygen", "somepkg.commands:register", cli.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [taken])
    assert cli.main(["--help"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "'keygen' is registered twice" in err
    assert "edge.commands.sign" in err and "somepkg.commands:register" in err


def test_from_edge_import_runtime_and_a_first_answer_import_no_measuring_and_no_writing_tools():
    model = ROOT / "tests" / "golden" / "tiny-mlp-v1.onnx"
    r = subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, str(model)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["shape"] == [1, 2]
    assert "edge.runtime" in out["imported"] and "edge.engine_choice" in out["imported"]
    assert not [m for m in out["imported"] if m in NOT_ON_IMPORT], out["imported"]
    assert not [m for m in out["added"] if m in NOT_ON_LOAD], out["added"]
    assert "onnxruntime" in out["added"] and not _under(out["added"], HOST + ("torch",)), out["added"]
    assert [m for m in out["added"] if m.split(".")[0] == "onnx"] == ["onnx.onnx_ml_pb2"]  # its classes, alone
