"""``edge`` subcommands. One module per command, each with ``register(subparsers)``.

Add a command: write ``edge/commands/NAME.py`` and add its module path to
:data:`edge.cli.COMMAND_MODULES`. Add a benchmark: add one line to
:data:`lab.commands.bench.BENCHES`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge"))


def host_needed(what: str) -> None:
    """Raise a clear error when a host-side command runs without torch."""
    import importlib.util

    from edge.errors import EdgeError

    try:  # probe without importing torch (a finder may refuse it outright)
        found = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise EdgeError(
            f"{what} trains or exports models on the host and needs torch: pip install 'edge-adapt[host]' "
            "(device-only installs run exported models and adapters; see README)"
        )


#: ``--threads``' help: the backends' default (:data:`runtimes.base.SMALL_MODEL_BYTES`)
THREADS_HELP = "intra-op threads (default: all cores; one for a model file under 1 MiB)"

#: ``--backend``'s help when a command follows :class:`edge.Runtime`'s rule for ``backend=None``
BACKEND_HELP = (
    "inference engine: onnxruntime, tflite (LiteRT), or auto (the engine measured fastest here among the model's "
    "files side by side, M.onnx and M.tflite; measured once, then kept in the engine cache). Default, as "
    "edge.Runtime(model): the engine of the model file's suffix (.onnx: onnxruntime, .tflite: tflite)"
)


def runtime_flags(
    sp, *, cache: bool = True, backend: str | None = None, why: str = "", engine: bool = True, threads: bool = True
) -> None:
    """``--backend``, ``--threads``, ``--cache`` and ``-q``.

    ``backend=None`` (the default) follows :class:`edge.Runtime`: no device profile here, so the model file's own
    engine, and ``auto`` when asked. A command that needs one engine passes it as ``backend`` and ``why`` it does.
    ``engine=False``: no ``--backend`` (the command runs no engine the user picks, e.g. it compares them all);
    ``threads=False``: no ``--threads`` (it runs no model).
    """
    if engine and backend is not None and not why:
        from edge.errors import ConfigError

        raise ConfigError(f"runtime_flags(backend={backend!r}) needs why: the reason the command pins that engine")
    if engine:
        help_ = BACKEND_HELP if backend is None else f"inference engine (default {backend}: {why})"
        sp.add_argument("--backend", default=backend, help=help_)
    if threads:
        sp.add_argument("--threads", type=_threads, default=None, help=THREADS_HELP)
    if cache:
        sp.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"artifact cache (default {DEFAULT_CACHE})")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _threads(text: str) -> int:
    """``--threads``: an int in 1..MAX_THREADS (argparse turns the error into exit 2 and one line)."""
    import argparse

    from edge.errors import ConfigError
    from edge.machine import check_threads

    try:
        value = int(text)
        check_threads(value, "--threads")
    except (ValueError, ConfigError) as e:
        raise argparse.ArgumentTypeError(str(e) if isinstance(e, ConfigError) else f"not an integer: {text!r}") from e
    return value


def output_path(text: str) -> Path:
    """An output flag's ``type``: the path, refused at parse time (exit 2, one line) if it cannot be written.

    So ``--json /proc/x`` fails before minutes of work, not after (:func:`edge.format.io.check_writable`).
    """
    import argparse

    from edge.errors import WriteError
    from edge.format.io import check_writable

    try:
        return check_writable(text)
    except WriteError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def sniff_model(path: Path) -> str | None:
    """``"tflite"`` or ``"onnx"`` when the first bytes of the regular file ``path`` say so, else None (no error).

    For hints on a refusal only: a flatbuffer ``.tflite`` carries ``TFL3`` at bytes 4..8; an ONNX ``ModelProto``
    opens with field 1 (``ir_version``, a varint: tag byte ``0x08``), as every serializer writes fields in order.
    """
    from edge.errors import FormatError
    from edge.format.io import open_regular

    try:
        fd, _ = open_regular(path)
    except FormatError:
        return None
    try:
        head = os.read(fd, 8)
    except OSError:
        return None
    finally:
        os.close(fd)
    from edge.format.tflite import IDENTIFIER

    if head[4:8] == IDENTIFIER:
        return "tflite"
    return "onnx" if head[:1] == b"\x08" and len(head) == 8 else None


def refuse_overwriting(out: Path, *inputs: Path | None) -> None:
    """ConfigError when ``out`` is one of the command's ``inputs`` (the same file, by any path): it would be lost."""
    from edge.errors import ConfigError

    for given in inputs:
        if given is not None and out.exists() and given.exists() and os.path.samefile(out, given):
            raise ConfigError(f"--out {out} is the input {given}: writing it would destroy it; give another path")


#: each kind of model file: (what a file of it is, its short name, the suffix an import of it writes)
_KINDS = {"onnx": ("an ONNX model", "ONNX", "onnx"), "tflite": ("a .tflite (LiteRT) model", ".tflite", "tflite")}


@contextlib.contextmanager
def other_importer_hint(path: Path, expected: str):
    """Around ``edge import-{expected}``: a ``FormatError`` on a file that is the other kind of model names the
    importer for it (:func:`sniff_model`); any other refusal stands as it is."""
    from edge.errors import FormatError

    try:
        yield
    except FormatError as e:
        found = sniff_model(path)
        if found is None or found == expected:
            raise
        what, _, suffix = _KINDS[found]
        raise FormatError(
            f"{path.name} is {what}, not {_KINDS[expected][1]}: import it with `edge import-{found} {path} --out "
            f"OUT.{suffix}`"
        ) from e
