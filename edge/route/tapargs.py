"""The arguments of :func:`edge.route.taps.tap_model`, checked before anything is read: a wrong type (the paths and
the tap set swapped, a ``Path`` where the taps go) is a :class:`~edge.errors.ConfigError` naming what was given and
the signature, not a ``TypeError`` from deep inside."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from edge.errors import ConfigError

__all__ = ["SIGNATURE", "check_args"]

SIGNATURE = "tap_model(src, dst, taps='auto', *, head=None, mask='auto', layout=None)"


def _given(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _path(value, name: str, what: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or isinstance(value, bytes) or str(value) == "":
        raise ConfigError(f"{name} must be {what} (str or os.PathLike), got {_given(value)}; call {SIGNATURE}")
    return Path(value)


def check_args(src, dst, taps, head, mask, layout) -> tuple[Path, Path, str | list[str]]:
    """``(src, dst, taps)`` as :func:`tap_model` uses them, or :class:`ConfigError` naming the argument at fault."""
    from edge.route.head import Head
    from edge.route.tapsets import TAP_SETS

    src = _path(src, "src", "the ONNX model to tap")
    dst = _path(dst, "dst", "the path to write the tapped model to")
    if dst.is_dir():
        raise ConfigError(f"dst {str(dst)!r} is a directory; give the path of the file to write, e.g. "
                          f"{str(dst / (src.stem + '.taps.onnx'))!r}")  # fmt: skip
    if isinstance(src, Path) and src.suffix == "" and str(src).partition(":")[0] in TAP_SETS and not src.exists():
        raise ConfigError(f"src {str(src)!r} is a tap set name, not a model file: the arguments are in the wrong "
                          f"order; call {SIGNATURE}")  # fmt: skip
    sets = ", ".join(TAP_SETS.names())
    if isinstance(taps, os.PathLike) or isinstance(taps, (bytes, Mapping)) or not isinstance(taps, (str, Sequence)):
        raise ConfigError(
            f"taps must be a tap set name ({sets}; NAME:K) or a list of tensor names, got {_given(taps)}"
            + ("; a path: src and dst come first, the taps third: " if isinstance(taps, os.PathLike) else "; call ")
            + SIGNATURE
        )
    if not isinstance(taps, str):
        wrong = [t for t in taps if not isinstance(t, str)]
        if wrong:
            raise ConfigError(f"taps must be tensor names (str), got {_given(wrong[0])} among them; call {SIGNATURE}")
        taps = list(taps)
    if head is not None and not isinstance(head, Head):
        raise ConfigError(f"head must be an edge.route.taps.Head or None, got {_given(head)}; call {SIGNATURE}")
    if mask is not None and not isinstance(mask, str):
        raise ConfigError(f"mask must be 'auto', an input's name or None, got {_given(mask)}; call {SIGNATURE}")
    if layout is not None and not isinstance(layout, Mapping):
        raise ConfigError(
            f"layout must be a mapping {{tensor name: 'channels-first' | 'channels-last'}} or None, got "
            f"{_given(layout)}; call {SIGNATURE}"
        )
    return src, dst, taps
