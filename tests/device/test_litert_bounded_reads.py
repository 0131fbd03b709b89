"""The LiteRT backend reads a model path as every other reader does: a regular file only, bounded.

``Path.read_bytes`` blocked for ever on a FIFO and read ``/dev/zero`` until memory ran out; the backend given
a path (``LiteRTBackend(path)``, which keeps one copy of the bytes) and ``runtimes.read_model_info`` now refuse
both in one typed line.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("ai_edge_litert")
from edge.errors import FormatError  # noqa: E402
from runtimes import read_model_info  # noqa: E402
from runtimes.base import BackendOptions  # noqa: E402
from runtimes.litert import LiteRTBackend  # noqa: E402


@pytest.mark.parametrize("reader", ["backend", "read_model_info"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_model_path_that_is_no_regular_file_is_refused(tmp_path, reader, kind):
    path = tmp_path / "m.tflite"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(FormatError) as e:
        if reader == "backend":
            LiteRTBackend(path, BackendOptions(strategy="builtin"))
        else:
            read_model_info(path)
    assert "\n" not in str(e.value) and "m.tflite" in str(e.value)
