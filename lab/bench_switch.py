"""Fused-mode switch cost against LoRA fusion and session creation (``edge bench switch``).

For one exported model: two random SHiRA adapters at ``density`` over the target
tensors; a plain session of the merged model (the static reference); LoRA fusion
``W += B @ A`` with the same number of trainable parameters over the same tensors;
session creation; and, for every strategy of the backend, the switch time (call to
return: the next inference uses the new weights), the background settle window
(strategies that rebuild after a switch), and steady-state inference. Inference of
all contestants is measured in interleaved rounds so drift hits all alike.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from edge.machine import p50, time_calls
from edge.runtime import Runtime, merge_weights
from lab.benchmarks import default_targets, random_shira

__all__ = ["bench_model", "bench_switch", "lora_fuse", "lora_fuser", "markdown", "add_arguments", "cli"]

GOALS = {"switch_vs_lora_x": 20.0, "switch_vs_create_x": 100.0, "overhead_pct": 3.0}
BACKEND_GOALS = {"tflite": {**GOALS, "switch_vs_create_x": 10.0}}  # issue 4: 10x faster than a new interpreter


def bench_switch(
    model_path: str | Path,
    feeds: Mapping[str, np.ndarray],
    *,
    backend: str = "onnxruntime",
    strategies: list[str] | None = None,
    density: float = 0.01,
    targets: str | None = None,
    threads: int | None = None,
    runs: int = 200,
    rounds: int = 5,
    switches: int = 30,
    progress: bool = True,
) -> dict:
    from edge.progress import bar
    from runtimes import get_backend

    model_path = Path(model_path)
    cls = get_backend(backend)
    strategies = list(strategies or cls.STRATEGIES)
    default = Runtime(model_path, backend=backend, threads=threads)
    info, default_strategy = default.info, default.strategy
    held = default.backend.threads  # the static session runs on the threads the runtime resolved (1 for a tiny model)
    names = default_targets(info, targets)
    a = random_shira(info, names, density, seed=1, name="A")
    b = random_shira(info, names, density, seed=2, name="B")
    params = _param_count(model_path)
    steps = bar(total=3 + len(strategies), desc=f"bench switch {info.name}", disable=not progress)

    with tempfile.TemporaryDirectory() as tmp:
        merged_path = Path(tmp) / f"merged{model_path.suffix}"
        base = {k: default.weights(k) for k in names}
        _write_merged(model_path, info, merge_weights(base, [(a, 1.0)]), merged_path)
        default.close()
        del default
        lora_ms, lora_rank = lora_fuse(base, density, info)  # before any session spins threads
        steps.update()
        static, create_ms = _static_session(backend, merged_path, held)
        if backend == "tflite":
            static.check(feeds, model_path)
        steps.update()

        contestants: dict[str, object] = {}
        result: dict[str, dict] = {}
        for s in strategies:
            rt = Runtime(model_path, backend=backend, strategy=s, threads=threads)
            rt.load_adapter(a)
            rt.load_adapter(b)
            sw, settle, first, apply, warm = [], [], [], [], []
            for i in range(switches + 2):
                rt.switch(None)
                rt.wait_settled()
                t0 = time.perf_counter()
                rt.switch("A")  # base -> adapter: one scatter, the counterpart of one LoRA fusion
                t1 = time.perf_counter()
                rt.wait_settled()
                t2 = time.perf_counter()
                rt.switch("B")  # adapter -> adapter: restore A's entries, write B's
                t3 = time.perf_counter()
                rt.run(feeds)
                t4 = time.perf_counter()
                rt.wait_settled()
                t5 = time.perf_counter()
                if i >= 2:  # the first two rounds warm caches
                    apply.append((t1 - t0) * 1e3)
                    sw.append((t3 - t2) * 1e3)
                    first.append((t4 - t3) * 1e3)
                    settle.append((t5 - t2) * 1e3)
                    if (w := getattr(rt.backend, "last_warm_ms", None)) is not None:
                        warm.append(w)
            result[s] = {
                "switch_ms_p50": p50(sw),
                "switch_ms_p99": float(np.percentile(sw, 99)),
                "apply_ms_p50": p50(apply),
                "first_infer_ms_p50": p50(first),
            }
            if s == "hybrid":
                result[s]["settle_ms_p50"] = p50(settle)
            if warm:  # the background re-read of the recent writes after each rebuild (runtimes.rebuilds._warm)
                result[s]["warm_ms_p50"] = p50(warm)
            rt.switch("A")
            rt.wait_settled()
            contestants[s] = rt
            steps.update()

        times: dict[str, list[float]] = {"static": [], **{s: [] for s in strategies}}
        per_round = max(1, runs // rounds)
        for _ in range(rounds):
            times["static"] += time_calls(lambda: static.run(None, dict(feeds)), per_round)
            for s, rt in contestants.items():
                times[s] += time_calls(lambda rt=rt: rt.run(feeds), per_round)
        steps.update()
        steps.close()
        static_ms = p50(times["static"])
        for s in strategies:
            result[s]["infer_ms_p50"] = p50(times[s])
            result[s]["overhead_pct"] = 100.0 * (p50(times[s]) / static_ms - 1.0)
            contestants[s].close()

    d = result[default_strategy]
    targets_x = BACKEND_GOALS.get(backend, GOALS)
    goals = {
        "switch_vs_lora_x": lora_ms / d["switch_ms_p50"],
        "apply_vs_lora_x": lora_ms / d["apply_ms_p50"],
        "switch_vs_lora_switch_x": 2 * lora_ms / d["switch_ms_p50"],
        "switch_vs_create_x": p50(create_ms) / d["switch_ms_p50"],
        "overhead_pct": d["overhead_pct"],
    }
    return {
        "model": info.name,
        "params": params,
        "backend": backend,
        "density": density,
        "targets": len(names),
        "adapter_nnz": a.nnz,
        "lora_rank": lora_rank,
        "threads": threads,
        "static_infer_ms_p50": static_ms,
        "lora_fuse_ms_p50": lora_ms,
        "session_create_ms_p50": p50(create_ms),
        "strategies": result,
        "default_strategy": default_strategy,
        "goals": {
            **goals,
            "targets": targets_x,
            "met": goals["switch_vs_lora_x"] >= targets_x["switch_vs_lora_x"]
            and goals["switch_vs_create_x"] >= targets_x["switch_vs_create_x"]
            and goals["overhead_pct"] <= targets_x["overhead_pct"],
        },
    }


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines += [
            f"### {r['model']} ({r['params'] / 1e6:.1f} M params, {r['targets']} target tensors, "
            f"density {r['density']:.0%}, {r['adapter_nnz']:,} entries, backend {r['backend']})",
            "",
            f"static session {r['static_infer_ms_p50']:.3f} ms/inference; "
            f"LoRA fusion (rank {r['lora_rank']}, same trainable count) {r['lora_fuse_ms_p50']:.3f} ms; "
            f"session creation {r['session_create_ms_p50']:.1f} ms.",
            "",
            "| strategy | switch A->B ms p50 | p99 | apply base->A ms p50 | settle ms p50 | "
            "first inference after switch ms | steady inference ms p50 | overhead vs static |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s, v in r["strategies"].items():
            mark = " (default)" if s == r["default_strategy"] else ""
            settle = f"{v['settle_ms_p50']:.2f}" if "settle_ms_p50" in v else "-"
            p99 = f"{v['switch_ms_p99']:.3f}" if "switch_ms_p99" in v else "-"  # peers' rows have none
            lines.append(
                f"| {s}{mark} | {v['switch_ms_p50']:.3f} | {p99} | {v['apply_ms_p50']:.3f} | {settle} | "
                f"{v['first_infer_ms_p50']:.3f} | "
                f"{v['infer_ms_p50']:.3f} | {v['overhead_pct']:+.1f} % |"
            )
        g = r["goals"]
        goal = g.get("targets", GOALS)
        warm = {s: v["warm_ms_p50"] for s, v in r["strategies"].items() if "warm_ms_p50" in v}
        lines += [
            "",
            *(
                [
                    "Re-reading the recent writes into the cache after each background rebuild costs "
                    + ", ".join(f"{s} {ms:.3f} ms" for s, ms in warm.items())
                    + " (p50, on the rebuild thread).",
                    "",
                ]
                if warm
                else []
            ),
            f"Default strategy `{r['default_strategy']}`: switch {g['switch_vs_lora_x']:.1f}x faster than LoRA fusion "
            f"(goal {goal['switch_vs_lora_x']:.0f}x; base->adapter apply {g['apply_vs_lora_x']:.1f}x; vs a LoRA "
            f"switch = unfuse + fuse {g['switch_vs_lora_switch_x']:.1f}x), "
            f"{g['switch_vs_create_x']:.0f}x faster than session creation "
            f"(goal {goal['switch_vs_create_x']:.0f}x), steady inference {g['overhead_pct']:+.1f} % vs static "
            f"(goal <= {goal['overhead_pct']:.0f} %): **{'met' if g['met'] else 'not met'}**.",
            "",
        ]
    return "\n".join(lines)


def _param_count(path: Path) -> int:
    if path.suffix == ".tflite":
        from lab.bench_litert import param_count

        return param_count(path)
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return int(sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT))


def _write_merged(path: Path, info, merged: Mapping[str, np.ndarray], out: Path) -> None:
    if path.suffix == ".tflite":
        from lab.bench_litert import write_merged

        return write_merged(path, info, merged, out)
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    stored = {(t := info.tensors[k]).initializer: t.to_stored(v).reshape(t.stored_shape) for k, v in merged.items()}
    for init in model.graph.initializer:
        if init.name in stored:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(stored[init.name]), init.name))
    onnx.save(model, str(out))


def _static_session(backend: str, path: Path, threads: int | None):
    """A plain session with default options, and the times to create it."""
    if backend == "tflite":  # a plain XNNPACK interpreter; creation = new interpreter + allocate_tensors
        from lab.bench_litert import static_session

        return static_session(path, threads)
    import onnxruntime as ort

    def create():
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    create_ms = time_calls(create, 7, warmup=1)
    return create(), create_ms


def lora_fuser(base: Mapping[str, np.ndarray], density: float, info) -> tuple[Callable[[], float], int]:
    """``(timer, rank)``: ``timer(calls)`` is the p50 (ms) of ``W += B @ A`` over all target tensors (stored layout,
    copies of ``base``), rank chosen for the same trainable count, over ``calls`` calls. The fairest LoRA reference
    is its fastest: BLAS thread pools can be pathologically slow on a busy 2-core VM next to onnxruntime's spinning
    threads, so each call of ``timer`` takes the better of the default and 1 BLAS thread."""
    rng = np.random.default_rng(0)
    mats, ranks = [], []
    for k, w in base.items():
        rows, cols = w.shape
        r = max(1, round(density * rows * cols / (rows + cols)))
        ranks.append(r)
        w = np.array(info.tensors[k].to_stored(w).reshape(info.tensors[k].stored_shape))  # stored layout, a copy
        bb = rng.standard_normal((w.shape[0], r)).astype(np.float32)
        aa = rng.standard_normal((r, w.shape[1])).astype(np.float32)
        mats.append((w, bb, aa))

    def fuse():
        for w, bb, aa in mats:
            w += bb @ aa

    def timer(calls: int = 21) -> float:
        best = p50(time_calls(fuse, calls, warmup=2))
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return best
        with threadpool_limits(limits=1, user_api="blas"):
            return min(best, p50(time_calls(fuse, calls, warmup=2)))

    return timer, int(np.median(ranks))


def lora_fuse(base: Mapping[str, np.ndarray], density: float, info) -> tuple[float, int]:
    """p50 of ``W += B @ A`` over all target tensors, rank chosen for the same trainable count (:func:`lora_fuser`)."""
    timer, rank = lora_fuser(base, density, info)
    return timer(), rank


def add_arguments(sp) -> None:
    sp.add_argument("--model", default="all", choices=["digits", "minilm", "all"], help="built-in model(s)")
    sp.add_argument("--model-file", help="an exported .onnx or .tflite to bench instead (no torch)")
    sp.add_argument("--inputs", help="with --model-file: .npz of input arrays")
    sp.add_argument("--density", type=float, default=0.01, help="adapter density (default 0.01)")
    sp.add_argument("--runs", type=int, default=200, help="timed inferences per contestant")
    sp.add_argument(
        "--peers", action="store_true", help="also measure onnxruntime's multi-LoRA API and session re-creation"
    )


def cli(args) -> int:
    import json

    from edge.commands import host_needed
    from edge.errors import EdgeError
    from edge.format.io import write_json
    from edge.machine import machine
    from lab.benchmarks import write_section

    models = []
    if args.model_file:
        if not args.inputs:
            raise EdgeError("--model-file needs --inputs FILE.npz with one array per model input")
        from edge.format.samples import read_npz

        models.append((Path(args.model_file), read_npz(args.inputs)))  # bounded; a FIFO is refused, not waited on
    else:
        host_needed("edge bench switch (without --model-file)")
        for name in ["digits", "minilm"] if args.model == "all" else [args.model]:
            if args.backend == "tflite":
                from lab.bench_litert import export_bench_model

                models.append(export_bench_model(name, args.cache, quiet=args.quiet))
            else:
                models.append(bench_model(name, args.cache, quiet=args.quiet))
    results = [
        bench_switch(
            path,
            feeds,
            backend=args.backend,
            density=args.density,
            threads=args.threads,
            runs=args.runs,
            progress=not args.quiet,
        )
        for path, feeds in models
    ]
    peers = []
    if args.peers:
        from lab.bench_peers import bench_peers

        if args.backend != "onnxruntime":
            raise EdgeError("--peers compares onnxruntime APIs; use --backend onnxruntime")
        for r, (path, feeds) in zip(results, models):
            try:
                p = bench_peers(
                    path, feeds, density=args.density, threads=args.threads, runs=args.runs, progress=not args.quiet
                )
            except EdgeError as e:  # e.g. a model whose targets are not all MatMul(x, W): say so, keep the rest
                r["peers"] = {"skipped": str(e)}
                continue
            peers.append(p)
            r["peers"] = p
            r["strategies"].update({k: p["peers"][k] for k in ("ort_multi_lora", "session_recreate")})
    out = {**results[-1], "models": results, "machine": machine()}  # the largest model's figures on top
    print(json.dumps(out, indent=1))
    if args.json:
        write_json(args.json, out)
    if args.md:
        write_section(args.md, f"switch:{args.backend}", f"Fused-mode switching on {args.backend}", markdown(results))
        if peers:
            from lab.bench_peers import markdown as peers_markdown

            write_section(
                args.md,
                "peers:onnxruntime",
                "Peers: onnxruntime multi-LoRA and session re-creation",
                "\n".join(peers_markdown(p) for p in peers),
            )
    return 0


def bench_model(name: str, cache: Path, quiet: bool):
    from edge.errors import EdgeError

    if name == "digits":
        from lab.datasets import load_domains
        from lab.pipeline import DemoConfig, prepare_demo

        art = prepare_demo(cache, DemoConfig(), progress=not quiet)
        x = load_domains(("rotate",))["clean"].x_test[:1]
        return art.model, {"pixels": np.ascontiguousarray(x)}
    if name == "minilm":
        from exporters import minilm
        from runtimes import read_model_info

        path = cache / "minilm" / "all-MiniLM-L6-v2.onnx"
        if not path.exists() or read_model_info(path).source_fingerprint is None:  # none yet, or from before twins
            minilm.export_minilm(path, progress=not quiet)
        return path, minilm.tokenize(["An edge device adapts to drifting data."], seq_len=128)
    raise EdgeError(f"unknown bench model {name!r}; choose digits, minilm or all")
