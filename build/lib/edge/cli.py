"""The ``edge`` command. Heavy imports happen inside each command, so ``edge --help`` needs only numpy."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from edge.errors import EdgeError

#: One module per subcommand (see edge/commands/__init__.py); add a line to add a command.
COMMAND_MODULES = (
    "edge.commands.demo",
    "edge.commands.train",
    "edge.commands.bench",
    "edge.commands.inspect",
    "edge.commands.update",
    "edge.commands.devices",
    "edge.commands.profile",
    "edge.commands.sign",
    "edge.commands.import_peft",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge", description="Edge adaptation runtime: fused-mode adapters on device.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the runtime decides")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except EdgeError as e:
        print(f"edge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
