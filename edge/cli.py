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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge", description="Edge adaptation runtime: fused-mode adapters on device.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the runtime decides")
    sub = p.add_subparsers(dest="command", required=True)
    for register in _registrars():
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error raised on purpose (an :class:`EdgeError`) exits 2 with one line on stderr;
    anything else is a bug and shows its traceback."""
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
        return args.func(args)
    except EdgeError as e:
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"edge: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
