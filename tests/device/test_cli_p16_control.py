"""A control character in a path shows in the one-line CLI error, escaped as Python's repr escapes it.

The error line was made one line by joining every whitespace run with a space, so a path with a newline
(``a\\nb``) printed as ``a b``, a tab likewise, and two spaces as one: the user could not tell which file was meant,
and an escape sequence in a file name reached the terminal. :func:`edge.cli.one_line` now escapes control
characters (and every space but the plain one), in the three places the CLI prints an error.
"""

from __future__ import annotations

import os

import pytest

from edge.cli import main, one_line


@pytest.mark.parametrize(
    "given, shown",
    [
        ("plain  message: two spaces kept", "plain  message: two spaces kept"),
        ("C:\\plain\\path", "C:\\plain\\path"),  # nothing escaped: backslashes as they are
        ("a\nb", "a b"),  # a library's message over several lines (YAML, onnx) reads as one
        ("while parsing\n  in line 3\n\texpected", "while parsing in line 3 expected"),
        ("tab\there", "tab here"),
        ("red \x1b[31m", "red \\x1b[31m"),
        ("line\u2028sep", "line\\u2028sep"),
        ("nb\xa0sp", "nb\\xa0sp"),
        ("rtl\u202eoverride", "rtl\\u202eoverride"),
        ("\udcff.onnx", "\\udcff.onnx"),  # an undecodable byte of a file name (surrogateescape)
        ("a\\nb and a\x1bb", "a\\\\nb and a\\x1bb"),  # escaped: a literal backslash-n differs from a control
    ],
)
def test_one_line_escapes_what_would_hide_or_break_the_line(given, shown):
    assert one_line(given) == shown
    assert len(one_line(given).splitlines()) == 1


def test_one_line_exact_shows_a_newline_or_tab_of_a_file_name():
    assert one_line("a\nb", exact=True) == "a\\nb" and one_line("t\tq", exact=True) == "t\\tq"
    assert one_line("a\\nb and a\nb", exact=True) == "a\\\\nb and a\\nb"


def _err(argv, capsys) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.endswith("\n") and err.count("\n") == 1, err
    return err


def test_an_edge_error_keeps_one_line_with_a_newline_in_a_path(tmp_path, capsys):
    err = _err(["devices", "--devices-dir", str(tmp_path / "a\nb")], capsys)  # shown as a space (README)
    assert f"device profile folder {tmp_path}/a b does not exist;" in err


def test_a_multiline_library_message_reads_as_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("name: bad\nbackends:\n  - backend: onnxruntime\n  ? x\n")
    err = _err(["devices", "--devices-dir", str(tmp_path)], capsys)
    assert "\\n" not in err and "  " not in err.split("error: ", 1)[1], err


def test_a_usage_error_shows_it_too(tmp_path, capsys):
    os.mkfifo(tmp_path / "s\tq")
    err = _err(["update", "--model", "m.onnx", "--data", "d", "--state", str(tmp_path / "s\tq")], capsys)
    assert err.startswith("edge update: error: argument --state: cannot write") and "/s q:" in err


def test_an_os_error_shows_it_too(tmp_path, capsys, monkeypatch):
    import edge.commands.devices as devices

    def fail(args):
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "x\ny"))

    monkeypatch.setattr(devices, "run", fail)
    err = _err(["devices"], capsys)
    assert err == f"edge: error: No such file or directory: {tmp_path}/x\\ny (edge -v shows where)\n"
