"""Device profiles this project did not write: what a Jetson, Raspberry Pi or phone engineer writes from README's
"Device profiles" section alone, through every way a profile is taken (``edge devices``, ``Runtime(device=...)``,
``$EDGE_DEVICES``). Each refusal is one line naming the file and the key; each accepted profile behaves as README says.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _tiny import make_mlp

import edge
from edge.cli import main
from edge.devices import load_profile, search_path
from edge.errors import ConfigError, EdgeError, FormatError

_BODY = """\
architecture: aarch64
backends: [{backend: onnxruntime, providers: [CPUExecutionProvider]}]
threads: 4
budgets: {memory_mb: 512, load_ms: 3000, latency_p95_ms: 40, switch_p95_ms: 10}
tolerances: {atol: 1.0e-4, rtol: 1.0e-3}
fallback: error
"""


def _profile(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\n{text}")
    return path


def _refused(capsys, folder: Path) -> str:
    assert main(["devices", "--devices-dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "edit, words",
    [
        # before: OverflowError out of math.isfinite, a traceback from every command and from Runtime
        (("load_ms: 3000", "load_ms: " + "9" * 400), ["budgets.load_ms must be a positive number", "characters"]),
        # before: accepted by `edge devices`; refused only when a model loaded, naming neither file nor key
        (("backend: onnxruntime,", "backend: onnxruntime, strategy: fastest,"), ["backends[0].strategy", "fastest"]),
        # before: YAML 1.1 read these as 8 and 90 threads, silently
        (("threads: 4", "threads: 010"), ["'010' (line 4) is octal to YAML 1.1 (8)"]),
        (("threads: 4", "threads: 1:30"), ["'1:30' (line 4) is a base-60 number to YAML 1.1 (90)", "write 90"]),
    ],
)
def test_a_foreign_profile_is_refused_in_one_line_naming_file_and_key(tmp_path, capsys, edit, words):
    path = _profile(tmp_path / "mine", "pi4-kitchen", _BODY.replace(*edit))
    err = _refused(capsys, tmp_path / "mine")
    assert str(path) in err and all(w in err for w in words), err
    os.environ["EDGE_DEVICES"] = str(tmp_path / "mine")  # the same file reached through the environment and the API
    try:
        make_mlp(tmp_path / "m.onnx")
        with pytest.raises((ConfigError, FormatError)) as e:
            edge.Runtime(str(tmp_path / "m.onnx"), device="pi4-kitchen")
        assert str(path) in str(e.value) and all(w in str(e.value) for w in words)
    finally:
        del os.environ["EDGE_DEVICES"]


@pytest.mark.parametrize(
    "edit, words",
    [
        (("memory_mb: 512", "memory_mb: 512MB"), ["budgets.memory_mb must be a positive number", "'512MB'", ": mb)"]),
        (("memory_mb: 512", "memory_mb: 0.5 GiB"), ["budgets.memory_mb", "'0.5 GiB'", "number alone"]),
        (("load_ms: 3000", "load_ms: 3 s"), ["budgets.load_ms", "in the unit the key's name gives: ms"]),
        (("threads: 4", "treads: 4"), ["unknown key(s) ['treads']", "known keys"]),
        (("threads: 4", "threads: -4"), ["threads must be a positive integer", "-4"]),
        (("threads: 4", 'threads: "4"'), ["threads must be a positive integer", "'4'"]),
        (("threads: 4", "threads: 4\nextends: rpi4"), ["unknown key(s) ['extends']"]),
        (("aarch64", "arm64"), ["unknown architecture 'arm64'", "aarch64"]),
        (("fallback: error", "fallback: CPU"), ["unknown fallback 'CPU'", "error, cpu"]),
        (("fallback: error", "fallback: no"), ["unknown fallback False", "YAML reads an unquoted no"]),
        (("memory_mb: 512", "memory_mb: .inf"), ["budgets.memory_mb must be a positive number, got inf"]),
        (("atol: 1.0e-4", "atol: 1e-4"), ["tolerances.atol", "write it with a dot and a signed exponent"]),
        (
            ("fallback: error", "fallback: error\nregistry: r.example/a\ntuf_root: r.json\nchannel: 2024"),
            ["channel must be text (quote it), got int"],
        ),
    ],
)
def test_the_usual_mistakes_are_refused_naming_file_and_key(tmp_path, capsys, edit, words):
    path = _profile(tmp_path / "mine", "pi4-kitchen", _BODY.replace(*edit))
    err = _refused(capsys, tmp_path / "mine")
    assert str(path) in err and all(w in err for w in words), err


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "must be a mapping"),
        (b"- name: a\n- name: b\n", "must be a mapping"),
        (b"name: x\nname: x\n", "appears twice"),
        (
            b"a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + b"".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n".encode() for p, c in zip("abcdef", "bcdefg")),
            "expands to more than",
        ),
        (b"name: " + b"[" * 100 + b"]" * 100, "nesting deeper"),
        (b"threads: !!python/object/apply:os.system [echo]\n", "could not determine a constructor"),
        (b"name: x\n# " + b"x" * (2 << 20) + b"\n", "over the limit"),
    ],
    ids=["empty", "list", "duplicate", "bomb", "deep", "python-tag", "big"],
)
def test_hostile_files_are_refused_naming_the_file(tmp_path, capsys, data, words):
    (tmp_path / "mine").mkdir()
    path = tmp_path / "mine" / "x.yaml"
    path.write_bytes(data)
    err = _refused(capsys, tmp_path / "mine")
    assert str(path) in err and words in err, err


def test_edge_devices_lists_a_folder_named_twice_once(tmp_path, capsys, monkeypatch):
    shipped = search_path()[-1]
    monkeypatch.setenv("EDGE_DEVICES", os.pathsep.join([str(shipped), str(tmp_path / ".." / tmp_path.name), ""]))
    dirs = search_path([tmp_path])
    assert dirs == [tmp_path, shipped]  # before: tmp_path twice and the shipped folder twice
    assert main(["devices", "--devices-dir", str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("profiles from"))
    assert line.count(str(shipped)) == 1, line


_JETSON = """\
# Orin NX in the lab rack, written from README "Device profiles"
fallback: cpu
threads: 8
architecture: aarch64
description: >
  Orin NX 16GB, JetPack 6.1,
  onnxruntime-gpu
tolerances: &tight {atol: 1.0e-2, rtol: 1.0e-2}
budgets:
  switch_p95_ms: 50
  latency_p95_ms: 12.5
  load_ms: 45000
  memory_mb: 6144
backends:
  - providers:
      - name: CUDAExecutionProvider
        options: {device_id: 0, do_copy_in_default_stream: yes}
      - CPUExecutionProvider
    backend: onnxruntime
registry: 127.0.0.1:5000/edge/adapters
tuf_root: keys/root.json
channel: site-lab1
"""


def test_foreign_profiles_that_read_well_behave_as_readme_says(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    _profile(mine, "jetson-lab", _JETSON)
    crlf = ("\ufeff# pi zero 2\n" + "name: pizero2\n" + _BODY.replace("threads: 4", "threads: ~")).replace("\n", "\r\n")
    (mine / "pizero2.yaml").write_bytes(crlf.encode())
    make_mlp(tmp_path / "m.onnx")
    monkeypatch.setenv("EDGE_DEVICES", str(mine))
    jetson = load_profile("jetson-lab")
    assert jetson.description == "Orin NX 16GB, JetPack 6.1, onnxruntime-gpu\n" and jetson.threads == 8
    assert jetson.fleet.tuf_root == mine / "keys" / "root.json" and jetson.fleet.channel == "site-lab1"
    assert dict(jetson.backends[0].providers[0].options) == {"device_id": "0", "do_copy_in_default_stream": "1"}
    rt = edge.Runtime(str(tmp_path / "m.onnx"), device="jetson-lab")  # fallback: cpu on a machine without CUDA
    if "CUDAExecutionProvider" not in rt.providers:
        assert rt.providers == ["CPUExecutionProvider"] and "CUDAExecutionProvider" in rt.fallback_warning
    pi = load_profile("pizero2")
    assert pi.threads is None and pi.fallback == "error" and pi.budgets.memory_mb == 512.0
    rt = edge.Runtime(str(tmp_path / "m.onnx"), device="pizero2")
    assert rt.providers == ["CPUExecutionProvider"] and rt.fallback_warning is None
    assert main(["devices"]) == 0  # both listed beside the shipped ones


def test_every_refusal_is_an_edge_error_that_is_also_a_builtin(tmp_path):
    path = _profile(tmp_path, "pi4-kitchen", _BODY.replace("load_ms: 3000", "load_ms: " + "9" * 400))
    with pytest.raises(EdgeError) as e:
        load_profile(path)
    assert isinstance(e.value, ValueError)
