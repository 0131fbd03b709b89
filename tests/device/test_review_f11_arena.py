"""Review of b89ac99 (a small model's prepacked sessions without onnxruntime's CPU arena): a device profile's
``use_arena`` option for CPUExecutionProvider.

onnxruntime's Python API builds its CPU provider from ``SessionOptions.enable_cpu_mem_arena`` alone and drops the
provider option (``CreateExecutionProviderInstance`` in onnxruntime_pybind_state.cc; observed on 1.32: a session with
``enable_cpu_mem_arena`` True kept 117.9 MB after a batch-2048 run on the digits ViT with ``use_arena`` "0", one with
it False kept 17.0 MB with ``use_arena`` "1"). The schema accepts the option (runtimes/ort_providers.py), so the
backend has to honour it itself: what a profile asks for wins over the small-model default, on every session.
"""

from __future__ import annotations

import _tiny
import pytest

from edge.errors import ConfigError
from runtimes.base import SMALL_MODEL_BYTES, BackendOptions
from runtimes.onnxruntime import OrtBackend

CPU = ("CPUExecutionProvider",)


def _arena(sess) -> bool:
    return sess.get_session_options().enable_cpu_mem_arena


def _backend(tmp_path, strategy: str, use_arena: str) -> OrtBackend:
    path = tmp_path / "tiny.onnx"
    _tiny.make_mlp(path)
    assert path.stat().st_size < SMALL_MODEL_BYTES
    opts = BackendOptions(strategy=strategy, providers=CPU, provider_options=({"use_arena": use_arena},))
    return OrtBackend(path, opts)


@pytest.mark.parametrize("strategy", ["hybrid", "rebuild"])
def test_a_profile_asking_for_the_arena_gets_it_on_a_small_models_prepacked_session(tmp_path, strategy):
    b = _backend(tmp_path, strategy, "1")
    try:
        assert b.cpu_arena is True and _arena(b._static) is True
    finally:
        b.close()


def test_a_profile_refusing_the_arena_has_none_on_the_bound_session(tmp_path):
    b = _backend(tmp_path, "bound", "0")
    try:
        assert _arena(b._bound) is False
    finally:
        b.close()


def test_a_use_arena_value_that_is_no_boolean_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="use_arena"):
        _backend(tmp_path, "bound", "sometimes").close()
