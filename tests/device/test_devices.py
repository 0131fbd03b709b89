"""Device profiles: the shipped ones load, bad ones are refused by name, the fallback policy, `edge devices`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from edge.cli import main
from edge.devices import (
    DeviceProfile,
    Tolerances,
    available_providers,
    backend_status,
    list_profiles,
    load_profile,
    packaged_dir,
    resolve_providers,
)
from edge.errors import BackendUnavailableError, ConfigError, EdgeError
from runtimes import TABLE, backend_names, get_backend

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("rpi4", "rpi5", "jetson-orin-nano", "qualcomm-qnn", "coral-edgetpu", "x86-dev")

GOOD = {
    "name": "board",
    "description": "a test board",
    "architecture": "aarch64",
    "backends": [
        {
            "backend": "onnxruntime",
            "strategy": "auto",
            "providers": [
                {"name": "CUDAExecutionProvider", "options": {"device_id": 0, "do_copy_in_default_stream": True}},
                "CPUExecutionProvider",
            ],
        }
    ],
    "threads": 2,
    "budgets": {"memory_mb": 512, "load_ms": 1000, "latency_p95_ms": 10, "switch_p95_ms": 5},
    "tolerances": {"atol": 1e-4, "rtol": 1e-3},
    "fallback": "cpu",
}


def _write(folder: Path, data: dict, stem: str | None = None) -> Path:
    path = folder / f"{stem or data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _variant(**changes) -> dict:
    data = json.loads(json.dumps(GOOD))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is _DELETE:
            del node[leaf]
        else:
            node[int(leaf) if leaf.isdigit() else leaf] = value
    return data


_DELETE = object()


def test_packaged_folder_is_found_and_every_file_loads():
    folder = packaged_dir()
    assert folder is not None and folder.resolve() == (ROOT / "devices").resolve()
    assert {p.stem for p in folder.glob("*.yaml")} >= set(SHIPPED)
    names = [p.name for p in list_profiles()]
    assert names == sorted(names) and set(SHIPPED) <= set(names)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads(name):
    p = load_profile(name)
    assert isinstance(p, DeviceProfile) and p.name == name and p.source.name == f"{name}.yaml"
    assert p.fallback in ("error", "cpu") and p.budgets.latency_p95_ms > 0 and p.tolerances.atol > 0
    for pref in p.backends:
        assert pref.providers and all(s.name in get_backend(pref.backend).PROVIDERS for s in pref.providers)
        assert all(isinstance(v, str) for s in pref.providers for v in s.options.values())


def test_shipped_profiles_cover_the_targets_the_issue_names():
    jetson = [s.name for s in load_profile("jetson-orin-nano").backends[0].providers]
    assert jetson == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    qnn = load_profile("qualcomm-qnn").backends[0].providers[0]
    assert qnn.name == "QNNExecutionProvider" and qnn.options["backend_path"] == "libQnnHtp.so"
    assert qnn.options["enable_htp_fp16_precision"] == "1"  # YAML true -> the runtime's "1"
    assert load_profile("coral-edgetpu").backends[0].backend == "tflite"
    assert load_profile("x86-dev").architecture == "x86_64" and load_profile("x86-dev").threads is None


def test_every_known_backend_has_a_probe_and_a_cpu_provider():
    for backend in backend_names():
        cls = get_backend(backend)
        assert callable(cls.available_providers) and cls.INSTALL_HINT
        assert cls.CPU_PROVIDER in cls.PROVIDERS


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"colour": "red"}, ["unknown key(s) ['colour']", "known keys: name, description, architecture"]),
        ({"budgets": _DELETE}, ["missing field(s) ['budgets']", "required: name, architecture"]),
        ({"budgets__latency_ms": 3}, ["unknown key(s) ['latency_ms']", "latency_p95_ms"]),
        ({"budgets__load_ms": _DELETE}, ["missing field(s) ['load_ms'] in budgets"]),
        ({"backends__0__providers__1": "CPUProvider"}, ["'CPUProvider'", "allowed: CPUExecutionProvider"]),
        ({"backends__0__backend": "tensorflow"}, ["'tensorflow'", "allowed: onnxruntime, tflite"]),
        ({"backends__0__providers__0__options": {"gpu_memory_limit": 1}}, ["['gpu_memory_limit']", "gpu_mem_limit"]),
        ({"backends__0__providers__0__options": {"device_id": [0]}}, ["options.device_id", "string, number"]),
        ({"backends__0__priority": 1}, ["unknown key(s) ['priority'] in backends[0]", "backend, providers"]),
        ({"backends": []}, ["backends must be a non-empty list"]),
        ({"fallback": "retry"}, ["unknown fallback 'retry'", "allowed: error, cpu"]),
        ({"architecture": "arm"}, ["unknown architecture 'arm'", "aarch64, x86_64"]),
        ({"threads": 0}, ["threads must be a positive integer or null"]),
        ({"budgets__memory_mb": -1}, ["budgets.memory_mb must be a positive number"]),
        ({"tolerances__rtol": "tight"}, ["tolerances.rtol must be a non-negative number"]),
        ({"backends__0__precision": "int4"}, ["unknown backends[0].precision 'int4'", "any, fp32, int8"]),
    ],
)
def test_bad_profile_names_what_is_wrong(tmp_path, changes, words):
    path = _write(tmp_path, _variant(**changes))
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    msg = str(e.value)
    assert str(path) in msg
    for w in words:
        assert w in msg


def test_name_must_match_file_and_yaml_must_parse(tmp_path):
    with pytest.raises(ConfigError, match="differs from the file name"):
        load_profile(_write(tmp_path, GOOD, stem="other"))
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(EdgeError, match="cannot read device profile"):
        load_profile(bad)


def test_user_folder_by_argument_and_environment_shadows_shipped(tmp_path, monkeypatch):
    mine = _variant(name="rpi4", description="my tuned rpi4")
    _write(tmp_path, mine)
    _write(tmp_path, GOOD)
    assert load_profile("rpi4").description != "my tuned rpi4"
    assert load_profile("rpi4", search=[tmp_path]).description == "my tuned rpi4"
    assert load_profile("board", search=[tmp_path]).threads == 2
    monkeypatch.setenv("EDGE_DEVICES", str(tmp_path))
    assert load_profile("board").source == tmp_path / "board.yaml"
    assert {"board", "x86-dev"} <= {p.name for p in list_profiles()}
    with pytest.raises(ConfigError) as e:
        load_profile("no-such-board")
    assert "known: board, coral-edgetpu" in str(e.value) and "EDGE_DEVICES" in str(e.value)


def test_missing_profile_folder_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="does not exist"):
        list_profiles([tmp_path / "nope"])
    monkeypatch.setenv("EDGE_DEVICES", str(tmp_path / "typo"))
    with pytest.raises(ConfigError, match="typo does not exist"):
        load_profile("rpi4")


@pytest.mark.parametrize(
    "fallback, available, expected, warns",
    [
        (
            "cpu",
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            0,
        ),
        (
            "error",
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            0,
        ),
        ("cpu", ["CPUExecutionProvider"], ["CPUExecutionProvider"], 1),
        ("cpu", ["AzureExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"], 1),
        ("error", ["CPUExecutionProvider"], BackendUnavailableError, 0),
        ("cpu", ["AzureExecutionProvider"], BackendUnavailableError, 0),
    ],
)
def test_fallback_policy(tmp_path, caplog, fallback, available, expected, warns):
    profile = load_profile(_write(tmp_path, _variant(fallback=fallback)))
    if isinstance(expected, type):
        with pytest.raises(expected) as e:
            resolve_providers(profile, "onnxruntime", available)
        assert "CUDAExecutionProvider" in str(e.value) and str(available) in str(e.value)
        return
    with caplog.at_level("WARNING", logger="edge.devices"):
        chosen, warning = resolve_providers(profile, "onnxruntime", available)
    assert [s.name for s in chosen] == expected
    assert (warning is not None) == bool(warns) and len(caplog.records) == warns
    if warns:
        assert "CUDAExecutionProvider" in warning and "fallback: cpu" in warning


def test_profile_without_the_backend(tmp_path):
    litert_only = _variant(backends=[{"backend": "tflite", "providers": ["EDGETPU", "CPU"]}])
    strict = load_profile(_write(tmp_path, {**litert_only, "fallback": "error"}))
    with pytest.raises(ConfigError, match="lists backends \\[tflite\\], not 'onnxruntime'"):
        resolve_providers(strict, "onnxruntime", ["CPUExecutionProvider"])
    lenient = load_profile(_write(tmp_path, {**litert_only, "name": "lenient"}))
    chosen, warning = resolve_providers(lenient, "onnxruntime", ["CPUExecutionProvider"])
    assert [s.name for s in chosen] == ["CPUExecutionProvider"] and "no onnxruntime entry" in warning


def test_backend_options_carry_threads_strategy_and_provider_options(tmp_path):
    profile = load_profile(_write(tmp_path, _variant(**{"backends__0__strategy": "bound"})))
    opts = profile.backend_options("onnxruntime", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert opts.threads == 2 and opts.strategy == "bound"
    assert opts.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert opts.provider_options == ({"device_id": "0", "do_copy_in_default_stream": "1"}, {})
    assert opts.fallback_warning is None and opts.device == "board"
    opts = profile.backend_options("onnxruntime", ["CPUExecutionProvider"])
    assert opts.providers == ("CPUExecutionProvider",) and "CUDAExecutionProvider" in opts.fallback_warning


def test_this_machine_probe_matches_onnxruntime():
    import onnxruntime as ort

    assert backend_status("onnxruntime") == "installed"
    options = load_profile("x86-dev").backend_options("onnxruntime")  # probes this machine
    assert options.providers == ("CPUExecutionProvider",) and "CPUExecutionProvider" in ort.get_available_providers()


def test_coral_profile_loads_and_says_what_is_missing_here():
    coral = load_profile("coral-edgetpu")
    if "EDGETPU" in (available_providers("tflite") or []):
        pytest.skip("this machine has an Edge TPU delegate")
    with pytest.raises(BackendUnavailableError) as e:
        coral.backend_options("tflite")
    assert "EDGETPU" in str(e.value) or "ai-edge-litert" in str(e.value)


def test_every_runtimes_backend_is_known_to_profiles():
    from runtimes import backend_names

    assert set(backend_names()) == set(TABLE)


@pytest.mark.parametrize(
    "actual, expected, ok",
    [([1.0, 2.0], [1.0, 2.0], True), ([1.0, 2.01], [1.0, 2.0], False), ([1.0], [1.0, 2.0], False)],
)
def test_tolerances(actual, expected, ok):
    diff, within = Tolerances(atol=1e-3, rtol=1e-3).check(actual, expected)
    assert within is ok and diff >= 0


def test_cli_devices_table_and_json(tmp_path, capsys):
    _write(tmp_path, GOOD)
    assert main(["devices", "--devices-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in (*SHIPPED, "board"):
        assert name in out
    assert "onnxruntime: " in out and "CPUExecutionProvider" in out
    assert main(["devices", "--json", "--devices-dir", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in data["profiles"]}
    assert rows["board"]["backends"][0]["providers"] == {"CUDAExecutionProvider": False, "CPUExecutionProvider": True}
    assert rows["board"]["backends"][0]["here"].startswith("yes, falls back to CPU")
    assert rows["qualcomm-qnn"]["backends"][0]["here"] == "no: missing QNN (fallback: error)"
    assert rows["x86-dev"]["backends"][0]["here"] == "yes, on CPU"
    if "EDGETPU" not in data["machine"]["backends"]["tflite"]["providers"]:
        assert rows["coral-edgetpu"]["backends"][0]["here"].startswith("no: ")


def test_cli_devices_bad_folder_exits_2(tmp_path, capsys):
    assert main(["devices", "--devices-dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_profile_names_its_fleet_source(tmp_path):
    p = load_profile(
        _write(tmp_path, {**GOOD, "registry": "127.0.0.1:5000/edge/adapters", "tuf_root": "root.json"}), search=[]
    )
    assert p.fleet is not None and p.fleet.registry == "127.0.0.1:5000/edge/adapters"
    assert p.fleet.tuf_root == tmp_path / "root.json"  # relative to the profile's folder
    assert p.fleet.channel == "stable" and p.fleet.insecure is False
    assert load_profile(_write(tmp_path, {**GOOD, "name": "plain"}), search=[]).fleet is None


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"registry": "127.0.0.1:5000/edge/adapters"}, ["tuf_root", "go together"]),
        ({"tuf_root": "root.json"}, ["registry", "go together"]),
        (
            {"registry": "r/x", "tuf_root": "root.json", "registry_insecure": "yes"},
            ["registry_insecure", "true or false"],
        ),
        ({"registry": "r/x", "tuf_root": "root.json", "channel": 3}, ["channel"]),
    ],
)
def test_bad_fleet_source_names_what_is_wrong(tmp_path, changes, words):
    with pytest.raises(ConfigError) as e:
        load_profile(_write(tmp_path, {**GOOD, **changes}), search=[])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_profile_that_runs_int8_only_refuses_a_float_model(tmp_path):
    from edge import Runtime
    from tests._tiny import make_mlp

    make_mlp(tmp_path / "m.onnx")
    data = _variant(backends__0__precision="int8", fallback="error")
    data["backends"][0]["providers"] = [{"name": "CPUExecutionProvider"}]
    profile = load_profile(_write(tmp_path, data))
    assert profile.backend_options("onnxruntime").precision == "int8"
    with pytest.raises(ConfigError, match="runs int8 models, but 'tiny-mlp' is fp32; quantize it"):
        Runtime(tmp_path / "m.onnx", device=profile)
    assert load_profile(_write(tmp_path, _variant())).backend_options("onnxruntime").precision == "any"
