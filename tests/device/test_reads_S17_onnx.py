"""A model file swapped after the runtime read it bounded reaches no unbounded reader (S17).

``Updater`` (the feature width: :func:`edge.format.feeds.output_width`), :class:`DeviceTrainer`, ``edge update
--taps``'s hint (``_head_input``) and :func:`tap_model`'s output comparison each read a path with ``onnx.load`` or
``read_bytes``: a FIFO there blocked forever, ``/dev/zero`` read until memory ran out. Each now refuses it with a
:class:`FormatError` naming what the path is (or, for ``tap_model``'s output, a ``WriteError``). The hostile cases
run in one child process with a timeout and an address-space limit, so a regression fails the test, never hangs
or exhausts the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from _blocking import BLOCK_TORCH, ROOT
from _tiny import write_model
from onnx import TensorProto, helper

from edge.errors import FormatError
from edge.format.feeds import output_width
from edge.format.modelinfo import TensorInfo


def make_featured(path, d_in=8, dim=6, classes=3):
    """x[B,8] -> MatMul -> features[B,6] -> Gemm -> logits[B,3]: a model an update learns on."""
    rng = np.random.default_rng(0)
    stored = {
        "fc.weight": rng.standard_normal((d_in, dim)).astype(np.float32),
        "head.weight": rng.standard_normal((classes, dim)).astype(np.float32),
        "head.bias": np.zeros(classes, np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "fc.weight"], ["features"]),
        helper.make_node("Gemm", ["features", "head.weight", "head.bias"], ["logits"], transB=1),
    ]
    tensors = {
        "fc.weight": TensorInfo("fc.weight", (dim, d_in), transposed=True),
        "head.weight": TensorInfo("head.weight", (classes, dim), transposed=False),
    }
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
        helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", dim]),
    ]
    return write_model(path, "featured", nodes, inputs, outputs, stored, tensors)


_CHILD = """
import json, os, resource, shutil, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # /dev/zero read whole: a MemoryError, not the host's
src, work = Path(sys.argv[1]), Path(sys.argv[2])
from edge.runtime import Runtime
from edge.learn.update import Updater
from edge.learn.device_trainer import DeviceTrainer
from edge.commands.update import _head_input
from edge.route.taps import tap_model

def swap(path, kind):
    path.unlink()
    os.mkfifo(path) if kind == "fifo" else os.symlink("/dev/zero", path)

def outcome(call):
    try:
        call()
        return "no error"
    except Exception as e:
        return f"{type(e).__name__}: {e}"

out = {}
for kind in ("fifo", "zero"):
    model = work / f"{kind}.onnx"
    shutil.copy(src, model)
    rt = Runtime(model)
    swap(model, kind)  # the file the runtime read is replaced
    out[f"updater-{kind}"] = outcome(lambda: Updater(rt, "ncm"))
    out[f"trainer-{kind}"] = outcome(lambda: DeviceTrainer(model))
    out[f"hint-{kind}"] = outcome(lambda: _head_input(model, "features", {}))
    dst = work / f"tapped-{kind}.onnx"
    os.mkfifo(dst) if kind == "fifo" else os.symlink("/dev/zero", dst)
    out[f"tap-{kind}"] = outcome(lambda: tap_model(src, dst, ["features"]))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    work = tmp_path_factory.mktemp("reads")
    make_featured(work / "m.onnx")
    script = BLOCK_TORCH + textwrap.dedent(_CHILD)
    try:
        r = subprocess.run(
            [sys.executable, "-c", script, str(work / "m.onnx"), str(work)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a read of a FIFO or /dev/zero blocked: the child did not finish in 60 s")
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


KINDS = {"fifo": "a FIFO (named pipe), not a regular file", "zero": "a character device, not a regular file"}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("entry", ["updater", "trainer", "hint"])
def test_swapped_model_refused_by_kind(outcomes, entry, kind):
    got = outcomes[f"{entry}-{kind}"]
    assert got.startswith("FormatError: cannot read "), got
    assert KINDS[kind] in got and "give a regular file" in got, got


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_tap_model_output_not_read_when_special(outcomes, kind):
    got = outcomes[f"tap-{kind}"]
    assert got.startswith("WriteError: cannot write ") and "is not a regular file" in got, got


def test_output_width_reads_graph_only(tmp_path):
    make_featured(tmp_path / "m.onnx")
    assert output_width(tmp_path / "m.onnx", "features") == 6
    assert output_width(tmp_path / "m.onnx", "logits") == 3
    assert output_width(tmp_path / "m.onnx", "nope") is None
    assert output_width(onnx.load(str(tmp_path / "m.onnx")), "features") == 6  # the proto a caller has parsed
    (tmp_path / "m.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))  # not ONNX: no width declared here
    assert output_width(tmp_path / "m.tflite", "features") is None
    with pytest.raises(FormatError, match="is a folder"):
        output_width(tmp_path, "features")


def test_updater_learns_as_before(tmp_path):
    from edge.learn.update import Updater
    from edge.runtime import Runtime

    make_featured(tmp_path / "m.onnx")
    with Runtime(tmp_path / "m.onnx") as rt:
        up = Updater(rt, "ncm")
        assert up.method.ctx.dim == 6
        x = np.random.default_rng(1).standard_normal((12, 8)).astype(np.float32)
        up.partial_fit(x, np.arange(12) % 3)
        assert up.samples_seen == 12 and list(up.classes) == [0, 1, 2]
