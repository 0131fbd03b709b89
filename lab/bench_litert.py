"""The LiteRT side of ``edge bench switch --backend tflite``: the static reference and model files.

Also the measurement behind the choice of strategy (``python -m lab.bench_litert MODEL.tflite
INPUTS.npz [--md BENCHMARKS.md]``): the ways a weight edit can reach LiteRT's kernels; and
(``--overhead LABEL=FILE.tflite ...``, :func:`overhead`) what a call of the switchable runtime costs above a bare
interpreter on the same file.

The static reference is a plain interpreter with the default XNNPACK delegate over a
``.tflite`` file with the adapter merged in; "session creation" is building such an
interpreter (construct + ``allocate_tensors``, where XNNPACK packs the weights).
Device side: no torch (except :func:`export_bench_model`, host only).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edge.machine import time_calls
from lab.litert_probe import synthetic_feeds  # re-exported: the feeds of its --overhead runs

__all__ = [
    "alternatives",
    "export_bench_model",
    "main",
    "overhead",
    "param_count",
    "static_session",
    "synthetic_feeds",
    "write_merged",
]


def param_count(path: Path) -> int:
    """float32 elements stored in the file's constant tensors."""
    from edge.format.tflite import read_tflite

    fb = read_tflite(Path(path).read_bytes())
    return int(sum(t.nbytes // 4 for t in fb.tensors if t.nbytes and t.type == 0))


def write_merged(path: Path, info, merged: Mapping[str, np.ndarray], out: Path) -> None:
    """A copy of ``path`` with ``merged`` (source layout) written into its stored tensors (metadata kept)."""
    from edge.format.tflite import read_tflite

    data = bytearray(Path(path).read_bytes())
    by_name = {t.name: t for t in read_tflite(bytes(data)).tensors}
    for k, v in merged.items():
        t = info.tensors[k]
        raw = t.to_stored(v).tobytes()
        at = by_name[t.initializer].start
        data[at : at + len(raw)] = raw
    Path(out).write_bytes(bytes(data))


class _Plain:
    """A plain XNNPACK interpreter with onnxruntime's ``run(None, feeds)`` shape, for the bench loop."""

    def __init__(self, interp) -> None:
        self.interp = interp
        self.inputs = {d["name"]: (d["index"], d["dtype"]) for d in interp.get_input_details()}
        self.outputs = [d["index"] for d in interp.get_output_details()]

    def run(self, _names, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        for k, x in feeds.items():
            idx, dtype = self.inputs[k]
            self.interp.set_tensor(idx, np.ascontiguousarray(x, dtype))
        self.interp.invoke()
        return [self.interp.get_tensor(i) for i in self.outputs]

    def check(self, feeds: Mapping[str, np.ndarray], path: Path) -> None:
        """Refuse, before any timing, feeds this interpreter cannot take as given: it runs the file's own input
        shapes (not resized), where the runtime would run a larger batch in chunks, so the two would not compare."""
        from edge.errors import ConfigError

        want = {d["name"]: tuple(int(n) for n in d["shape"]) for d in self.interp.get_input_details()}
        got = {k: tuple(np.shape(x)) for k, x in feeds.items()}
        if got != want:
            raise ConfigError(
                f"{Path(path).name} takes inputs {want} (the shapes it was exported with); the inputs given are "
                f"{got}: save one array per input of exactly that shape, e.g. np.savez('x.npz', x=x[:1])"
            )


def static_session(path: Path, threads: int | None):
    """A plain XNNPACK interpreter of ``path`` and the times (ms) to build one."""
    import os

    from runtimes.litert import interpreter_module

    lib, _ = interpreter_module()
    data = Path(path).read_bytes()

    def create():
        it = lib.Interpreter(model_content=data, num_threads=int(threads or os.cpu_count() or 1))
        it.allocate_tensors()
        return it

    create_ms = time_calls(create, 7, warmup=1)
    return _Plain(create()), create_ms


def export_bench_model(name: str, cache: Path, quiet: bool):
    """``(path, feeds)`` of a built-in bench model as ``.tflite`` (host side: needs torch and litert-torch)."""
    from edge.errors import EdgeError
    from exporters.tflite import export_tflite

    if name == "digits":
        from lab.datasets import load_domains
        from lab.pipeline import DemoConfig, prepare_demo

        art = prepare_demo(cache, DemoConfig(), progress=not quiet, backend="tflite")
        x = load_domains(("rotate",))["clean"].x_test[:1]
        return art.model, {"pixels": np.ascontiguousarray(x)}
    if name == "minilm":
        from exporters import minilm
        from runtimes import read_model_info

        path = cache / "minilm" / "all-MiniLM-L6-v2.tflite"
        if not path.exists() or read_model_info(path).source_fingerprint is None:  # none yet, or from before twins
            export_tflite(
                minilm.load_minilm(), minilm.example_inputs(1, 128), path, name="all-MiniLM-L6-v2",
                input_names=minilm.INPUT_NAMES, output_names=minilm.OUTPUT_NAMES, dynamic_batch=False,
                extra={"source": "sentence-transformers/all-MiniLM-L6-v2", "seq_len": 128},
            )  # fmt: skip
        return path, minilm.tokenize(["An edge device adapts to drifting data."], seq_len=128)
    raise EdgeError(f"unknown bench model {name!r}; choose digits, minilm or all")


def alternatives(path: Path, feeds: Mapping[str, np.ndarray], threads: int | None = None, runs: int = 20) -> dict:
    """Inference and rebuild cost of each way an edited weight can reach LiteRT's kernels (ms, p50).

    - ``xnnpack_static``: a plain XNNPACK interpreter (edits not seen; the reference speed);
    - ``builtin``: built-in kernels over the model bytes (edits seen in place);
    - ``xnnpack_weights_as_inputs``: the target weights turned into graph inputs, written once
      into the interpreter's input buffers (edits seen in place; XNNPACK leaves dynamic-weight
      ``FULLY_CONNECTED`` to the built-in kernels);
    - ``build_same_bytes`` / ``build_fresh_copy``: a new XNNPACK interpreter over the live
      bytes (what ``rebuild``/``hybrid`` do) vs over a fresh copy of the model bytes.
    Rounds are interleaved so drift hits all alike. Needs ai-edge-litert's schema package.
    """
    import os

    from edge.format.tflite import pack_model, tflite_info, unpack_model
    from edge.machine import p50
    from runtimes.litert import interpreter_module

    lib, _ = interpreter_module()
    n_threads = int(threads or os.cpu_count() or 1)
    data = Path(path).read_bytes()
    info = tflite_info(data)
    m = unpack_model(data)
    sg = m.subgraphs[0]
    names = [t.name.decode() for t in sg.tensors]
    weights = {}
    for k, t in info.tensors.items():
        if t.slot or len(t.shape) != 2 or "embed" in k:
            continue
        i = names.index(t.initializer)
        tensor = sg.tensors[i]
        weights[t.initializer] = np.asarray(m.buffers[tensor.buffer].data, np.uint8).view(np.float32).copy()
        m.buffers[tensor.buffer].data = None
        sg.inputs = [*sg.inputs, i]
    dynamic = pack_model(m)

    def build(content, builtin=False):
        kind = lib.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if builtin else lib.OpResolverType.AUTO
        it = lib.Interpreter(model_content=content, num_threads=n_threads, experimental_op_resolver_type=kind)
        it.allocate_tensors()
        return it

    def runner(it, written=None):
        det = {d["name"]: d for d in it.get_input_details()}
        for k, w in (written or {}).items():
            it.tensor(det[k]["index"])()[...] = w.reshape(det[k]["shape"])  # written once; stays
        outs = [d["index"] for d in it.get_output_details()]

        def run():
            for k, v in feeds.items():
                it.set_tensor(det[k]["index"], np.ascontiguousarray(v, det[k]["dtype"]))
            it.invoke()
            return [it.get_tensor(o) for o in outs]

        return run

    contestants = {
        "xnnpack_static": runner(build(data)),
        "builtin": runner(build(data, builtin=True)),
        "xnnpack_weights_as_inputs": runner(build(dynamic), weights),
    }
    ref = contestants["xnnpack_static"]()
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(ref, contestants["xnnpack_weights_as_inputs"]()))
    times: dict[str, list[float]] = {k: [] for k in [*contestants, "build_same_bytes", "build_fresh_copy"]}
    for _ in range(5):
        for k, fn in contestants.items():
            times[k] += time_calls(fn, max(1, runs // 5), warmup=1)
        times["build_same_bytes"] += time_calls(lambda: build(data), 2, warmup=0)
        times["build_fresh_copy"] += time_calls(lambda: build(bytes(bytearray(data))), 2, warmup=0)
    out = {k: p50(v) for k, v in times.items()}
    return {"model": info.name, "threads": n_threads, "weights_as_inputs_max_abs_diff": max_diff, "ms_p50": out}


def _markdown(r: dict) -> str:
    ms = r["ms_p50"]
    ref = ms["xnnpack_static"]
    rows = [
        ("XNNPACK, plain interpreter (`rebuild`, settled `hybrid`)", "no (packed at build)", ms["xnnpack_static"]),
        ("built-in kernels, no delegate (`builtin`)", "yes, in place", ms["builtin"]),
        ("XNNPACK, target weights as graph inputs", "yes, in place", ms["xnnpack_weights_as_inputs"]),
    ]
    lines = [
        f"The ways an edit can reach LiteRT's kernels ({r['threads']} threads; `python -m lab.bench_litert`).",
        "",
        "| way | in-place edit seen? | inference ms p50 | vs plain XNNPACK |",
        "|---|---|---|---|",
        *[f"| {w} | {seen} | {v:.3f} | {100 * (v / ref - 1):+.0f} % |" for w, seen, v in rows],
        "",
        f"New XNNPACK interpreter (construct + `allocate_tensors`, which packs): over the live model bytes "
        f"{ms['build_same_bytes']:.1f} ms (what `rebuild` and `hybrid` do), over a fresh copy of the bytes "
        f"{ms['build_fresh_copy']:.1f} ms.",
        "",
    ]
    return "\n".join(lines)


def overhead(paths: Mapping[str, Path], threads: int | None = None, rounds: int = 15, runs: int = 200) -> dict:
    """Per-call cost of the switchable runtime above a bare interpreter on the same file (us, p50 per call).

    Per file: ``bare``, a plain XNNPACK interpreter called as its users do (``set_tensor``, ``invoke``,
    ``get_tensor`` of every output; :func:`lab.litert_probe.plain_interpreter`) on the threads the runtime's
    XNNPACK interpreter runs on; ``backend``, ``LiteRTBackend.run`` of a settled ``hybrid`` runtime with a random
    SHiRA adapter switched in; ``runtime``, ``Runtime.run`` on it (its feed check included). Each round times
    up to ``runs`` calls of each (at least 10, about 0.4 s), in alternating order; ``*_x_bare`` are medians of the
    per-round ratios (paired).
    """
    return {
        "threads": threads,
        "rounds": rounds,
        "models": {k: _overhead(Path(p), threads, rounds, runs) for k, p in paths.items()},
    }


def _overhead(path: Path, threads: int | None, rounds: int, runs: int) -> dict:
    from edge.machine import load_average
    from lab.bench_quantized_timing import switchable
    from lab.litert_probe import plain_interpreter

    rt = switchable(path, backend="tflite", threads=threads)
    rt.switch("A", clip=True)
    rt.wait_settled()
    held = rt.backend.interpreter_threads
    bare, feeds, backend = plain_interpreter(path, held.get("xnnpack", threads)), synthetic_feeds(path), rt.backend
    calls = {"bare": lambda: bare(feeds), "backend": lambda: backend.run(feeds), "runtime": lambda: rt.run(feeds)}
    n = int(np.clip(400.0 / max(min(time_calls(calls["bare"], 5)), 1e-6), 10, runs))
    load0 = load_average()
    times: dict[str, list[float]] = {k: [] for k in calls}
    ratios: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(rounds):
        per = {}
        for k in list(calls)[:: 1 if r % 2 == 0 else -1]:
            ts = time_calls(calls[k], n, warmup=2)
            times[k] += ts
            per[k] = float(np.median(ts))
        for k in calls:
            ratios[k].append(per[k] / per["bare"])
    rt.close()
    row = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    row.update({f"{k}_x_bare": float(np.median(ratios[k])) for k in ("backend", "runtime")})
    row.update(file=path.name, interpreter_threads=held, calls_per_round=n)
    row["load_1m"] = [(load0 or [None])[0], (load_average() or [None])[0]]
    return row


def _overhead_markdown(r: dict) -> str:
    lines = [
        "Per-call cost above a bare interpreter on the same file (`python -m lab.bench_litert --overhead`): a plain "
        "XNNPACK interpreter called as its users do, `LiteRTBackend.run` and `Runtime.run` of a settled `hybrid` "
        f"runtime with an adapter switched in; {r['rounds']} rounds alternating the three, ratios paired within "
        "rounds (median of per-round ratios).",
        "",
        "| model | file | XNNPACK threads | bare us p50 | backend us p50 (x bare) | Runtime.run us p50 (x bare) "
        "| load |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, m in r["models"].items():
        load = " -> ".join("-" if v is None else f"{v:.2f}" for v in m["load_1m"])
        lines.append(
            f"| {label} | {m['file']} | {m['interpreter_threads'].get('xnnpack', '-')} | {m['bare']:.2f} "
            f"| {m['backend']:.2f} ({m['backend_x_bare']:.3f}) | {m['runtime']:.2f} ({m['runtime_x_bare']:.3f}) "
            f"| {load} |"
        )
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m lab.bench_litert", description=alternatives.__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="a .tflite file, or a built-in bench model: digits, minilm, all")
    ap.add_argument("inputs", type=Path, nargs="?", help="with a file: .npz with one array per model input")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edge", help="built-in models' cache")
    ap.add_argument("--md", type=Path, help="update this Markdown file's section (e.g. BENCHMARKS.md)")
    ap.add_argument(
        "--overhead",
        nargs="+",
        metavar="LABEL=FILE.tflite",
        help="instead: the per-call cost above a bare interpreter of these files (section litert:overhead)",
    )
    ap.add_argument("--rounds", type=int, default=15, help="--overhead: interleaved rounds")
    args = ap.parse_args(argv)
    if args.overhead:
        paths = dict(p.split("=", 1) if "=" in p else (Path(p).stem, p) for p in args.overhead)
        r = overhead({k: Path(v) for k, v in paths.items()}, threads=args.threads, rounds=args.rounds)
        print(json.dumps(r, indent=1))
        if args.md:
            from lab.benchmarks import write_section

            write_section(
                args.md, "litert:overhead", "LiteRT: per-call cost above a bare interpreter", _overhead_markdown(r)
            )
        return 0
    if args.model is None:
        ap.error("give a model (or --overhead FILES)")
    if args.model in ("digits", "minilm", "all"):
        names = ["digits", "minilm"] if args.model == "all" else [args.model]
        models = [export_bench_model(n, args.cache, quiet=False) for n in names]
    elif args.inputs is None:
        ap.error("a .tflite file needs INPUTS (.npz)")
    else:
        from edge.format.samples import read_npz

        models = [(Path(args.model), read_npz(args.inputs))]  # bounded; a FIFO is refused, not waited on
    for path, feeds in models:
        r = alternatives(path, feeds, threads=args.threads)
        print(json.dumps(r, indent=1))
        if args.md:
            from lab.benchmarks import write_section

            key, title = f"switch:tflite-ways:{r['model']}", f"LiteRT, {r['model']}: where an in-place edit is seen"
            write_section(args.md, key, title, _markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
