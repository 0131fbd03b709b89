"""LiteRT refuses a model over its memory budget from the file's tensor table, before the weights are read.

The backend read the whole file of a path (``read_bounded``) before it parsed the tensor table and met the budget,
so a refused 86 MB model still peaked 88 MB above the process; ``LiteRTBackend.footprint_mb(path)`` (which
``backend="auto"`` under a device budget calls for every engine) read the whole file too. Now both parse the
mapped file (:mod:`runtimes.litert_header`: only the pages the parser touches are read) and the backend reads the
bytes only once the budget, the tensor sizes and the device's precision admit the model.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ai_edge_litert")

import _tiny_tflite  # noqa: E402

import edge.format.io as io  # noqa: E402
import runtimes.litert as litert  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from runtimes.base import BackendOptions  # noqa: E402
from runtimes.litert import LiteRTBackend  # noqa: E402
from runtimes.litert_footprint import INTERPRETER_MB  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("p16") / "m.tflite"
    _tiny_tflite.make_mlp(path, sizes=(64, 256, 8))
    return path


def _no_read(*a, **k):
    raise AssertionError("the model file was read")


def test_a_path_over_its_budget_is_refused_before_its_bytes_are_read(model, monkeypatch):
    builtin = LiteRTBackend.footprint_mb(model, "builtin")
    monkeypatch.setattr(litert, "read_bounded", _no_read)
    with pytest.raises(ConfigError, match="strategy 'hybrid' would take"):
        LiteRTBackend(model, BackendOptions(strategy="hybrid", memory_mb=builtin + INTERPRETER_MB / 2))
    with pytest.raises(ConfigError, match="no tflite strategy fits"):
        LiteRTBackend(model, BackendOptions(memory_mb=builtin * 0.9))
    with pytest.raises(ConfigError, match="runs int8 models, but 'tiny-mlp' is fp32"):
        LiteRTBackend(model, BackendOptions(precision="int8"))


def test_the_refusal_from_the_file_reads_as_the_one_from_its_bytes(model):
    builtin = LiteRTBackend.footprint_mb(model, "builtin")
    said = []
    for given in (model, model.read_bytes()):
        with pytest.raises(ConfigError) as e:
            LiteRTBackend(given, BackendOptions(memory_mb=builtin * 0.9))
        said.append(str(e.value))
    assert said[0] == said[1]


def test_footprint_of_a_path_reads_no_weight_and_equals_the_bytes_figure(model, monkeypatch):
    data = model.read_bytes()
    want = {s: LiteRTBackend.footprint_mb(data, s) for s in LiteRTBackend.STRATEGIES}
    monkeypatch.setattr(io, "read_bounded", _no_read)
    got = {s: LiteRTBackend.footprint_mb(model, s) for s in LiteRTBackend.STRATEGIES}
    assert got == want and want["hybrid"] > want["builtin"] > 0


def test_a_path_that_fits_loads_as_before_and_says_its_decision_once(model, caplog):
    with caplog.at_level(logging.INFO, logger="edge.runtimes.litert"):
        b = LiteRTBackend(model, BackendOptions(strategy="hybrid", providers=("CPU",)))
    try:
        assert b.strategy == "builtin" and b.strategy_reason
        assert sum(b.strategy_reason in r.getMessage() for r in caplog.records) == 1
        assert b.predicted_mb() == LiteRTBackend.footprint_mb(model, "builtin", ["CPU"])
    finally:
        b.close()


_PEAK = textwrap.dedent(
    """
    import sys
    from runtimes.litert import LiteRTBackend, interpreter_module
    from runtimes.base import BackendOptions
    from edge.errors import ConfigError

    def hwm():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024

    interpreter_module()
    before = hwm()
    try:
        LiteRTBackend(sys.argv[1], BackendOptions(strategy="hybrid", memory_mb=float(sys.argv[2])))
    except ConfigError as e:
        print("refused" if "would take" in str(e) else e, hwm() - before)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_a_refused_32_mb_model_raises_the_peak_by_a_few_mb_not_its_size(tmp_path):
    path = tmp_path / "big.tflite"
    _tiny_tflite.make_mlp(path, sizes=(2048, 4096, 8))  # 32 MB of float32 weights
    size_mb = path.stat().st_size / 2**20
    assert size_mb > 32
    budget = LiteRTBackend.footprint_mb(path, "builtin") + INTERPRETER_MB / 2  # hybrid (two interpreters) exceeds it
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, str(path), str(budget)], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert out[0] == "refused", out
    assert float(out[1]) < 4.0  # the tables' pages; the file read first raised it by size_mb
