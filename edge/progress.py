"""Progress bars: tqdm when installed, a silent stand-in otherwise (device installs stay lean)."""

from __future__ import annotations


class _Quiet:
    def __init__(self, *a, **k) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def bar(**kwargs):
    """A tqdm bar (to stderr) with the given kwargs, or a no-op bar if tqdm is missing or disabled."""
    if kwargs.get("disable"):
        return _Quiet()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Quiet()
    return tqdm(**kwargs)
