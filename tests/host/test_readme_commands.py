"""The README's command table names only flags its commands accept (the table abridges; it must not invent).

A row's flag that the command's parser does not know (renamed, removed, or a typo) sent users to a usage error;
each row is matched to its (sub)command's parser and every ``--flag`` in its command cell is looked up there.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from edge.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*|-[a-z])(?![\w-])")


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:  # argparse keeps its subcommands only here
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _rows() -> list[str]:
    """Each command cell of the table: the text between the first pair of backticks of a row, one per command
    (``edge keygen KEY.pem` / `edge sign ...`` gives two)."""
    cells = []
    for line in README.read_text().splitlines():
        if line.startswith("| `edge "):
            first = line.split(" | ")[0]
            cells += [c for c in re.findall(r"`(edge [^`]*)`", first)]
    return cells


def _parser_for(cell: str) -> tuple[argparse.ArgumentParser, str]:
    p, words, used = build_parser(complete=True), cell.split()[1:], ["edge"]
    for w in words:
        sub = _subparsers(p)
        if w not in sub:
            break
        p = sub[w]
        used.append(w)
    return p, " ".join(used)


def test_the_table_has_rows():
    assert len(_rows()) >= 25


@pytest.mark.parametrize("cell", _rows())
def test_every_flag_a_row_shows_is_accepted(cell):
    parser, name = _parser_for(cell)
    known = {s for a in parser._actions for s in a.option_strings}
    unknown = [f for f in FLAG.findall(cell) if f not in known]
    assert not unknown, f"README row `{cell}`: {name} does not accept {unknown}"
