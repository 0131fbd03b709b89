"""onnxruntime failing to allocate while it builds a session is said as the device being short of memory.

Before, :func:`runtimes.ort_session.cannot_load` turned every onnxruntime exception at session build into
``FormatError("onnxruntime cannot load model ...; check the file with onnx.checker")``, a bad_alloc included (and a
builtin ``MemoryError`` from the prepacked build too; from the bound build it escaped untyped, a traceback on the
CLI). Now an allocation failure is an ``edge.OutOfMemoryError`` (an ``EdgeError`` and a ``MemoryError``) saying the
file is fine and what to do. The messages are onnxruntime's own, as seen here (onnxruntime 1.32 under
``ulimit -v``: "Exception during loading: std::bad_alloc" as ``Fail``, "Exception during initialization:
std::bad_alloc" as ``RuntimeException``, a bare ``MemoryError('std::bad_alloc')``) and its BFC arena's message.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import _tiny
import onnxruntime
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException

import edge
from edge.errors import EdgeError, FormatError
from edge.runtime import Runtime

ALLOC_FAILURES = [
    Fail("[ONNXRuntimeError] : 1 : FAIL : Exception during loading: std::bad_alloc"),
    RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization: std::bad_alloc"),
    RuntimeException(
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:376 "
        "void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*, bool, "
        "onnxruntime::WaitNotificationFn) Failed to allocate memory for requested buffer of size 67108864"
    ),
    MemoryError("std::bad_alloc"),
]


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.onnx"
    _tiny.make_mlp(path)
    return path


def _failing(monkeypatch, error: BaseException) -> list:
    calls = []

    def build(*a, **k):
        calls.append(1)
        raise error

    monkeypatch.setattr(onnxruntime, "InferenceSession", build)
    return calls


@pytest.mark.parametrize("strategy", ["rebuild", "bound"])
@pytest.mark.parametrize("error", ALLOC_FAILURES, ids=["loading", "initialization", "bfc-arena", "MemoryError"])
def test_an_allocation_failure_at_session_build_is_out_of_memory(model, monkeypatch, error, strategy):
    calls = _failing(monkeypatch, error)
    with pytest.raises(edge.OutOfMemoryError) as e:
        Runtime(model, backend="onnxruntime", strategy=strategy)
    assert isinstance(e.value, EdgeError) and isinstance(e.value, MemoryError)
    assert not isinstance(e.value, FormatError) and e.value.__cause__ is error
    msg = str(e.value)
    assert "ran out of memory" in msg and "the file is fine" in msg and f"strategy {strategy!r}" in msg
    assert "lighter strategy" in msg and "budgets.memory_mb" in msg and "onnx.checker" not in msg
    assert len(calls) == 1  # the prepacked build does not try again copying the weights (more memory still)


def test_a_graph_onnxruntime_refuses_is_still_a_format_error(model, monkeypatch):
    _failing(monkeypatch, Fail("[ONNXRuntimeError] : 1 : FAIL : Load model failed: node (MatMul) has no input"))
    with pytest.raises(FormatError, match="onnxruntime cannot load model .* onnx.checker"):
        Runtime(model, backend="onnxruntime", strategy="rebuild")


def test_the_cli_says_it_in_one_line(model, monkeypatch, capsys):
    from edge.cli import main

    _failing(monkeypatch, ALLOC_FAILURES[1])
    argv = ["profile", str(model), "--device", "x86-dev", "--backend", "onnxruntime", "--runs", "1", "--warmup", "0"]
    assert main([*argv, "--engine-rounds", "0", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ran out of memory" in err[0] and "Traceback" not in err[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS, /proc/self/status: Linux")
def test_a_real_allocation_failure_under_an_address_space_limit(tmp_path):
    """A 64 MB MatMul weight loaded under an address-space limit (soft, raised back between tries): each try either
    loads or raises OutOfMemoryError; never FormatError or an untyped MemoryError."""
    script = textwrap.dedent(
        f"""
        import resource, sys
        import numpy as np, onnx
        from onnx import TensorProto, helper, numpy_helper
        from edge.convert.onnx_import import make_adapter_ready
        n = 4096
        w = numpy_helper.from_array(np.ones((n, n), np.float32), "w")
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])
        g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        make_adapter_ready(m, name="big")
        onnx.save_model(m, {str(tmp_path / "big.onnx")!r})
        del m, g, w
        import edge, onnxruntime  # noqa: F401  (their libraries mapped before the limit)
        import runtimes.onnxruntime  # noqa: F401
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        out = []
        for extra in (100, 130, 160):
            vm = [int(v.split()[1]) for v in open("/proc/self/status") if v.startswith("VmSize")][0] * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + extra * 2**20, hard))
            try:
                edge.Runtime({str(tmp_path / "big.onnx")!r}, strategy="rebuild").close()
                out.append("loaded")
            except BaseException as e:
                out.append(type(e).__name__)
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        print(" ".join(out))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = run.stdout.split()
    assert len(seen) == 3 and set(seen) <= {"loaded", "OutOfMemoryError"}, (seen, run.stderr[-2000:])
    assert "OutOfMemoryError" in seen, seen
