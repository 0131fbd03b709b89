"""What the tap-cache and engine-cache tests share (X20, B21, L21): a counting stand-in for the tap, another uid
for folders that are not the user's, and the engine pair whose choice the engine cache keeps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOBODY = 65534  # a uid that is not the test's (tests run as root here: os.chown makes such folders)
as_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="folders of another uid need root (os.chown)"
)


class CountingTap:
    """``tap(src, dst)`` as edge.route.tapcache calls it: writes a marked copy and counts the calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, src: Path, dst: Path) -> str:
        self.calls += 1
        dst.write_bytes(src.read_bytes() + b"tapped")
        return "edge.features"


def engine_pair(tmp_path: Path, monkeypatch) -> Path:
    """``m.onnx`` and ``m.tflite`` (one tiny MLP) with the engine cache under ``tmp_path`` and no warning said yet."""
    import _tiny
    import _tiny_tflite

    from edge import cache_trust

    monkeypatch.setattr(cache_trust, "_WARNED", set())
    monkeypatch.setenv("EDGE_ENGINE_CACHE", str(tmp_path / "c" / "choices"))
    _tiny.make_mlp(tmp_path / "m.onnx", seed=3)
    _tiny_tflite.make_mlp(tmp_path / "m.tflite", seed=3)
    return tmp_path / "m.onnx"


def count_measuring(monkeypatch) -> list[int]:
    """How many times the engine cache measured engines (the real measuring, counted)."""
    import edge.engine_cache as ec
    from edge import engines

    count = [0]

    def counting(*a, **k):
        count[0] += 1
        return engines.compare_engines(*a, **k)

    monkeypatch.setattr(ec, "compare_engines", counting)
    return count
