"""The LiteRT side of ``edge bench switch --backend tflite``: the static reference and model files.

Also the measurement behind the choice of strategy (``python -m lab.bench_litert MODEL.tflite
INPUTS.npz [--md BENCHMARKS.md]``): the ways a weight edit can reach LiteRT's kernels.

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

__all__ = ["param_count", "write_merged", "static_session", "export_bench_model", "alternatives", "main"]


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

        path = cache / "minilm" / "all-MiniLM-L6-v2.tflite"
        if not path.exists():
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


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m lab.bench_litert", description=alternatives.__doc__.splitlines()[0])
    ap.add_argument("model", help="a .tflite file, or a built-in bench model: digits, minilm, all")
    ap.add_argument("inputs", type=Path, nargs="?", help="with a file: .npz with one array per model input")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edge", help="built-in models' cache")
    ap.add_argument("--md", type=Path, help="update this Markdown file's section (e.g. BENCHMARKS.md)")
    args = ap.parse_args(argv)
    if args.model in ("digits", "minilm", "all"):
        names = ["digits", "minilm"] if args.model == "all" else [args.model]
        models = [export_bench_model(n, args.cache, quiet=False) for n in names]
    elif args.inputs is None:
        ap.error("a .tflite file needs INPUTS (.npz)")
    else:
        models = [(Path(args.model), dict(np.load(args.inputs, allow_pickle=False)))]
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
