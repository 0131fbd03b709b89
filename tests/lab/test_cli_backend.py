"""`--backend` on every command: the default follows `edge.Runtime` (None: the file's own engine; `edge profile`,
which always has a device profile: auto), and the commands that need one engine name it and say why."""

from __future__ import annotations

import argparse

import pytest

from edge.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _backend(parser: argparse.ArgumentParser) -> argparse.Action | None:
    return next((a for a in parser._actions if "--backend" in a.option_strings), None)


def _every_backend_flag() -> dict[str, argparse.Action]:
    """Command path (``bench switch``) -> its ``--backend`` action, for every command that has one."""
    found = {}
    for name, sp in _subparsers(build_parser(complete=True)).items():
        if name == "bench":
            for bench, bp in _subparsers(sp).items():
                if _backend(bp) is not None:
                    found[f"bench {bench}"] = _backend(bp)
        elif _backend(sp) is not None:
            found[name] = _backend(sp)
    return found


def test_every_backend_flag_has_a_default_that_says_why():
    pytest.importorskip("lab")
    flags = _every_backend_flag()
    assert {"demo", "train", "update", "profile", "bench switch", "bench quantized", "bench ood"} <= set(flags)
    for command, action in flags.items():
        if command.startswith("bench "):  # a bench measures one named engine: kept explicit, with the reason
            assert action.default == "onnxruntime" and "one section per engine" in action.help, command
        else:  # as edge.Runtime(model): no backend given
            assert action.default is None, command
            assert "auto" in action.help, command
    assert "edge.Runtime(model)" in flags["demo"].help and ".tflite: tflite" in flags["demo"].help
    assert "default auto" in flags["profile"].help and "device=NAME" in flags["profile"].help


def test_the_stream_names_onnxruntime_because_its_taps_edit_the_onnx_graph(monkeypatch):
    pytest.importorskip("lab")
    import lab.stream

    seen = {}
    monkeypatch.setattr(lab.stream, "cli", lambda args: seen.setdefault("backend", args.backend) and 0)
    args = build_parser().parse_args(["demo", "--stream", "-q"])
    assert args.backend is None and args.func(args) == 0
    assert seen["backend"] == "onnxruntime"
    assert "onnxruntime" in _subparsers(build_parser(complete=True))["demo"]._option_string_actions["--stream"].help
    seen.clear()
    args = build_parser().parse_args(["demo", "--stream", "--backend", "tflite", "-q"])
    args.func(args)
    assert seen["backend"] == "tflite"  # given: passed on, and refused there with the reason (lab.stream)


def test_benches_that_run_no_engine_of_the_users_choosing_take_no_backend_flag():
    """``edge bench engines`` compares every engine, ``update`` runs the demo's .onnx, ``fleet`` runs no model:
    a ``--backend`` there would be read by nothing (and ``fleet`` takes no ``--threads`` either)."""
    pytest.importorskip("lab")
    benches = _subparsers(_subparsers(build_parser(complete=True))["bench"])
    for name in ("engines", "update", "fleet"):
        assert _backend(benches[name]) is None, name
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", name, "--backend", "tflite"])
    assert "--threads" not in benches["fleet"]._option_string_actions
    assert "one for a model file under 1 MiB" in benches["switch"]._option_string_actions["--threads"].help
