"""onnxruntime's Python wrapper retries a session whose execution provider fails to start on CPU, printing "EP Error"
and raising nothing: the backend refuses such a session (runtimes.ort_providers.check_registered)."""

from __future__ import annotations

import pytest
from _tiny import make_mlp

import runtimes.onnxruntime as ort_backend
from edge.errors import BackendUnavailableError
from edge.runtime import Runtime
from runtimes.ort_providers import check_registered


class _Session:
    def __init__(self, providers):
        self._providers = providers

    def get_providers(self):
        return list(self._providers)


def test_a_session_on_every_provider_asked_passes_and_one_that_fell_back_is_refused():
    check_registered(_Session(["CUDAExecutionProvider", "CPUExecutionProvider"]), ["CUDAExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match=r"could not start \['QNNExecutionProvider'\] and fell back"):
        check_registered(_Session(["CPUExecutionProvider"]), ["QNNExecutionProvider", "CPUExecutionProvider"])


@pytest.mark.parametrize("strategy", ["hybrid", "bound", "rebuild"])
def test_the_runtime_refuses_a_session_onnxruntime_moved_to_cpu(tmp_path, monkeypatch, strategy):
    """A provider that is installed but does not start: simulated by a wrapper that, as onnxruntime's does after its
    retry, reports only the CPU provider."""
    model = tmp_path / "m.onnx"
    make_mlp(model)
    import onnxruntime as ort

    monkeypatch.setattr(ort_backend.OrtBackend, "_check_providers", lambda self, asked: ["XnnpackExecutionProvider"])

    made = ort.InferenceSession

    def fell_back(model, so=None, providers=None, provider_options=None, **kw):
        return made(model, so, providers=["CPUExecutionProvider"], **kw)

    monkeypatch.setattr(ort, "InferenceSession", fell_back)
    with pytest.raises(BackendUnavailableError, match="XnnpackExecutionProvider"):
        rt = Runtime(model, strategy=strategy)
        rt.wait_settled(30)
