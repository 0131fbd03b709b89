"""A path that exists but is the wrong kind is named as what it is, not as missing.

``edge devices --devices-dir PIPE`` said the folder "does not exist"; so did a regular file, a socket or
``/dev/null`` given there, ``edge profile --adapters PIPE`` said the adapters "do not exist or are not regular
files", ``edge push --tuf-dir FILE`` found "no TUF repository", ``edge release init --keys PIPE`` said "File
exists", ``edge sync --adapters FILE`` likewise, and ``--adapters FILE/sub`` told the user to mount a card.
Now each says what the path is and what is expected (:mod:`edge.format.paths`), exit 2, one line.
"""

from __future__ import annotations

import os
import re
import socket

import pytest

from edge.cli import main
from edge.errors import ConfigError, FormatError
from edge.format.io import read_bounded
from edge.format.paths import kind, not_a

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def _fifo(p):
    os.mkfifo(p)


def _file(p):
    p.write_bytes(b"x")


def _socket(p):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    return s


KINDS = {
    "FIFO": (_fifo, "a FIFO (named pipe)"),
    "regular file": (_file, "a regular file"),
    "socket": (_socket, "a socket"),
}


@pytest.fixture(params=sorted(KINDS) + ["/dev/null", "missing"])
def odd(request, tmp_path):
    """(a path that is no folder, the words for what it is, or None when it does not exist)"""
    if request.param == "/dev/null":
        yield "/dev/null", "a character device"
    elif request.param == "missing":
        yield str(tmp_path / "x"), None
    else:
        make, words = KINDS[request.param]
        keep = make(tmp_path / "x")
        yield str(tmp_path / "x"), words
        if keep is not None:
            keep.close()


def _line(argv, capsys) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_devices_dir_says_what_the_path_is(odd, capsys):
    path, words = odd
    line = _line(["devices", "--devices-dir", path], capsys)
    said = "does not exist" if words is None else f"is {words}, not a folder"
    assert line.startswith(f"edge: error: device profile folder {path} {said}; give a folder of NAME.yaml"), line
    assert ("does not exist" in line) == (words is None)


def test_a_device_profile_looked_up_by_name_says_it_too(odd):
    from edge.devices import load_profile

    path, words = odd
    said = f"{path} is {words}, not a folder" if words else f"{path} does not exist"
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_profile("x86-dev", search=[path])


def test_a_profile_path_that_is_no_file_is_named(tmp_path):
    os.mkfifo(tmp_path / "p.yaml")
    from edge.devices import load_profile

    with pytest.raises(ConfigError, match=r"p.yaml is a FIFO \(named pipe\), not a regular file"):
        load_profile(tmp_path / "p.yaml")
    with pytest.raises(ConfigError, match="/dev/null is a character device, not a regular file"):
        load_profile("/dev/null")
    with pytest.raises(ConfigError, match="q.yaml does not exist"):
        load_profile(tmp_path / "q.yaml")


def test_profile_adapters_and_model_say_what_they_are(tmp_path, capsys):
    os.mkfifo(tmp_path / "a.safetensors")
    (tmp_path / "m.onnx").write_bytes(b"\x08")
    line = _line(
        ["profile", str(tmp_path / "m.onnx"), "--device", "x86-dev", "--adapters", f"{tmp_path}/a.safetensors"], capsys
    )
    assert "adapter file" in line and "a.safetensors is a FIFO (named pipe), not a regular file" in line
    line = _line(["profile", "/dev/null", "--device", "x86-dev"], capsys)
    assert "model file /dev/null is a character device, not a regular file" in line


def test_a_read_refusal_names_the_kind(tmp_path):
    os.mkfifo(tmp_path / "f")
    for path, words in ((tmp_path / "f", r"a FIFO \(named pipe\)"), ("/dev/null", "a character device")):
        with pytest.raises(FormatError, match=f"it is {words}, not a regular file; give a regular file"):
            read_bounded(path, 10)


def test_a_peft_path_that_is_no_folder_is_named(tmp_path):
    from edge.convert.peft import read_peft

    os.mkfifo(tmp_path / "f")
    with pytest.raises(FormatError, match=r"is a FIFO \(named pipe\), not a PEFT adapter folder"):
        read_peft(tmp_path / "f")
    with pytest.raises(FormatError, match="nope does not exist: give the folder holding adapter_config.json"):
        read_peft(tmp_path / "nope")


def test_sync_folders_in_the_way_are_named(tmp_path):
    from edge.fleet.device_state import prepare_folders

    os.mkfifo(tmp_path / "f")
    (tmp_path / "r").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"cannot use \S+/f as a sync folder: it is a FIFO \(named pipe\), not a"):
        prepare_folders(tmp_path / "f", tmp_path / "cache", False)
    with pytest.raises(ConfigError, match=r"r is a regular file, not a folder, so \S+/sub cannot be made in it"):
        prepare_folders(tmp_path / "r" / "sub", tmp_path / "cache", False)
    with pytest.raises(ConfigError, match="does not exist, so .* is the card or disk mounted"):
        prepare_folders(tmp_path / "gone" / "sub", tmp_path / "cache", False)
    assert not (tmp_path / "cache").exists()  # all checked before anything is made


def test_tuf_folders_in_the_way_are_named(tmp_path):
    pytest.importorskip("tuf")
    from edge.fleet.tufrepo import TufRepo

    os.mkfifo(tmp_path / "f")
    (tmp_path / "keys").mkdir()
    with pytest.raises(ConfigError, match=r"--tuf-dir folder \S+/f is a FIFO \(named pipe\), not a folder"):
        TufRepo.load(tmp_path / "f", tmp_path / "keys")
    with pytest.raises(ConfigError, match=r"--keys folder \S+/f is a FIFO \(named pipe\), not a folder"):
        TufRepo.create(tmp_path / "tuf", tmp_path / "f")
    assert not (tmp_path / "tuf").exists()
    with pytest.raises(ConfigError, match="no TUF repository in"):  # a missing one: made by `edge release init`
        TufRepo.load(tmp_path / "none", tmp_path / "keys")


def test_kind_words(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    assert kind(tmp_path) == "a folder" and kind(tmp_path / "file") == "a regular file"
    assert kind(tmp_path / "dangling") == "a broken symbolic link"
    assert kind(tmp_path / "none") is None and kind(tmp_path / "file" / "below") is None
    assert not_a(tmp_path / "file", "a folder") == "is a regular file, not a folder"
    assert not_a(tmp_path / "none", "a folder") == "does not exist"


def test_a_state_dict_path_that_is_no_file_or_folder_is_named(tmp_path):
    from edge.convert.onnx_import import read_state_dict

    os.mkfifo(tmp_path / "f")
    with pytest.raises(FormatError, match=r"f is a FIFO \(named pipe\), not a .safetensors file or a Hugging Face"):
        read_state_dict(tmp_path / "f")
    with pytest.raises(FormatError, match="/dev/null is a character device, not a .safetensors file"):
        read_state_dict("/dev/null")
