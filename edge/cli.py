"""The ``edge`` command. Heavy imports happen inside each command, so ``edge --help`` needs only the standard library.

Device commands are listed in :data:`COMMAND_MODULES`. Host and lab commands (``export``, ``quantize``,
``demo``, ``train``, ``bench``) live outside the device package and join through
the ``edge.commands`` entry-point group (pyproject.toml), so this module imports none of them. A run that names a
device command (``edge sync ...``, the cron case) or only asks for the version reads no entry points at all: on a
device every import is start-up time (:func:`build_parser`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

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


#: the only top-level options; none takes a value, so the first other word of argv names the command
_TOP_FLAGS = ("-v", "--verbose")


def _device_only(argv: Sequence[str], device_commands) -> bool:
    """Whether parsing ``argv`` needs no host or lab command: argv names a device command after the top-level flags,
    asks for the version first, or names no command at all (argparse then says one is required). ``--help``, an
    abbreviated flag or an unknown word need every command (the help lists them, the error names them)."""
    for word in argv:
        if word == "--version":  # argparse prints it and exits before any command is looked at
            return True
        if word not in _TOP_FLAGS:
            return word in device_commands
    return True


def _add_device_commands(sub) -> dict[str, str]:
    """Register every device command; return command name -> the module that registered it."""
    owners: dict[str, str] = {}
    for module in COMMAND_MODULES:
        before = set(sub.choices)
        importlib.import_module(module).register(sub)
        owners.update(dict.fromkeys(set(sub.choices) - before, module))
    return owners


def _add_entry_point_commands(sub, owners: dict[str, str]) -> None:
    """Register every ``edge.commands`` entry point (host and lab commands), refusing a name already taken."""
    from importlib.metadata import entry_points  # ~100 ms of imports on a loaded device: only when needed

    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in sub.choices:
            raise RegistryError(
                f"command {ep.name!r} is registered twice ({owners.get(ep.name, 'edge')} and {ep.value}): "
                f"rename the entry point in group {ENTRY_POINT_GROUP!r}"
            )
        try:
            register = ep.load()
        except ImportError as e:  # a host/lab package this install does not carry
            logging.getLogger("edge.cli").debug("command %s unavailable: %s", ep.name, e)
            continue
        before = set(sub.choices)
        register(sub)
        owners.update(dict.fromkeys(set(sub.choices) - before, ep.value))


def one_line(text: str, *, exact: bool = False) -> str:
    """An error message as the one line ``edge`` prints. Line breaks and tabs, with the spaces around them, become
    one space (library messages wrapped into ours, a YAML parser's or onnx's, are written over several lines); every
    other control character (an escape sequence, a line or paragraph separator, a bidi override) and spaces other
    than the plain one are escaped as Python's ``repr`` escapes them (``\\x1b``, ``\\u2028``), so the line stays one
    line and a terminal runs nothing. ``exact``: line breaks and tabs escaped too (``\\n``, ``\\t``), for a text
    that is one path (an OSError's file name). When anything is escaped, backslashes are doubled too (a file named
    ``a\\nb`` then differs from one with a newline in its name)."""
    if not exact:
        text = _BREAKS.sub(" ", text)
    if text.isprintable():  # the usual message: printed as it is (isprintable: no control character, only ' ')
        return text
    return "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in text)


_BREAKS = re.compile(r"[ ]*[\r\n\t]+[ \r\n\t]*")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line on stderr (exit 2), like every other error of ``edge``; and
    its arguments may be added when it is first used (``deferred``), so a command whose flags come from heavy
    modules (``edge bench``: one per benchmark) imports them only when it is parsed or its help is shown.

    Every subcommand's parser is of this class (:class:`_Edge` says so; below it, argparse's ``parser_class``
    default), so a command's ``register(sub)`` may pass ``sub.add_parser(name, help=..., deferred=fill)``;
    ``fill(parser)`` adds the arguments. ``build_parser(complete=True)`` fills every parser at once (tests walk them).
    """

    def __init__(self, *args, deferred: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._deferred = deferred

    def complete(self) -> None:
        """Add the deferred arguments now (once)."""
        fill, self._deferred = self._deferred, None
        if fill is not None:
            fill(self)

    def parse_known_args(self, args=None, namespace=None):  # argparse parses a chosen subcommand through this
        self.complete()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.complete()
        return super().format_help()

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class _Edge(_Parser):
    """The top-level parser: device commands registered when it is built; host and lab commands (entry points) join
    when a parse needs them (:func:`_device_only`) or the help lists them."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._sub = self.add_subparsers(dest="command", required=True, parser_class=_Parser)
        self._owners = _add_device_commands(self._sub)
        self._joined = False

    def join_entry_points(self) -> None:
        if not self._joined:
            self._joined = True
            _add_entry_point_commands(self._sub, self._owners)

    def parse_known_args(self, args=None, namespace=None):
        words = sys.argv[1:] if args is None else list(args)
        if not _device_only(words, self._owners):
            self.join_entry_points()
        return super().parse_known_args(words, namespace)

    def format_help(self) -> str:
        self.join_entry_points()
        return super().format_help()


def build_parser(complete: bool = False) -> argparse.ArgumentParser:
    """The ``edge`` parser, built for a run: it imports what parsing the words it is given needs. Device commands
    (small modules, standard library only at import) always; host and lab commands (entry points) unless
    :func:`_device_only` says the words need none; a command's deferred arguments when its parser is used. So
    ``edge sync ...`` imports no lab or exporter module and not :mod:`importlib.metadata`.

    The price: an entry point that reuses a device command's name is reported (:class:`RegistryError`) by every run
    that reads entry points (``edge --help``, any host or lab command), not by a run of that device command.
    ``complete=True`` builds everything at once (tests walk every parser).
    """
    from edge import __version__

    p = _Edge(prog="edge", description="Edge adaptation runtime: fused-mode adapters on device.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the runtime decides")
    p.add_argument("--version", action="version", version=f"edge {__version__}")
    if complete:
        p.join_entry_points()
        _complete_all(p)
    return p


def _complete_all(parser: argparse.ArgumentParser) -> None:
    if isinstance(parser, _Parser):
        parser.complete()
    for action in parser._actions:  # argparse keeps subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # an alias maps to the same parser
                _complete_all(child)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error raised on purpose (an :class:`EdgeError`) exits 2 with one line on stderr, and
    so does a file-system error on a path the user gave (an ``OSError`` a command did not turn into an EdgeError;
    ``edge -v`` shows its traceback); Ctrl-C (SIGINT) exits 130 with one line (files are written atomically, so
    none is left half written); a reader that goes away (``edge inspect M | head -1``) ends it quietly (141, as
    SIGPIPE would). Anything else is a bug and shows its traceback."""
    verbose, seen = False, _SigintSeen(install=argv is None)
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # a usage error (one line, said), --help or --version: the code, returned
            return e.code if isinstance(e.code, int) else 2
        verbose = args.verbose
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
        return args.func(args)
    except EdgeError as e:
        if seen.is_set():  # what Ctrl-C left behind (a native import it cut short reads as "not installed")
            return _interrupted(argv)
        print(f"edge: error: {one_line(str(e)) or type(e).__name__}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when stdout is flushed
        return 141
    except OSError as e:
        if seen.is_set():
            return _interrupted(argv)
        if verbose:
            raise
        where = f": {one_line(os.fsdecode(e.filename), exact=True)}" if e.filename else ""
        print(f"edge: error: {one_line(str(e.strerror or e))}{where} (edge -v shows where)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(argv)
    finally:
        seen.restore()


def _interrupted(argv) -> int:
    print("edge: interrupted", file=sys.stderr)
    if argv is None:  # the `edge` command itself (a caller in Python gets 130 back)
        _leave_now(130)
    return 130


class _SigintSeen:
    """Whether Ctrl-C came during this run, whatever it became: pybind11 turns a KeyboardInterrupt raised while a
    native module initialises (onnxruntime, mid-import) into an ``ImportError``, which a check for an optional
    engine reads as "not installed". Installed for the ``edge`` command itself (not a caller of :func:`main` in
    Python), on the main thread, only over Python's default handler (SIGINT ignored stays ignored); put back after."""

    def __init__(self, install: bool) -> None:
        import signal
        import threading

        self._signal, self._seen = signal, False
        main_thread = threading.current_thread() is threading.main_thread()
        self._installed = install and main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if self._installed:
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self._seen = True
        raise KeyboardInterrupt

    def is_set(self) -> bool:
        return self._seen

    def restore(self) -> None:
        if self._installed:
            self._signal.signal(self._signal.SIGINT, self._signal.default_int_handler)


def _leave_now(code: int) -> None:
    """Exit at once after Ctrl-C: stop our child processes, flush, and skip the interpreter's teardown.

    A daemon thread may still be inside native code (onnxruntime building or running a session in the background,
    a router refit); tearing the interpreter down under it aborts the process (``terminate called without an
    active exception``, SIGABRT). Every file this project writes is written atomically, so nothing is left half
    written; a temp file of a write cut short is removed by the next write to that path.
    """
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
