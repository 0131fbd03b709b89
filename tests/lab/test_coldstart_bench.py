"""`edge bench`'s subcommands are added when `edge bench ...` is parsed (its modules are heavy): that path parses."""

from __future__ import annotations

import sys

import pytest

from edge.cli import build_parser, main

pytest.importorskip("lab")
from lab.commands.bench import BENCHES  # noqa: E402


def test_a_bench_parses_through_the_parser_built_for_the_run():
    args = build_parser().parse_args(["bench", "fleet", "--adapters", "3", "--json", "out.json"])
    assert (args.command, args.bench, args.adapters) == ("bench", "fleet", 3)
    assert args.func is sys.modules["lab.bench_fleet"].cli


def test_bench_help_lists_every_benchmark_and_a_wrong_name_is_one_line(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"    {name} " in out for name in BENCHES), out
    assert main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "invalid choice: 'nope'" in err and "fleet" in err
