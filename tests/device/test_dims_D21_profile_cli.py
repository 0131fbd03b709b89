"""A device profile's ``dims`` and ``edge profile --dim NAME=SIZE`` (edge.dims).

Before: a profile had no way to fix a model's named dimensions (an NPU profile needs static shapes) and the CLI no
flag. Now ``dims: {NAME: SIZE}`` is a profile key validated like every other (a name a model lacks is skipped for
that model, logged; Q21), ``Runtime(device=...)`` applies it with an explicit ``dims=`` winning per name, and
``edge profile`` takes ``--dim`` (repeatable), a malformed one an exit 2 with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.devices import load_profile  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from tests.device.test_dims_D21_runtime import named_mlp  # noqa: E402
from tests.device.test_elsewhere_onnx import _one_line  # noqa: E402

X86 = (Path(__file__).resolve().parents[2] / "devices" / "x86-dev.yaml").read_text()


def _profile(tmp: Path, dims: str | None, name: str = "dimsdev") -> Path:
    text = X86.replace("name: x86-dev", f"name: {name}")
    path = tmp / f"{name}.yaml"
    path.write_text(text + (f"dims: {dims}\n" if dims is not None else ""))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dimscli")
    onnx.save(named_mlp(), tmp / "m.onnx")
    import_onnx(tmp / "m.onnx", tmp / "dims.onnx")
    (tmp / "m.onnx").unlink()
    return tmp / "dims.onnx"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_CACHE", str(tmp_path / "cache"))  # an engine choice, if any, is kept here


def test_a_profile_reads_dims_and_an_explicit_one_wins_per_name(model, tmp_path):
    path = _profile(tmp_path, "{batch: 2, seq: 5}")
    assert dict(load_profile(path).dims) == {"batch": 2, "seq": 5}
    assert dict(load_profile(_profile(tmp_path, None, "plain")).dims) == {}
    with Runtime(model, device=path, backend="onnxruntime", dims={"seq": 7}) as rt:
        assert rt.dims == {"batch": 2, "seq": 7}
        assert rt.backend._static.get_inputs()[0].shape == [2, 7, 8]
        x, z = np.ones((2, 7, 8), np.float32), np.ones((2, 6), np.float32)
        assert rt.run({"x": x, "z": z})["out"].shape == (2, 3)
    with Runtime(model, device=path) as rt:  # backend auto (one engine beside it): the profile's dims alone
        assert rt.dims == {"batch": 2, "seq": 5}
        assert rt.backend._static.get_inputs()[0].shape == [2, 5, 8]


def test_a_profile_dim_the_model_does_not_declare_is_skipped_but_an_explicit_one_refused(model, tmp_path, caplog):
    """A profile serves every model on the device (Q21 S2): a name this model lacks is skipped, logged at INFO, and
    rt.dims shows what applies; the same name given explicitly is still refused."""
    path = _profile(tmp_path, "{sequence: 128, batch: 2}")
    with caplog.at_level("INFO", logger="edge.dims"), Runtime(model, device=path, backend="onnxruntime") as rt:
        assert rt.dims == {"batch": 2}
        assert rt.backend._static.get_inputs()[0].shape == [2, "seq", 8]
    assert any("dims ['sequence'] do not apply to dims.onnx" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError) as e:
        Runtime(model, device=path, backend="onnxruntime", dims={"sequence": 128})
    assert "dims ['sequence'] are not dimensions model" in str(e.value) and "x: ['batch', 'seq']" in str(e.value)


@pytest.mark.parametrize(
    "dims, words",
    [
        ("{batch: 0}", "dims (named input dimension -> size)['batch'] is 0; a size is from 1 to 2147483647"),
        ("{batch: true}", "must be an integer size from 1 to 2147483647, got bool True"),
        ("{batch: 1.5}", "got float 1.5"),
        ("{batch: '8'}", "got str '8'"),
        ("{batch: 4294967296}", "is 4294967296; a size is from 1 to 2147483647"),
        ("128", "must be a mapping of dimension name to size"),
        ("[batch, seq]", "must be a mapping of dimension name to size"),
        ("{1: 2}", "a dimension name must be a non-empty string, got 1"),
    ],
)
def test_bad_profile_dims_are_refused_naming_the_key(tmp_path, dims, words):
    with pytest.raises(ConfigError) as e:
        load_profile(_profile(tmp_path, dims))
    assert words in str(e.value)


def test_the_schema_lists_dims_among_its_known_keys(tmp_path):
    path = _profile(tmp_path, None)
    path.write_text(path.read_text() + "dim: {batch: 1}\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) \\['dim'\\].*dims"):
        load_profile(path)


_RUN = ["--runs", "2", "--warmup", "0", "--switches", "1", "--engine-rounds", "0", "-q"]


@pytest.mark.parametrize(
    "flag, words",
    [
        ("batch", "--dim takes NAME=SIZE"),
        ("batch=0", "--dim['batch'] is 0"),
        ("batch=x", "--dim takes NAME=SIZE"),
        ("sequence=3", "dims ['sequence'] are not dimensions model"),
    ],
)
def test_a_bad_dim_flag_exits_2_with_one_line(model, tmp_path, capsys, flag, words):

    line = _one_line(["profile", str(model), "--device", str(_profile(tmp_path, None)), "--dim", flag, *_RUN], capsys)
    assert words in line


def test_edge_profile_runs_with_dims_and_generates_inputs_of_their_sizes(model, tmp_path, capsys):
    from edge.cli import main

    out = tmp_path / "p.json"
    argv = ["profile", str(model), "--device", str(_profile(tmp_path, "{batch: 2}")), "--dim", "seq=3"]
    argv += ["--dim", "unk__7=2", "--backend", "onnxruntime", "--json", str(out), *_RUN]
    assert main(argv) == 0
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["dims"] == {"batch": 2, "seq": 3, "unk__7": 2}
    assert result["inputs"]["x"]["shape"] == [2, 3, 8] and result["inputs"]["z"]["shape"] == [2, 6]
