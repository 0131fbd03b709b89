"""``--quiet`` on the host: the libraries an export runs print nothing the user need not see.

``edge export --quiet`` once still showed transformers' own progress bar (``Loading weights``), torch's exporter
logging (``torchvision is not installed. Skipping torchvision::nms``) and Python warnings from torch's internals
(pytree deprecations, dynamic-shape notes). Inside :func:`quiet_host`:

- transformers' progress bars are off (``transformers.utils.logging.disable_progress_bar``); its log level is left
  as it is, so a checkpoint whose weights do not all load ("newly initialized") is still said;
- torch's and onnxscript's loggers show errors only;
- ``FutureWarning`` and ``DeprecationWarning`` (API deprecations inside the libraries, never about the user's
  model) are ignored, and so are ``UserWarning`` raised inside torch or onnxscript (exporter notes: the exported
  file is validated against torch afterwards, so a wrong trace fails loudly instead).

- what torch prints straight to ``sys.stderr``/``sys.stdout`` during ``torch.onnx.export`` (a failed trace's whole
  FX graph, hundreds of lines, before the one-line error: Longformer's data-dependent guard) is held back:
  :func:`library_prints` around the export call, while a :func:`quiet_host` block runs (logged at DEBUG).

This project's own warnings (``exporters.*``, ``edge.*`` loggers) are untouched. Everything is put back on exit.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import warnings
from collections.abc import Iterator

__all__ = ["quiet_host", "library_prints", "QUIET_LOGGERS"]

log = logging.getLogger(__name__)
_QUIET = contextvars.ContextVar("exporters_quiet", default=False)

#: loggers of the export's libraries held to errors while quiet
QUIET_LOGGERS = ("torch", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def quiet_host(enabled: bool = True) -> Iterator[None]:
    """Quiet the export's libraries while the block runs (nothing changes when ``enabled`` is false)."""
    if not enabled:
        yield
        return
    hf = _transformers_logging()
    _import_torch()  # torch's import resets its loggers' levels: set ours after it
    bar_was = hf.is_progress_bar_enabled() if hf is not None else None
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    token = _QUIET.set(True)
    try:
        if hf is not None:
            hf.disable_progress_bar()
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|onnxscript|onnx_ir)(\.|$)")
            yield
    finally:
        _QUIET.reset(token)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if hf is not None and bar_was:
            hf.enable_progress_bar()


@contextlib.contextmanager
def library_prints(what: str) -> Iterator[None]:
    """Inside a :func:`quiet_host` block, hold back what the libraries print to ``sys.stdout``/``sys.stderr`` while
    this block runs (logged at DEBUG); outside one, nothing changes."""
    if not _QUIET.get():
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held), contextlib.redirect_stdout(held):
            yield
    finally:
        if text := held.getvalue().strip():
            log.debug("%s printed %d line(s), held back by --quiet:\n%s", what, text.count("\n") + 1, text)


def _import_torch() -> None:
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401


def _transformers_logging():
    """``transformers.utils.logging`` when transformers is installed, else None (an ONNX-only host)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    return hf_logging
