"""Outside audit of device profiles (helper W): YAML a user writes for their own board, as they write it.

Jetson, Pi Zero 2, a phone with NNAPI/QNN/XNNPACK, an x86 NUC; YAML 1.1's surprises (``1e3`` is text,
``no`` is false); threads and budgets out of range; files that are not files. Each is used the ways
a user would: ``edge devices --devices-dir``, ``edge profile MODEL --device PATH``,
``edge.Runtime(model, device=...)``, ``edge update --device`` and ``edge sync --device``. A refusal is
a typed :class:`edge.errors.EdgeError` naming the fix (CLI: exit 2, one line, no traceback), and a
provider this machine lacks is said (``fallback: cpu``) or refused (``fallback: error``), never swapped quietly.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

import pytest
from _tiny import make_mlp

import edge
from edge.cli import main
from edge.devices import load_profile
from edge.errors import BackendUnavailableError, ConfigError, FormatError

ORT_CPU = "  - backend: onnxruntime\n    providers:\n      - CPUExecutionProvider\n"


def profile_text(name: str, backends: str = ORT_CPU, threads="null", memory_mb="4096", fallback="error", extra=""):
    return (
        f"name: {name}\narchitecture: x86_64\nbackends:\n{backends}threads: {threads}\n"
        f"budgets:\n  memory_mb: {memory_mb}\n  load_ms: 2000\n  latency_p95_ms: 20\n  switch_p95_ms: 5\n"
        f"tolerances:\n  atol: 1.0e-5\n  rtol: 1.0e-4\nfallback: {fallback}\n{extra}"
    )


BOMB = "name: pi\n" + "".join(  # billion laughs: each level ten aliases of the last
    f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}" if i else "x"] * 9) + "]\n" for i in range(8)
)


def write(folder: Path, name: str, text: str | bytes, suffix: str = ".yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{suffix}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def providers(*names: str) -> str:
    return "  - backend: onnxruntime\n    providers:\n" + "".join(f"      - {n}\n" for n in names)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    make_mlp(path)
    return path


# -- what a user writes that must be refused, by name, with the fix --------------------------------------------------
@pytest.mark.parametrize(
    "name, text, words",
    [
        ("nuc", profile_text("nuc", threads=100_000), ["threads", "at most 256", "100000"]),  # hung onnxruntime
        ("nuc", profile_text("nuc", threads=10**30), ["threads", "at most 256"]),  # TypeError from onnxruntime
        ("nuc", profile_text("nuc", memory_mb="4e3"), ["budgets.memory_mb", "'4e3'", "YAML reads 4e3 as text"]),
        ("nuc", profile_text("nuc", memory_mb="1.5e3"), ["write it with a dot and a signed exponent", "1.0e+3"]),
        ("nuc", profile_text("nuc", fallback="no"), ["unknown fallback False", "no/off/yes/on", "error, cpu"]),
        ("nuc", profile_text("nuc", extra="description: {gpu: iris}\n"), ["description must be text", "dict"]),
        ("nuc", profile_text("nuc", extra="description: 2026-12-01\n"), ["description must be text", "date"]),
        ("phone", profile_text("phone", providers("NNAPIExecutionProvider")), ["'NNAPIExecutionProvider'", "Nnapi"]),
        ("phone", profile_text("phone", providers("XNNPACKExecutionProvider")), ["XnnpackExecutionProvider"]),
        (
            "pi",
            profile_text("pi", "  - backend: ONNXRuntime\n    providers: [CPUExecutionProvider]\n"),
            ["onnxruntime"],
        ),
        ("pi", profile_text("pi", "  - backend: tflite\n    providers: [xnnpack]\n"), ["'xnnpack'", "XNNPACK"]),
        ("pi", profile_text("pi") + "threads: 2\n", ["'threads' appears twice"]),
        ("pi", BOMB, ["expands to more than"]),
        ("pi", profile_text("pi").encode("latin-1") + "description: caf\xe9\n".encode("latin-1"), ["not valid YAML"]),
        ("pi", b"name: pi\x00\n", ["not valid YAML"]),
        ("pi", "!!python/object/apply:os.system ['true']\n", ["could not determine a constructor"]),
    ],
)
def test_a_users_profile_mistake_is_refused_naming_it(tmp_path, name, text, words):
    path = write(tmp_path, name, text)
    with pytest.raises((ConfigError, FormatError)) as e:
        load_profile(path)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert main(["devices", "--devices-dir", str(tmp_path)]) == 2


def test_the_cli_refuses_each_in_one_line_without_a_traceback(tmp_path, model, capsys):
    bad = write(tmp_path, "nuc", profile_text("nuc", threads=100_000))
    cmds = [
        ["devices", "--devices-dir", str(tmp_path)],
        ["profile", str(model), "--device", str(bad), "--runs", "1", "-q"],
        ["profile", str(model), "--device", "nuc", "--devices-dir", str(tmp_path), "--runs", "1", "-q"],
        ["sync", "--device", str(bad), "--adapters", str(tmp_path / "a"), "--model", str(model)],
        ["update", "--model", str(model), "--data", str(tmp_path), "--device", "nuc", "--devices-dir", str(tmp_path)],
    ]
    for cmd in cmds:  # in process: anything but an EdgeError would escape main() here as its traceback does
        assert main(cmd) == 2, cmd
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1, (cmd, err)
        assert err.startswith("edge: error: ") and "at most 256" in err, (cmd, err)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_folder_or_fifo_named_like_a_profile_is_refused_at_once(tmp_path):
    (tmp_path / "board.yaml").mkdir()
    os.mkfifo(tmp_path / "pipe.yaml")
    kinds = {"board.yaml": "a folder", "pipe.yaml": r"a FIFO \(named pipe\)", tmp_path.name: "a folder"}
    for path in (tmp_path / "board.yaml", tmp_path / "pipe.yaml", tmp_path):
        with pytest.raises(ConfigError, match=f"{path.name} is {kinds[path.name]}, not a regular file"):
            load_profile(path)
    with pytest.raises(FormatError, match="folder|FIFO"):  # found by name in a --devices-dir: still not read
        load_profile("board", search=[tmp_path])


def test_a_yml_file_is_named_when_the_profile_is_asked_for_by_name(tmp_path):
    write(tmp_path, "zero2", profile_text("zero2"), suffix=".yml")
    with pytest.raises(ConfigError) as e:
        load_profile("zero2", search=[tmp_path])
    assert "zero2.yml is not searched: rename it to zero2.yaml" in str(e.value)
    assert load_profile(tmp_path / "zero2.yml").name == "zero2"  # by path it loads
    with pytest.raises(ConfigError, match="unknown device profile 'zero3'; known:"):
        load_profile("zero3", search=[tmp_path])


def test_yaml_11_numbers_written_the_way_it_reads_them_load(tmp_path):
    p = load_profile(write(tmp_path, "nuc", profile_text("nuc", threads=256, memory_mb="1.0e+308")))
    assert p.threads == 256 and p.budgets.memory_mb == 1.0e308


# -- providers this machine lacks: said, or refused; never swapped quietly ----------------------------------------
BOARDS = {
    "jetson": providers("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "phone": providers(
        "NnapiExecutionProvider", "QNNExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider"
    ),
    "nuc": providers("OpenVINOExecutionProvider", "CPUExecutionProvider"),
}


@pytest.mark.parametrize("board", sorted(BOARDS))
def test_a_board_whose_providers_are_missing_here_says_so_or_refuses(tmp_path, model, board, caplog):
    import onnxruntime as ort

    wanted = [line.split("- ")[1] for line in BOARDS[board].splitlines() if line.startswith("      - ")]
    missing = [p for p in wanted if p not in ort.get_available_providers()]
    if not missing:
        pytest.skip(f"this machine has every provider of {board}")
    cpu = write(tmp_path, board, profile_text(board, BOARDS[board], fallback="cpu"))
    with caplog.at_level(logging.WARNING, logger="edge.devices"):
        rt = edge.Runtime(model, device=cpu)
    assert rt.providers == ["CPUExecutionProvider"] and rt.fallback_warning
    assert all(p in rt.fallback_warning for p in missing) and "fallback: cpu" in rt.fallback_warning
    assert any(all(p in r.getMessage() for p in missing) for r in caplog.records)  # logged, not only recorded
    rt.close()
    strict = write(tmp_path / "strict", board, profile_text(board, BOARDS[board], fallback="error"))
    with pytest.raises(BackendUnavailableError) as e:
        edge.Runtime(model, device=strict)
    assert all(p in str(e.value) for p in missing) and "fallback: cpu" in str(e.value)


def test_update_takes_the_devices_dir_as_every_other_command_does(tmp_path):
    from edge.commands import update

    write(tmp_path, "zero2", profile_text("zero2", memory_mb="48"))
    args = argparse.Namespace(memory_mb=None, device="zero2", devices_dir=[tmp_path])
    budget, source = update._budget(args)
    assert budget == 48.0 and "zero2" in source
    parser = argparse.ArgumentParser()
    update.register(parser.add_subparsers())
    parsed = parser.parse_args(["update", "--model", "m", "--data", "d", "--devices-dir", str(tmp_path)])
    assert parsed.devices_dir == [tmp_path]


def test_runtime_and_cli_threads_are_range_checked_like_profiles(tmp_path, capsys):
    """``Runtime(threads=...)`` and ``--threads``: None or 1..256, else one typed line (10**5 hung onnxruntime's
    session build, 10**30 overflowed its int, -3 was accepted)."""
    import _tiny

    from edge.cli import main
    from edge.errors import ConfigError
    from edge.runtime import Runtime

    _tiny.make_mlp(tmp_path / "m.onnx")
    for bad in (0, -3, 100_000, 10**30, True, 2.0):
        with pytest.raises(ConfigError, match="at most 256"):
            Runtime(tmp_path / "m.onnx", threads=bad)
    with Runtime(tmp_path / "m.onnx", threads=2) as rt:
        assert rt.backend.threads == 2
    for bad in ("0", "100000", "two"):
        assert main(["bench", "switch", "--threads", bad]) == 2
    err = capsys.readouterr().err
    assert "at most 256" in err and "not an integer: 'two'" in err


def test_a_provider_fallback_is_logged_once_per_load(tmp_path, caplog):
    """A profile whose provider is missing here, with ``fallback: cpu``: the runtime says so once (the engine
    choice only asks whether the backend can run, quietly), and keeps it in ``fallback_warning``."""
    import logging

    import _tiny

    from edge.runtime import Runtime

    _tiny.make_mlp(tmp_path / "m.onnx")
    gpu = "  - backend: onnxruntime\n    providers:\n      - CUDAExecutionProvider\n      - CPUExecutionProvider\n"
    path = write(tmp_path / "d", "jetson", profile_text("jetson", backends=gpu, fallback="cpu"))
    with caplog.at_level(logging.WARNING), Runtime(tmp_path / "m.onnx", device=path) as rt:
        assert "CUDAExecutionProvider" in rt.fallback_warning
    said = [r for r in caplog.records if "not available here" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]


@pytest.mark.parametrize(
    "extra, words",
    [
        ("registry: 'reg.example.com'\ntuf_root: root.json\n", "needs a repository"),
        ("registry: 'reg example.com/edge'\ntuf_root: root.json\n", "is not 'host' or 'host:port'"),
        ("registry: 'reg.example.com/Edge/Adapters'\ntuf_root: root.json\n", "not a valid OCI repository name"),
        ("registry: 'reg.example.com/edge'\ntuf_root: root.json\nchannel: '../x'\n", "channel '../x' is not allowed"),
    ],
)
def test_a_profiles_fleet_source_is_checked_when_it_loads(tmp_path, extra, words):
    """``registry`` and ``channel`` follow the fleet's rules (edge.format.names) at load, not at the first sync:
    ``edge devices`` no longer lists a profile that every sync would refuse."""
    path = write(tmp_path, "site", profile_text("site", extra=extra))
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_profile(path)
