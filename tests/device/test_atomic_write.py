"""``atomic_write_bytes``: a write the system refuses is a typed error naming the path, and leaves what was there."""

from __future__ import annotations

import os

import pytest

from edge.cli import main
from edge.errors import EdgeError, WriteError
from edge.format.io import atomic_write_bytes


def test_a_folder_in_the_way_is_a_write_error_and_stays_a_folder(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(WriteError, match=r"cannot write .*out: is a folder; give a file path in a writable folder"):
        atomic_write_bytes(tmp_path / "out", b"x")
    assert (tmp_path / "out").is_dir() and not list((tmp_path / "out").iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_file_where_the_folder_should_be_is_a_write_error(tmp_path):
    (tmp_path / "f").write_bytes(b"keep")
    with pytest.raises(WriteError, match="cannot write"):
        atomic_write_bytes(tmp_path / "f" / "x.json", b"x")
    assert (tmp_path / "f").read_bytes() == b"keep"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_folder_is_a_write_error(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(WriteError, match="cannot write"):
        atomic_write_bytes(tmp_path / "ro" / "x.json", b"x")


def test_it_is_still_an_oserror_for_callers_that_catch_one(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "out", b"x")
    assert issubclass(WriteError, EdgeError)


def test_the_cli_exits_2_with_one_line_when_json_goes_to_a_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["keygen", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edge: error: ") and "out" in err[0], err
