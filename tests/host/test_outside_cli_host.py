"""Leftovers of the CLI and import audits (helper J): each refusal comes at parse time or before the work, in one line.

``edge quantize`` stages its model copy beside the output under its pid (a killed run's copy is removed by the
next run, not left in /tmp); output flags of the host and lab commands are checked when parsed; a FIFO given as
bench inputs is refused, not waited on; counts and the learning rate are checked when parsed; an unknown device
profile is refused before the engines are timed; a Hugging Face folder without ``model_type``, a ``.tflite`` handed
to ``import-onnx`` (and the reverse) and an ``.npz`` handed to ``inspect`` each get a line saying what to do; and
onnxruntime's ``MatMulConstBOnly``, which its static (QDQ) quantizer ignores, is refused there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest
from _tiny import make_mlp

from edge.cli import main
from edge.errors import ConfigError, FormatError


def refused(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture
def mlp(tmp_path):
    make_mlp(tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 10), np.float32))
    return tmp_path / "m.onnx"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- 1. edge quantize / edge export ------------------------------------------------------------------------------------


def test_quantize_stages_beside_the_output_and_removes_dead_runs(tmp_path):
    from exporters.commands.quantize import staging

    out = tmp_path / "sub" / "q.onnx"
    out.parent.mkdir()
    dead = out.parent / f".q.onnx.{_dead_pid()}.quantize.tmp"  # what a killed run leaves: a model copy
    dead.mkdir()
    (dead / "m.onnx").write_bytes(b"x" * 1000)
    live = out.parent / f".q.onnx.{os.getppid()}.quantize.tmp"  # a run still going: kept
    live.mkdir()
    other = out.parent / ".other.onnx.1.quantize.tmp"  # another output's: not ours to judge
    other.mkdir()
    with staging(out) as folder:
        assert folder == out.parent / f".q.onnx.{os.getpid()}.quantize.tmp" and folder.is_dir()
        assert not dead.exists() and live.is_dir() and other.is_dir()
        assert tempfile.gettempdir() == str(folder)  # the quantizers' own temp files land there too
    assert not folder.exists() and tempfile.gettempdir() != str(folder)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([live.name, other.name])


def test_quantize_leaves_nothing_in_tmp_or_beside_the_output(mlp, tmp_path, capsys, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "out" / "q.onnx"
    assert main(["quantize", str(mlp), "--out", str(out), "--json"]) == 0, capsys.readouterr().err
    assert out.is_file() and list(scratch.iterdir()) == []
    assert [p.name for p in out.parent.iterdir()] == ["q.onnx"]


_SLOW_QUANTIZE = """
import sys, time
import exporters.quantize
from edge.cli import main
exporters.quantize.quantize_onnx = lambda *a, **k: time.sleep(60)  # killed while the quantizer runs
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_quantize_leaves_its_copy_beside_the_output_and_the_next_run_removes_it(mlp, tmp_path, capsys):
    import time

    out = tmp_path / "out" / "q.onnx"
    env = {**os.environ, "TMPDIR": str(tmp_path / "sys-tmp")}
    (tmp_path / "sys-tmp").mkdir()
    argv = ["quantize", str(mlp), "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_QUANTIZE, *argv], env=env, stderr=subprocess.PIPE)
    folder = out.parent / f".q.onnx.{proc.pid}.quantize.tmp"
    deadline = time.monotonic() + 60
    while not (folder / "m.onnx").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    _, err = proc.communicate()
    assert (folder / "m.onnx").read_bytes() == mlp.read_bytes(), err.decode()  # the copy: beside OUT, not in TMPDIR
    assert list((tmp_path / "sys-tmp").iterdir()) == []
    assert main(argv) == 0, capsys.readouterr().err
    assert [p.name for p in out.parent.iterdir()] == ["q.onnx"]


@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "{m}", "--out", "{d}"],
        ["export", "{t}", "--out", "{d}"],
        ["export", "{t}", "--out", "{t}/e.onnx", "--quantize", "dynamic", "--quantize-out", "{d}"],
    ],
    ids=["quantize--out", "export--out", "export--quantize-out"],
)
def test_host_output_flags_are_checked_when_parsed(argv, mlp, tmp_path, capsys):
    folder = tmp_path / "d.onnx"
    folder.mkdir()
    argv = [a.format(m=mlp, d=folder, t=tmp_path) for a in argv]
    refused(capsys, main(argv), "argument --", "is a folder")


# -- 2. lab commands ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["demo", "--json", "{d}"], "--json"),
        (["train", "--domain", "rotate", "--json", "{d}"], "--json"),
        (["train", "--domain", "rotate", "--out", "{d}"], "--out"),
        (["bench", "fleet", "--json", "{d}"], "--json"),
        (["bench", "fleet", "--md", "{d}"], "--md"),
        (["bench", "fleet", "--adapters", "0"], "--adapters"),
        (["bench", "fleet", "--devices", "-1"], "--devices"),
        (["bench", "fleet", "--repeats", "0"], "--repeats"),
        (["bench", "fleet", "--sizes", "0"], "--sizes"),
        (["bench", "fleet", "--changed-bytes", "-5"], "--changed-bytes"),
        (["bench", "fleet", "--kill-at", "0"], "--kill-at"),
        (["train", "--domain", "rotate", "--lr", "nan"], "--lr"),
        (["train", "--domain", "rotate", "--lr", "0"], "--lr"),
        (["train", "--domain", "rotate", "--lr", "-inf"], "--lr"),
    ],
)
def test_lab_flags_are_checked_when_parsed(argv, flag, tmp_path, capsys):
    argv = [a.format(d=tmp_path) for a in argv]
    refused(capsys, main(argv), f"argument {flag}:")


def test_bench_inputs_fifo_is_refused_not_waited_on(mlp, tmp_path):
    from lab.bench_run import bench_models
    from lab.bench_switch import cli as switch_cli

    fifo = tmp_path / "in.npz"
    os.mkfifo(fifo)
    args = argparse.Namespace(model_file=str(mlp), inputs=str(fifo))
    for call in (lambda: bench_models(args, "engines"), lambda: switch_cli(args)):
        caught: list[BaseException] = []
        t = threading.Thread(target=lambda c=call, into=caught: into.append(_raised(c)), daemon=True)
        t.start()
        t.join(20)
        if t.is_alive():  # release the reader blocked on the FIFO, then fail
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail("np.load blocked on a FIFO given as --inputs")
        assert isinstance(caught[0], FormatError) and "not a regular file" in str(caught[0]), caught


def _raised(call) -> BaseException | None:
    try:
        call()
    except BaseException as e:  # noqa: BLE001 - handed to the test thread to assert on
        return e
    return None


def test_bench_inputs_still_load_every_array(mlp, tmp_path):
    from lab.bench_run import bench_models

    np.savez(tmp_path / "big.npz", x=np.zeros((4, 10), np.float32), y=np.zeros(3))
    args = argparse.Namespace(model_file=str(mlp), inputs=str(tmp_path / "big.npz"))
    ((path, feeds),) = bench_models(args, "engines")
    assert path == mlp and sorted(feeds) == ["x", "y"] and feeds["x"].shape == (4, 10)


def test_bench_engines_refuses_an_unknown_device_before_timing(mlp, tmp_path, capsys, monkeypatch):
    import edge.engines

    def timed(*a, **k):
        raise AssertionError("engines were timed before the device profile was read")

    monkeypatch.setattr(edge.engines, "compare_engines", timed)
    code = main(["bench", "engines", "--model-file", str(mlp), "--inputs", str(tmp_path / "x.npz"), "--device", "nope"])
    err = refused(capsys, code, "unknown device profile 'nope'", "known:")
    assert "AssertionError" not in err


# -- 3. edge export on a folder without model_type ---------------------------------------------------------------------


def test_export_folder_without_model_type_is_one_line(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"hidden_size": 8}')
    code = main(["export", str(tmp_path / "hf"), "--out", str(tmp_path / "e.onnx")])
    refused(capsys, code, 'config.json has no "model_type"', str(tmp_path / "hf"))
    assert not (tmp_path / "e.onnx").exists()


def test_export_config_json_is_read_bounded(tmp_path):
    from exporters.hf import load_hf_encoder

    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="model_type"):
        load_hf_encoder(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert", "a": NaN}')
    with pytest.raises(FormatError):
        load_hf_encoder(tmp_path)


def test_export_reads_a_checkpoint_config_with_a_22k_label_map(tmp_path):
    """ImageNet-22k Swin/ConvNeXt/BEiT configs carry label maps of 1.7 MB: past the config check (bounded at 64 MiB)."""
    from transformers import SwinConfig

    from exporters.hf import load_hf_encoder

    labels = {i: f"n{i:08d}, a synset of ImageNet-22k, named at length as its own label" for i in range(21841)}
    SwinConfig(image_size=32, embed_dim=8, depths=[1], num_heads=[1], id2label=labels).save_pretrained(tmp_path)
    assert (tmp_path / "config.json").stat().st_size > 1 << 20
    with pytest.raises(Exception) as e:  # no weights in the folder: transformers refuses them, not our config check
        load_hf_encoder(tmp_path)
    assert "over the limit" not in str(e.value) and not isinstance(e.value, (ConfigError, FormatError)), e.value


# -- 4. the wrong importer, and inspect on samples ---------------------------------------------------------------------


def test_import_onnx_on_a_tflite_points_to_import_tflite(tmp_path, capsys):
    fake = tmp_path / "m.onnx"  # a .tflite by its bytes, whatever its name: the identifier TFL3 at 4..8
    fake.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    code = main(["import-onnx", str(fake), "--out", str(tmp_path / "o.onnx")])
    refused(capsys, code, "is a .tflite (LiteRT) model, not ONNX", "edge import-tflite")


def test_import_tflite_on_an_onnx_points_to_import_onnx(mlp, tmp_path, capsys):
    code = main(["import-tflite", str(mlp), "--out", str(tmp_path / "o.tflite")])
    refused(capsys, code, "is an ONNX model, not .tflite", "edge import-onnx")


def test_a_damaged_file_gets_no_misleading_hint(tmp_path, capsys):
    junk = tmp_path / "j.onnx"
    junk.write_bytes(b"\xff" * 64)
    err = refused(capsys, main(["import-onnx", str(junk), "--out", str(tmp_path / "o.onnx")]), "not a readable ONNX")
    assert "import-tflite" not in err
    err = refused(capsys, main(["import-tflite", str(junk), "--out", str(tmp_path / "o.tflite")]), "not a .tflite")
    assert "import-onnx" not in err


def test_inspect_says_what_it_reads(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", x=np.zeros(3))
    refused(
        capsys, main(["inspect", str(tmp_path / "s.npz")]), "inspect reads a model (.onnx, .tflite)", ".safetensors"
    )


# -- 5. MatMulConstBOnly in static mode --------------------------------------------------------------------------------


def test_static_quantize_refuses_matmul_const_b_only(mlp, tmp_path):
    from exporters.quantize import quantize_onnx

    calib = {"x": np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)}
    with pytest.raises(ConfigError, match="nodes_to_exclude"):
        quantize_onnx(mlp, tmp_path / "q.onnx", mode="static", calib=calib, extra_options={"MatMulConstBOnly": True})
    assert not (tmp_path / "q.onnx").exists()
