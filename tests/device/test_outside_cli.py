"""Outside audit of the ``edge`` command as a whole (helper C): usage errors, output paths, Ctrl-C, kill -9, races.

What an outside checker does to a CLI: wrong and missing arguments (one line on stderr, exit 2, never a usage
block), output paths that cannot be written (refused before the work, not after it), a FIFO or device node
given as an output (refused, never replaced: ``edge keygen /dev/null`` as root used to replace the device),
``keygen`` over an existing key (the old private key was lost), Ctrl-C (exit 130, one line, no partial
file), ``kill -9`` in the middle of a write (the old file or the new one, temp files cleaned on the next
write), and two processes updating one state at once (both updates kept).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from _tiny import make_mlp
from test_update import blobs, make_encoder

from edge.cli import main
from edge.errors import ConfigError, WriteError
from edge.format.io import atomic_write_bytes, check_writable
from edge.format.state import load_state, state_lock

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _edge(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edge.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=ENV,
        **kw,
    )


def _interruptible() -> None:
    """In the child: SIGINT as a terminal delivers it. A job started in the background by a non-interactive shell
    (`nohup make test &`, some CI runners) inherits SIGINT ignored, and an ignored SIGINT stays ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


USAGE = [
    ([], "the following arguments are required: command"),
    (["nope"], "invalid choice: 'nope'"),
    (["inspect"], "the following arguments are required: file"),
    (["update", "--model", "m.onnx", "--data", "d.npz", "--threads", "abc"], "--threads: not an integer: 'abc'"),
    (["update", "--model", "m.onnx", "--data", "d.npz", "--threads", "-1"], "--threads"),
    (["update", "--model", "m.onnx", "--data", "d.npz", "--memory-mb", "abc"], "--memory-mb: invalid float"),
    (["profile", "m.onnx", "--device", "x86-dev", "--runs", "1.5"], "--runs: invalid int value: '1.5'"),
    (["profile", "m.onnx", "--device", "x86-dev", "--batch", ""], "--batch: invalid int value: ''"),
    (["profile", "m.onnx"], "the following arguments are required: --device"),
    (["sign", "--key", "k.pem"], "the following arguments are required: files"),
    (["import-onnx", "a.onnx", "--out", "b.onnx", "--hf", "d", "--state-dict", "s"], "not allowed with argument"),
    (["sync", "--adapters", "a"], "one of the arguments --model --fingerprint is required"),
]


@pytest.mark.parametrize("argv,words", USAGE, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_usage_error_is_one_line_naming_the_flag_and_exit_2(argv, words, capsys):
    assert main(argv) == 2  # returned, as every other error of main() is (the `edge` command exits with it)
    out, err = capsys.readouterr()
    line = _one_error_line(err)
    assert out == "" and line.startswith("edge") and ": error: " in line and words in line, line
    assert line.endswith("--help)"), line  # says where the usage is, instead of printing it


def test_version_prints_and_exits_0(capsys):
    from edge import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"edge {__version__}"


def test_a_fifo_given_as_an_output_is_refused_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    for write in (lambda: atomic_write_bytes(fifo, b"x"), lambda: check_writable(fifo)):
        with pytest.raises(WriteError, match=r"out.json: is not a regular file \(a FIFO, device or socket\)"):
            write()
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_a_device_node_given_as_an_output_is_not_replaced(tmp_path, capsys):
    """As root, ``edge keygen /dev/null`` renamed a key over the device (the atomic write replaced the node)."""
    null = tmp_path / "f.bin.sig"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (tmp_path / "f.bin").write_bytes(b"signed bytes")
    assert main(["keygen", str(tmp_path / "k.pem")]) == 0
    capsys.readouterr()
    assert main(["sign", str(tmp_path / "f.bin"), "--key", str(tmp_path / "k.pem")]) == 2
    assert "f.bin.sig: is not a regular file" in _one_error_line(capsys.readouterr().err)
    assert stat.S_ISCHR(os.lstat(null).st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_keygen_never_overwrites_a_key_and_writes_it_private_from_the_first_byte(tmp_path, capsys, monkeypatch):
    key = tmp_path / "k.pem"
    modes = []
    real_replace = os.replace

    def replace(src, dst):  # the temp file's mode when it becomes the key
        modes.append((Path(dst).name, stat.S_IMODE(os.stat(src).st_mode)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert main(["keygen", str(key)]) == 0
    assert modes == [("k.pem", 0o600), ("k.pub", 0o644)]
    capsys.readouterr()
    pem = key.read_bytes()
    (tmp_path / "k.pub").rename(tmp_path / "kept.pub")
    assert main(["keygen", str(key)]) == 2  # the private key alone (a keygen killed before its .pub)
    assert f"{key} exists; keygen never overwrites a key" in _one_error_line(capsys.readouterr().err)
    assert key.read_bytes() == pem and not (tmp_path / "k.pub").exists()
    key.rename(tmp_path / "kept.pem")
    (tmp_path / "kept.pub").rename(tmp_path / "k.pub")
    assert main(["keygen", str(key)]) == 2  # the public key alone: devices may trust it
    assert f"{tmp_path / 'k.pub'} exists; keygen never" in _one_error_line(capsys.readouterr().err)
    assert not key.exists()
    assert main(["keygen", ""]) == 2  # an empty path names no file (it was a ValueError traceback)
    assert "names no file" in _one_error_line(capsys.readouterr().err)
    with pytest.raises(ConfigError, match="the public key would overwrite the private key"):
        from edge.format.signing import generate_key

        generate_key(tmp_path / "only.pub")
    assert not (tmp_path / "only.pub").exists()


def test_an_output_that_cannot_be_written_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    import edge.profiling

    def work(*a, **k):
        raise AssertionError("profiled before the output was checked")

    monkeypatch.setattr(edge.profiling, "profile_model", work)  # refused at parse time, not after the runs
    model = tmp_path / "m.onnx"
    make_mlp(model)
    (tmp_path / "file").write_bytes(b"keep")
    for bad in ["/proc/edge-nope/out.json", str(tmp_path), str(tmp_path / "file" / "x.json")]:
        assert main(["profile", str(model), "--device", "x86-dev", "--json", bad, "-q"]) == 2
        assert "argument --json: cannot write" in _one_error_line(capsys.readouterr().err)
    assert (tmp_path / "file").read_bytes() == b"keep"
    assert check_writable(tmp_path / "new" / "dir" / "x.json") and not (tmp_path / "new").exists()


@pytest.mark.parametrize("flag", ["--runs", "--warmup", "--switches", "--engine-rounds"])
def test_an_absurd_count_is_refused_not_run_for_ever(tmp_path, capsys, flag):
    model = tmp_path / "m.onnx"
    make_mlp(model)
    assert main(["profile", str(model), "--device", "x86-dev", flag, str(10**20), "-q"]) == 2
    assert f"{flag} must be at most" in _one_error_line(capsys.readouterr().err)


def test_an_import_never_writes_over_its_input(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    make_mlp(model)
    before = model.read_bytes()
    assert main(["import-onnx", str(model), "--out", str(tmp_path / "." / "m.onnx")]) == 2
    assert "is the input" in _one_error_line(capsys.readouterr().err)
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    assert main(["import-peft", str(peft), "--base", str(model), "--out", str(model)]) == 2
    assert "is the input" in _one_error_line(capsys.readouterr().err)
    assert model.read_bytes() == before


def test_a_state_lock_that_cannot_be_made_fails_at_once_not_after_ten_minutes(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    for where in ("/proc/edge-nope/s.safetensors", tmp_path / "file" / "s.safetensors"):
        # a WriteError naming the lock, not filelock's retries ending in "locked by another update" (ConfigError)
        with pytest.raises(WriteError, match=r"cannot write the lock .*s.safetensors.lock"), state_lock(where, 3.0):
            pass


@pytest.fixture
def encoder_and_data(tmp_path):
    model = tmp_path / "enc.onnx"
    make_encoder(model)
    x, y = blobs(20, seed=1)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    return model, tmp_path / "d.npz"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="waits for the command by reading /proc/PID/maps")
def test_ctrl_c_exits_130_with_one_line_and_leaves_no_file(tmp_path):
    model = tmp_path / "m.onnx"
    make_mlp(model)
    out = tmp_path / "p.json"
    argv = ("profile", str(model), "--device", "x86-dev", "--runs", str(10**6), "-q", "--json", str(out))
    p = _edge(*argv, preexec_fn=_interruptible)
    deadline = time.monotonic() + 300  # a loaded machine can take a minute to import onnxruntime
    while p.poll() is None and time.monotonic() < deadline:  # running: onnxruntime is loaded (main() has begun)
        if "onnxruntime_pybind11_state" in Path(f"/proc/{p.pid}/maps").read_text():
            break
        time.sleep(0.05)
    time.sleep(0.3)
    assert p.poll() is None, "the profile ended before it could be interrupted"
    while p.poll() is None and time.monotonic() < deadline:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(1.0)
        except subprocess.TimeoutExpired:
            pass
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and _one_error_line(err) == "edge: interrupted", (p.returncode, err)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.onnx"]


def test_kill_9_mid_write_leaves_old_or_new_state_and_the_next_write_clears_temps(encoder_and_data):
    model, data = encoder_and_data
    state = model.parent / "s.safetensors"
    argv = ["update", "--model", str(model), "--data", str(data), "--state", str(state), "--method", "ncm", "-q"]
    first = _edge(*argv)
    assert first.wait(60) == 0, first.communicate()[1]
    first.stdout.close(), first.stderr.close()
    n = int(load_state(state).meta["samples_seen"])
    seen, killed_mid_write = {n}, 0
    for _ in range(4):  # kill -9 the moment its temp file shows up: mid-write
        p = _edge(*argv)
        while p.poll() is None and not any(n.startswith(".s.safetensors.") for n in os.listdir(model.parent)):
            time.sleep(0.0005)
        if p.poll() is None:
            p.kill()
            killed_mid_write += 1
        p.wait(30)
        p.stdout.close(), p.stderr.close()
        seen.add(int(load_state(state).meta["samples_seen"]))  # loads: old or new, never partial
    assert killed_mid_write >= 2, "no kill landed mid-write; the test proved nothing"
    assert seen <= {n * k for k in range(1, 6)}
    last = _edge(*argv)
    assert last.wait(60) == 0
    last.stdout.close(), last.stderr.close()
    assert [n for n in os.listdir(model.parent) if n.endswith(".tmp")] == []


def test_two_updates_of_one_state_at_once_keep_both(encoder_and_data):
    model, data = encoder_and_data
    state = model.parent / "s.safetensors"
    argv = ["update", "--model", str(model), "--data", str(data), "--state", str(state), "--method", "slda", "-q"]
    procs = [_edge(*argv) for _ in range(2)]
    outs = [p.communicate(timeout=90) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    n = len(np.load(data)["y"])
    assert sorted(json.loads(o)["samples_seen"] for o, _ in outs) == [n, 2 * n]
    assert load_state(state).meta["samples_seen"] == 2 * n


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the command finds its children in /proc")
def test_ctrl_c_stops_the_commands_child_processes(tmp_path):
    """A child whose start Ctrl-C cut short is not yet listed by multiprocessing; it is stopped too, not orphaned
    (a growth child left reading half its arguments printed a traceback after ``edge: interrupted``)."""
    code = (
        "import subprocess, sys, edge.cli as cli\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        "print(child.pid, flush=True)\n"
        "def interrupted():\n"
        "    raise KeyboardInterrupt\n"
        "cli.build_parser = interrupted\n"
        "sys.exit(cli.main())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=60)
    assert r.returncode == 130 and _one_error_line(r.stderr) == "edge: interrupted", r
    pid = int(r.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # gone, or a zombie waiting for its new parent to reap it
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"the command's child {pid} outlived it")


def test_ctrl_c_while_onnxruntime_initialises_is_an_interrupt_not_a_missing_engine(tmp_path):
    """pybind11 turns a KeyboardInterrupt raised while a native module initialises into an ImportError, which the
    engine check reads as "not installed" (seen under load: exit 2, "onnxruntime: not installed"). The ``edge``
    command remembers the Ctrl-C and exits 130 whatever it became. Here the import is made to fail as pybind11's
    does, right after a real SIGINT."""
    model = tmp_path / "m.onnx"
    make_mlp(model)
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        class CutShort:  # `import onnxruntime` interrupted mid-initialisation, as pybind11 reports it
            def find_spec(self, name, path=None, target=None):
                if name != "onnxruntime":
                    return None
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(5)
                except KeyboardInterrupt as e:
                    raise ImportError("initialization failed") from e
                raise AssertionError("no KeyboardInterrupt")
        sys.meta_path.insert(0, CutShort())
        sys.argv = ["edge", "profile", {str(model)!r}, "--device", "x86-dev", "--backend", "onnxruntime", "-q"]
        from edge.cli import main
        sys.exit(main())
        """
    )
    p = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=120,
        preexec_fn=_interruptible,
    )
    assert p.returncode == 130 and _one_error_line(p.stderr) == "edge: interrupted", (p.returncode, p.stderr)
