"""The ``edge`` command. Heavy imports happen inside each command, so ``edge --help`` needs only numpy.

Device commands are listed in :data:`COMMAND_MODULES`. Host and lab commands (``export``, ``quantize``,
``push``, ``demo``, ``train``, ``bench``) live outside the device package and join through
the ``edge.commands`` entry-point group (pyproject.toml), so this module imports none of them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points

from edge.errors import EdgeError, RegistryError

#: One module per device subcommand, each with ``register(subparsers)``; add a line to add a command.
COMMAND_MODULES = (
    "edge.commands.inspect",
    "edge.commands.update",
    "edge.commands.devices",
    "edge.commands.profile",
    "edge.commands.sign",
    "edge.commands.import_peft",
    "edge.commands.import_onnx",
    "edge.commands.import_tflite",
    "edge.commands.sync",
    "edge.commands.push",
)

ENTRY_POINT_GROUP = "edge.commands"


def _registrars():
    """(name, register) for every device command, then every entry-point command (names unique)."""
    seen: dict[str, str] = {}
    for module in COMMAND_MODULES:
        seen[module.rsplit(".", 1)[1]] = module
        yield importlib.import_module(module).register
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in seen:
            raise RegistryError(f"command {ep.name!r} is registered twice ({seen[ep.name]} and {ep.value})")
        seen[ep.name] = ep.value
        try:
            register = ep.load()
        except ImportError as e:  # a host/lab package this install does not carry
            logging.getLogger("edge.cli").debug("command %s unavailable: %s", ep.name, e)
            continue
        yield register


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line on stderr (exit 2), like every other error of ``edge``.

    ``add_subparsers`` makes every subcommand's parser of this class too (argparse's ``parser_class`` default).
    """

    def error(self, message: str):
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from edge import __version__

    p = _Parser(prog="edge", description="Edge adaptation runtime: fused-mode adapters on device.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the runtime decides")
    p.add_argument("--version", action="version", version=f"edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for register in _registrars():
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error raised on purpose (an :class:`EdgeError`) exits 2 with one line on stderr, and
    so does a file-system error on a path the user gave (an ``OSError`` a command did not turn into an EdgeError;
    ``edge -v`` shows its traceback); Ctrl-C (SIGINT) exits 130 with one line (files are written atomically, so
    none is left half written); a reader that goes away (``edge inspect M | head -1``) ends it quietly (141, as
    SIGPIPE would). Anything else is a bug and shows its traceback."""
    verbose = False
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # a usage error (one line, said), --help or --version: the code, returned
            return e.code if isinstance(e.code, int) else 2
        verbose = args.verbose
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
        return args.func(args)
    except EdgeError as e:
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"edge: error: {text}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when stdout is flushed
        return 141
    except OSError as e:
        if verbose:
            raise
        where = f": {e.filename}" if e.filename else ""
        text = " ".join(f"{e.strerror or e}{where}".split())
        print(f"edge: error: {text} (edge -v shows where)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge: interrupted", file=sys.stderr)
        if argv is None:  # the `edge` command itself (a caller in Python gets 130 back)
            _leave_now(130)
        return 130


def _leave_now(code: int) -> None:
    """Exit at once after Ctrl-C: stop our child processes, flush, and skip the interpreter's teardown.

    A daemon thread may still be inside native code (onnxruntime building or running a session in the background,
    a router refit); tearing the interpreter down under it aborts the process (``terminate called without an
    active exception``, SIGABRT). Every file this project writes is written atomically, so nothing is left half
    written; a temp file of a write cut short is removed by the next write to that path.
    """
    import os
    import signal

    mp = sys.modules.get("multiprocessing")
    if mp is not None:  # e.g. a growth child: stopped, not orphaned
        children = mp.active_children()
        for child in children:
            child.terminate()
        for child in children:
            child.join(5)
    for pid in _child_pids():  # and one whose start was cut short: it would read half its arguments, and say so
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _child_pids() -> list[int]:
    """This process's children, from ``/proc`` (Linux; elsewhere none)."""
    import os

    me, found = os.getpid(), []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == me:
                found.append(int(name))
    return found


if __name__ == "__main__":
    sys.exit(main())
