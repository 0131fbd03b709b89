"""Callers from outside, careless or hostile, against a model exported for both backends with three SHiRA adapters
each and a tapped detector head, as ``edge demo`` leaves the digits ViT (built in-session: ``_insession.mlp_kit``).

What a caller holds (arrays it passed in, arrays it got back) never reaches the weights; only an adapter the
signature policy admits does. Threads running, switching, loading, unloading and closing at random never crash,
never mix two states in one output and never deadlock; after ``close`` every call raises. Two processes writing
one file (an adapter, an engine choice) while a third reads it: every read is one writer's whole file.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge.errors import AdapterMismatchError, ConfigError, RuntimeClosedError, SignatureError
from edge.format.adapter import load_adapter as read_adapter
from edge.format.signing import SignaturePolicy, generate_key, sign_file
from edge.runtime import Runtime
from runtimes import get_backend

NAMES = ("rotate", "noise", "blur")
BACKENDS = ["onnxruntime", "tflite"]
FEED: dict[str, np.ndarray] = {}  # the kit's batch (set by the autouse fixture below)


@pytest.fixture(autouse=True)
def kit(mlp_kit):
    FEED.clear()
    FEED.update(mlp_kit.feed)
    return mlp_kit


def _files(kit, backend: str) -> tuple[Path, dict[str, Path]]:
    return kit.models[backend], dict(kit.adapters[backend])


def _out(rt: Runtime) -> np.ndarray:
    name = rt.backend.output_names[0]
    return rt.run(FEED, outputs=[name])[name]


def _settled(rt: Runtime, state) -> np.ndarray:
    rt.switch(state)
    assert rt.wait_settled(30)
    return _out(rt)


# -- 1. weight integrity ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_signed_adapter_cannot_be_changed_through_what_the_runtime_hands_back(kit, backend, tmp_path):
    model, files = _files(kit, backend)
    generate_key(tmp_path / "k.pem")
    signed = {}
    for n in ("rotate", "noise"):
        signed[n] = tmp_path / files[n].name
        signed[n].write_bytes(files[n].read_bytes())
        sign_file(signed[n], tmp_path / "k.pem")
    with Runtime(model, backend=backend, trusted_keys=[tmp_path / "k.pub"]) as rt:
        base = _out(rt)
        rt.load_adapter(signed["rotate"], "a")
        rt.load_adapter(signed["noise"], "b")
        refs = {"a": _settled(rt, "a"), "mix": _settled(rt, {"a": 0.5, "b": 0.5}), None: _settled(rt, None)}
        np.testing.assert_array_equal(refs[None], base)
        for name in ("a", "b"):
            for d in rt.adapter(name).tensors.values():
                with pytest.raises(ValueError, match="read-only"):
                    d.values[...] = 1e3
                # a caller who forces them writable changes its own copy, never what a switch writes
                for arr in (d.values, d.indices):
                    arr.flags.writeable = True
                d.values[...] = 1e3
                d.indices[...] = 0
        w = rt.weights(next(iter(rt.info.tensors)))
        w[...] = 0  # a copy
        out = rt.run(FEED)
        for v in out.values():
            v[...] = np.nan  # not a view of anything the runtime keeps
        rt.switch(None)
        assert np.array_equal(_settled(rt, "a"), refs["a"])
        assert np.array_equal(_settled(rt, {"a": 0.5, "b": 0.5}), refs["mix"])
        assert np.array_equal(_settled(rt, None), base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_feed_changed_by_another_thread_during_runs_changes_no_weight(kit, backend):
    model, files = _files(kit, backend)
    with Runtime(model, backend=backend) as rt:
        rt.load_adapter(files["rotate"], "a")
        ref = _settled(rt, "a")
        feed = next(iter(FEED.values())).copy()
        stop = threading.Event()

        def scribble() -> None:
            rng = np.random.default_rng(5)
            while not stop.is_set():
                feed[...] = rng.standard_normal(feed.shape, np.float32) * 1e30

        t = threading.Thread(target=scribble, daemon=True)
        t.start()
        try:
            for _ in range(300):
                rt.run({k: feed for k in FEED})  # whatever it computes, from whatever the feed held
        finally:
            stop.set()
            t.join(20)
        assert np.array_equal(_out(rt), ref)
        rt.switch(None)
        assert np.array_equal(_settled(rt, "a"), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_in_memory_adapter_changed_after_load_changes_nothing(kit, backend):
    model, files = _files(kit, backend)
    a, b = read_adapter(files["rotate"]), read_adapter(files["noise"])
    with Runtime(model, backend=backend) as rt:
        rt.load_adapter(a, "a")
        rt.load_adapter(b, "b")
        refs = {"a": _settled(rt, "a"), "mix": _settled(rt, {"a": 0.5, "b": 0.5})}
        rt.switch(None)
        for adapter in (a, b):  # the caller's own objects: still writable, and none of the runtime's business
            for d in adapter.tensors.values():
                d.values[...] *= 50
        assert np.array_equal(_settled(rt, {"a": 0.5, "b": 0.5}), refs["mix"])
        assert np.array_equal(_settled(rt, "a"), refs["a"])
        assert rt.adapter("a") is not a


@pytest.mark.parametrize("damage", ["out of range", "duplicated"])
def test_an_adapter_changed_after_it_was_built_is_validated_again_at_load(kit, damage):
    model, files = _files(kit, "tflite")
    a = read_adapter(files["rotate"])  # validated when built ...
    d = next(iter(a.tensors.values()))
    if damage == "out of range":  # ... then changed by its holder (or by another thread during load_adapter)
        d.indices[0, 0] = 10**6
    else:
        d.indices[:, 1] = d.indices[:, 0]
    with Runtime(model) as rt:
        before = _out(rt)
        with pytest.raises(AdapterMismatchError, match=damage.split()[0]):
            rt.load_adapter(a, "a")
        assert rt.adapters == []
        assert np.array_equal(_out(rt), before)


@pytest.mark.parametrize(
    "value,match",
    [
        ("abc", "has shape"),
        ([[1.0, 2.0], [3.0]], "not an array of numbers"),
        ({"x": 1}, "has shape"),
        (np.zeros((3, 3), np.float32), "has shape"),
        ("nan", "non-finite"),
        ("objects", "not an array of numbers"),
    ],
)
def test_hostile_heads_are_refused_and_change_nothing(kit, value, match):
    with Runtime(kit.head_model) as rt:
        head = rt.heads[0]
        shape = tuple(rt.info.tensors[head].shape)
        if isinstance(value, str) and value == "nan":
            value = np.full(shape, np.nan, np.float32)
        elif isinstance(value, str) and value == "objects":
            value = np.full(shape, object(), dtype=object)
        before = rt.weights(head)
        with pytest.raises(ConfigError, match=match):
            rt.set_head({head: value})
        with pytest.raises(ConfigError, match=match):
            rt.switch(None, head={head: value})
        np.testing.assert_array_equal(rt.weights(head), before)


def test_the_model_description_cannot_be_edited_to_make_a_weight_a_head(kit):
    with Runtime(kit.head_model) as rt:
        x = {k: np.ones_like(v[:1]) for k, v in FEED.items()}
        before = rt.run(x)["logits"]
        name, t = next((k, v) for k, v in rt.info.tensors.items() if not v.head)
        with pytest.raises(TypeError):
            rt.info.tensors[name] = replace(t, head=True)  # then set_head would write that weight
        with pytest.raises(ConfigError, match="not a detector-head tensor"):
            rt.set_head({name: np.zeros(t.shape, np.float32)})
        assert rt.wait_settled(30)
        np.testing.assert_array_equal(rt.run(x)["logits"], before)


def test_a_head_array_changed_between_the_checks_and_the_write_is_not_written(kit, monkeypatch):
    with Runtime(kit.head_model) as rt:
        head = rt.heads[0]
        mine = np.ones(tuple(rt.info.tensors[head].shape), np.float32)
        write = rt.backend.write

        def racing_write(*prepared):  # another thread of the caller's, between the checks and the write
            mine[...] = np.nan
            write(*prepared)

        monkeypatch.setattr(rt.backend, "write", racing_write)
        rt.switch(None, head={head: mine})
        assert np.array_equal(rt.weights(head), np.ones_like(mine))


def test_a_file_swapped_after_its_signature_was_checked_is_not_what_loads(kit, tmp_path, monkeypatch):
    model, files = _files(kit, "tflite")
    path = tmp_path / "a.safetensors"
    path.write_bytes(files["rotate"].read_bytes())
    generate_key(tmp_path / "k.pem")
    sign_file(path, tmp_path / "k.pem")
    import edge.format.signing as signing

    verify = signing.verify_bytes

    def swap_after_verify(*args, **kwargs):  # the attacker wins the race: the file changes once it was checked
        kid = verify(*args, **kwargs)
        path.write_bytes(files["noise"].read_bytes())
        return kid

    monkeypatch.setattr(signing, "verify_bytes", swap_after_verify)
    with Runtime(model, trusted_keys=[tmp_path / "k.pub"]) as rt:
        rt.load_adapter(path, "a")
        want = read_adapter(files["rotate"])
        got = rt.adapter("a")
        assert got.name == want.name
        for t, d in want.tensors.items():
            np.testing.assert_array_equal(got.tensors[t].values, d.values)
        # and the swapped (unsigned) file is refused when loaded again
        monkeypatch.setattr(signing, "verify_bytes", verify)
        with pytest.raises(SignatureError):
            rt.load_adapter(path, "b")


def test_the_policy_cannot_change_after_construction(kit, tmp_path):
    model, files = _files(kit, "tflite")
    pub = generate_key(tmp_path / "k.pem")
    keys = [pub]
    with Runtime(model, trusted_keys=keys) as rt:
        keys.clear()  # the caller's list: read once
        with pytest.raises(AttributeError):
            rt.policy = SignaturePolicy(None)
        assert rt.policy.required and isinstance(rt.policy.keys, tuple)
        with pytest.raises(SignatureError):
            rt.load_adapter(files["rotate"])  # unsigned
        with pytest.raises(SignatureError, match="in-memory"):
            rt.load_adapter(read_adapter(files["rotate"]))
        assert rt.adapters == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_after_close_every_call_raises(kit, backend):
    model, files = _files(kit, backend)
    rt = Runtime(model, backend=backend)
    rt.load_adapter(files["rotate"], "a")
    rt.close()
    param = next(iter(rt.info.tensors))
    calls = {
        "run": lambda: rt.run(FEED),
        "switch": lambda: rt.switch("a"),
        "load_adapter": lambda: rt.load_adapter(files["noise"]),
        "unload_adapter": lambda: rt.unload_adapter("a"),
        "adapter": lambda: rt.adapter("a"),
        "weights": lambda: rt.weights(param),
        "set_head": lambda: rt.set_head({}),
    }
    for what, call in calls.items():
        with pytest.raises(RuntimeClosedError):
            call()
            pytest.fail(f"{what} after close did not raise")
    rt.close()  # closing twice is fine


@pytest.mark.parametrize("backend,strategy", [(b, s) for b in BACKENDS for s in get_backend(b).STRATEGIES])
def test_a_run_overtaken_by_close_raises_runtime_closed(kit, backend, strategy, monkeypatch):
    model, _ = _files(kit, backend)
    rt = Runtime(model, backend=backend, strategy=strategy)
    run = rt.backend.run

    def overtaken(*args, **kwargs):  # another thread closes between the runtime's check and the backend's run
        rt.close()
        return run(*args, **kwargs)

    monkeypatch.setattr(rt.backend, "run", overtaken)
    done: list[BaseException] = []

    def call() -> None:
        try:
            _out(rt)
        except BaseException as e:  # noqa: BLE001 - checked below
            done.append(e)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "a run overtaken by close hung"
    assert len(done) == 1 and isinstance(done[0], RuntimeClosedError), done


# -- 2. concurrency --------------------------------------------------------------------------
STATES = [None, "a", "b", {"a": 0.5, "b": 0.5}, "c"]


def _key(state) -> str:
    return repr(sorted(state.items())) if isinstance(state, dict) else repr(state)


def _references(backend: str, model: Path, files: dict[str, Path]) -> dict[bytes, str]:
    """Every state's output under every strategy (hybrid serves from two kinds of session, which may differ in the
    last bits): output bytes -> state. States must be far apart, so a mix of two cannot pass for either."""
    refs: dict[bytes, str] = {}
    per_state: dict[str, list[np.ndarray]] = {}
    for strategy in get_backend(backend).STRATEGIES:
        with Runtime(model, backend=backend, strategy=strategy) as rt:
            for n, f in zip("abc", NAMES, strict=True):
                rt.load_adapter(files[f], n)
            for s in STATES:
                out = _settled(rt, s)
                refs[out.tobytes()] = _key(s)
                per_state.setdefault(_key(s), []).append(out)
    keys = list(per_state)
    for i, k in enumerate(keys):
        for other in keys[:i]:
            gap = min(np.abs(p - q).max() for p in per_state[k] for q in per_state[other])
            assert gap > 1e-3, f"states {k} and {other} are too close to tell apart ({gap:.1e})"
    return refs


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_run_switch_load_unload_and_close_at_random(kit, backend):
    model, files = _files(kit, backend)
    refs = _references(backend, model, files)
    rt = Runtime(model, backend=backend)
    for n, f in zip("abc", NAMES, strict=True):
        rt.load_adapter(files[f], n)
    closed = threading.Event()
    stop = threading.Event()
    outputs: list[bytes] = []
    failures: list[str] = []
    counts = {"run": 0, "switch": 0, "load": 0, "unload": 0, "refused": 0, "closed": 0}
    count_lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            after_close = closed.is_set()
            op = rng.choice(["run", "run", "run", "switch", "switch", "load", "unload"])
            try:
                if op == "run":
                    outputs.append(_out(rt).tobytes())
                elif op == "switch":
                    rt.switch(STATES[rng.integers(len(STATES))])
                elif op == "load":
                    name = "c" if rng.random() < 0.7 else "a"  # "a" again: replaced unless it is active
                    rt.load_adapter(files["blur" if name == "c" else "rotate"], name)
                else:
                    rt.unload_adapter("c" if rng.random() < 0.8 else "a")
                ok = op
            except RuntimeClosedError:
                ok = "closed"
            except ConfigError:  # not loaded, or active: the call is refused and changes nothing
                ok = "refused"
            except BaseException as e:  # noqa: BLE001 - reported below
                failures.append(f"{op}: {type(e).__name__}: {e}")
                return
            if after_close and ok != "closed":
                failures.append(f"{op} after close did not raise RuntimeClosedError")
            with count_lock:
                counts[ok] += 1

    threads = [threading.Thread(target=worker, args=(100 + i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    closer = threading.Thread(target=rt.close, daemon=True)
    closer.start()
    closer.join(20)
    assert not closer.is_alive(), "close() deadlocked"
    closed.set()
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads), "a caller deadlocked"
    assert not failures, failures[:5]
    assert counts["closed"] > 0 and counts["run"] > 100 and counts["switch"] > 20, counts
    assert counts["load"] > 0 and counts["unload"] > 0, counts
    seen = [refs.get(o) for o in outputs]
    assert None not in seen, f"{seen.count(None)} of {len(seen)} outputs match no whole state exactly"
    assert len(set(seen)) >= 3, f"the states were not exercised: {set(seen)}"


# -- 3. two processes writing one file --------------------------------------------------------
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from edge.format.adapter import load_adapter
    from edge.format.io import write_json
    kind, src, dst, tag, seconds = sys.argv[1:]
    end = time.monotonic() + float(seconds)
    n = 0
    adapter = load_adapter(src) if kind == "adapter" else None
    while time.monotonic() < end:
        if adapter is not None:
            adapter.save(dst)
        else:
            write_json(dst, {"writer": tag, "n": n, "pad": tag * 200_000})
        n += 1
    print(n)
    """
)


def _writers(kind: str, sources: list, dst: Path, seconds: float) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, kind, str(src), str(dst), tag, str(seconds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag, src in zip("xy", sources, strict=True)
    ]


def _finish(procs: list[subprocess.Popen]) -> list[int]:
    counts = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-2000:]
        counts.append(int(out))
    return counts


def test_two_processes_saving_one_adapter_while_a_runtime_loads_it(kit, tmp_path):
    model, files = _files(kit, "tflite")
    dst = tmp_path / "adapters" / "live.safetensors"
    dst.parent.mkdir()
    dst.write_bytes(files["rotate"].read_bytes())
    want = [read_adapter(files[n]) for n in ("rotate", "noise")]
    procs = _writers("adapter", [files["rotate"], files["noise"]], dst, 2.5)
    loads = 0
    with Runtime(model) as rt:
        while any(p.poll() is None for p in procs):  # for as long as they write (not from before they started)
            rt.load_adapter(dst, "live")  # never half a file: FormatError would fail the test
            got = rt.adapter("live")
            same = [all(np.array_equal(got.tensors[t].values, d.values) for t, d in a.tensors.items()) for a in want]
            assert sum(same) == 1, "a load read neither writer's whole adapter"
            loads += 1
    counts = _finish(procs)
    assert min(counts) > 5 and loads > 5, (counts, loads)
    assert not list(dst.parent.glob(".*.tmp")), "a writer that exited cleanly left a temp file"


def test_two_processes_writing_one_engine_choice_while_it_is_read(tmp_path):
    from edge.format.io import load_json, read_bounded

    dst = tmp_path / "engines" / "m-0123.json"
    dst.parent.mkdir()
    procs = _writers("json", [None, None], dst, 2.0)
    reads, seen = 0, set()
    # for as long as they write: a fixed window from here ended before the writers had started under load (counts
    # [129, 135], 0 reads at load 14)
    while any(p.poll() is None for p in procs):
        if not dst.exists():
            continue
        rec = load_json(read_bounded(dst, 1 << 22, what="engine choice"), source=str(dst))  # whole, or it raises
        assert rec["pad"] == rec["writer"] * 200_000
        seen.add(rec["writer"])
        reads += 1
    counts = _finish(procs)
    assert min(counts) > 5 and reads > 5, (counts, reads)
    assert seen == {"x", "y"}, seen
    assert not list(dst.parent.glob(".*.tmp"))
