"""Low-precision adapters: file bytes and mean accuracy per bit width, and ComPEFT transport (``edge bench lowbit``).

On the demo's pretrained digits encoder, for each configuration one adapter per target
domain (rotate, noise, invert, blur) is trained on the host with the same epochs,
learning rate and seed at every precision (cached next to the demo artifacts, so a
rerun only re-measures), saved in the adapter file format, and measured:

* ``bytes``: the size of the saved adapter file (header and metadata included; mean
  over the four domains, whose files differ by a few bytes of ``info``), and
  ``payload_bytes``: packed codes plus statistics (or float32 values) only;
* ``mean_acc``: mean test accuracy over the four domains of the decoded adapter in
  torch, and ``ort_mean_acc``: the same files loaded into the slot model on the
  device runtime.

Rows: the bottleneck adapter and LoRA at 1, 2, 4, 8 and 32 bits; a width sweep of the
bottleneck at 1 and 32 bits (the fixed file header weighs more on small adapters);
1-bit and fp32 with a head delta; BitDelta sign codes; the demo's SHiRA adapters; and
ComPEFT transport compression (global top-k, ternary) of the fp32 bottleneck and of
the SHiRA adapters. For the main 1-bit adapter the device figures (load, switch,
inference against the plain base model) are timed like the SHiRA ones.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge.machine import p50, time_calls
from lab.bench_lowbit_compeft import ALPHA_GRID, compeft_rows, shira_rows  # noqa: F401 (ALPHA_GRID: kept importable here)

__all__ = ["GOALS", "LowbitBench", "add_arguments", "bench_lowbit", "cli", "markdown"]

#: 1-bit vs fp32 bottleneck at the main width: accuracy gap at most 1 point, file at most 1/25.
GOALS = {"acc_gap_points": 1.0, "bytes_ratio": 25.0}


@dataclass(frozen=True)
class LowbitBench:
    """What ``edge bench lowbit`` trains and measures."""

    dim: int = 256  # bottleneck width of the main rows
    lora_dim: int = 32  # LoRA rank
    bits: tuple[int, ...] = (1, 2, 4, 8, 32)
    sweep_dims: tuple[int, ...] = (8, 32, 128)  # bottleneck widths measured at 1 and 32 bits too
    densities: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)  # ComPEFT keep fractions
    goal_seeds: tuple[int, ...] = (0, 1, 2)  # the 1-bit vs fp32 goal at the main width, over these seeds
    epochs: int = 30
    lr: float = 2e-2
    seed: int = 0
    ort: bool = True


def bench_lowbit(
    cache: Path,
    cfg: LowbitBench = LowbitBench(),
    *,
    backend: str = "onnxruntime",
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    import torch

    from edge.progress import bar
    from exporters import lowbit
    from lab import lowbit_demo
    from lab.datasets import load_domains
    from lab.digits_model import load_checkpoint
    from lab.pipeline import DemoConfig, prepare_demo

    torch.set_num_threads(threads or 1)  # a tiny model: one thread trains as fast and leaves the other core free
    demo = DemoConfig()
    art = prepare_demo(cache, demo, progress=progress)
    domains = load_domains(demo.domains, seed=demo.seed)
    targets = [domains[n] for n in demo.domains]
    base = load_checkpoint(art.model.parent / "encoder.safetensors")
    root = art.model.parent / "lowbit"
    root.mkdir(exist_ok=True)
    example = torch.as_tensor(domains["clean"].x_test[:4])

    common = {"epochs": cfg.epochs, "lr": cfg.lr, "seed": cfg.seed}
    plan = [("main", lowbit.LowbitConfig("adapter", bits=b, dim=cfg.dim, **common)) for b in cfg.bits]
    plan += [("main", lowbit.LowbitConfig("lora", bits=b, dim=cfg.lora_dim, **common)) for b in cfg.bits]
    plan += [
        ("sweep", lowbit.LowbitConfig("adapter", bits=b, dim=d, **common)) for d in cfg.sweep_dims for b in (1, 32)
    ]
    plan += [("head", lowbit.LowbitConfig("adapter", bits=b, dim=cfg.dim, head=True, **common)) for b in (1, 32)]
    plan += [("sign", lowbit.LowbitConfig("adapter", bits=1, scheme="sign", dim=cfg.dim, **common))]
    plan += [
        ("seed", lowbit.LowbitConfig("adapter", bits=b, dim=cfg.dim, epochs=cfg.epochs, lr=cfg.lr, seed=sd))
        for sd in cfg.goal_seeds
        if sd != cfg.seed
        for b in (1, 32)
    ]

    rows, trained, fresh = [], {}, 0
    steps = bar(total=len(plan) * len(targets), desc="bench lowbit", disable=not progress)
    for kind, lc in plan:
        model_path, info = lowbit_demo.slot_model(root, base, lc, example, progress=False)
        files = {}
        for d in targets:
            fresh += not (root / f"{lowbit_demo.adapter_stem(lc, d.name)}.safetensors").exists()
            files[d.name] = lowbit_demo.train_domain(root, base, lc, d, info, progress=False)
            steps.update()
        trained[(kind, lc)] = (model_path, files)
        rows.append(_row(kind, lc, base, model_path, files, targets, cfg.ort, backend, threads))
    steps.close()

    main_1 = trained[("main", lowbit.LowbitConfig("adapter", bits=1, dim=cfg.dim, **common))]
    main_32 = trained[("main", lowbit.LowbitConfig("adapter", bits=32, dim=cfg.dim, **common))]
    rows += compeft_rows(base, main_32[1], targets, cfg.densities, cfg.dim)
    rows += shira_rows(base, art.adapters, targets, cfg.densities)
    return {
        "config": asdict(cfg),
        "trained_now": fresh,  # adapters trained by this run (the others were reused from the cache)
        "rows": rows,
        "goals": _goals(rows, cfg.dim, cfg.seed),
        "device": _device_costs(art.model, main_1, main_32, targets, backend, threads),
    }


def _row(kind, lc, base, model_path, files, targets, ort: bool, backend: str, threads) -> dict:
    from exporters import lowbit
    from lab.digits_model import evaluate

    accs, ort_accs, sizes = {}, {}, []
    for d in targets:
        path, adapter = files[d.name]
        sizes.append(path.stat().st_size)
        model = lowbit.load_values(lowbit.attach(base, lc), {k: t.values for k, t in adapter.tensors.items()})
        accs[d.name] = evaluate(model, d.x_test, d.y_test)
    if ort:
        ort_accs = _device_accs(model_path, {n: p for n, (p, _) in files.items()}, targets, backend, threads)
    adapter = next(iter(files.values()))[1]
    payload = sum(_payload(adapter, k) for k in adapter.tensors)
    scheme, bits = lc.codec
    return {
        "kind": kind,
        "method": lc.method,
        "scheme": scheme,
        "bits": bits,
        "dim": lc.dim,
        "head": lc.head,
        "seed": lc.seed,
        "params": int(sum(t.values.size for t in adapter.tensors.values())),
        "bytes": int(round(float(np.mean(sizes)))),
        "payload_bytes": int(payload),
        "mean_acc": float(np.mean(list(accs.values()))),
        "ort_mean_acc": float(np.mean(list(ort_accs.values()))) if ort_accs else None,
        "accs": accs,
    }


def _payload(adapter, name: str) -> int:
    from edge.format.quant import nbytes

    enc = adapter.encodings.get(name)
    return nbytes(enc) if enc is not None else int(adapter.tensors[name].values.nbytes)


def _device_accs(model_path: Path, files: dict, targets, backend: str, threads) -> dict[str, float]:
    from edge.runtime import Runtime

    out = {}
    with Runtime(model_path, backend=backend, threads=threads) as rt:
        for name, path in files.items():
            rt.load_adapter(path, name=name)
        for d in targets:
            rt.switch(d.name)
            rt.wait_settled()
            out[d.name] = float((rt.run({"pixels": d.x_test})["logits"].argmax(-1) == d.y_test).mean())
    return out


def _goals(rows: list[dict], dim: int, seed: int) -> dict:
    """1-bit vs fp32 bottleneck at every width (one seed), and at the main width over all seeds measured."""

    def pick(d, scheme, bits, sd=seed):
        key = ("adapter", d, scheme, bits, False, sd)
        found = [r for r in rows if (r["method"], r["dim"], r["scheme"], r["bits"], r["head"], r.get("seed")) == key]
        return found[0] if found else None

    def compare(one, full) -> dict:
        gap = 100.0 * (full["mean_acc"] - one["mean_acc"])
        return {
            "acc_gap_points": gap,
            "bytes_ratio": full["bytes"] / one["bytes"],
            "payload_ratio": full["payload_bytes"] / one["payload_bytes"],
        }

    per_dim = {}
    for d in sorted({r["dim"] for r in rows if r["method"] == "adapter"}):
        one, full = pick(d, "gq", 1), pick(d, "fp32", 32)
        if one and full:
            x = compare(one, full)
            per_dim[str(d)] = {**x, "met": x["acc_gap_points"] <= GOALS["acc_gap_points"] and x["bytes_ratio"] >= 25}
    seeds = sorted({r["seed"] for r in rows if r.get("seed") is not None and r["dim"] == dim})
    per_seed = {}
    for sd in seeds:
        one, full = pick(dim, "gq", 1, sd), pick(dim, "fp32", 32, sd)
        if one and full:
            per_seed[str(sd)] = compare(one, full)
    out: dict = {"dim": dim, "per_dim": per_dim, "per_seed": per_seed}
    if per_seed:
        gap = float(np.mean([x["acc_gap_points"] for x in per_seed.values()]))
        ratio = float(min(x["bytes_ratio"] for x in per_seed.values()))
        out.update(
            acc_gap_points=gap,
            bytes_ratio=ratio,
            met=gap <= GOALS["acc_gap_points"] and ratio >= GOALS["bytes_ratio"],
        )
    return out


def _device_costs(base_model: Path, main_1, main_32, targets, backend: str, threads) -> dict:
    """Load (parse + decode), switch and batch-1 inference of the main 1-bit adapters on the slot model."""
    from edge.format.adapter import adapter_from_bytes
    from edge.runtime import Runtime

    model_path, files = main_1
    blobs = {bits: f[targets[0].name][0].read_bytes() for bits, f in ((1, files), (32, main_32[1]))}
    load = {str(b): p50(time_calls(lambda b=b: adapter_from_bytes(blobs[b]), 50)) for b in blobs}
    one = targets[0].x_test[:1]
    with Runtime(model_path, backend=backend, threads=threads) as rt, Runtime(base_model, backend=backend) as plain:
        for name, (path, _) in files.items():
            rt.load_adapter(path, name=name)
        names, sw = list(files), []
        for i in range(8 * len(names)):
            t0 = time.perf_counter()
            rt.switch(names[i % len(names)])
            sw.append((time.perf_counter() - t0) * 1e3)
            rt.wait_settled()
        times = {"slots": [], "base": []}
        for _ in range(5):  # interleaved rounds so drift hits both alike
            times["slots"] += time_calls(lambda: rt.run({"pixels": one}), 40)
            times["base"] += time_calls(lambda: plain.run({"pixels": one}), 40)
        strategy = rt.strategy
    encs = files[targets[0].name][1].encodings
    return {
        "strategy": strategy,
        "load_ms_p50": load,
        "switch_ms_p50": p50(sw[len(names) :]),
        "infer_ms_p50": p50(times["slots"]),
        "base_infer_ms_p50": p50(times["base"]),
        "unpack": _unpack_tradeoff(encs),
    }


def _unpack_tradeoff(encs: dict) -> dict:
    """Load-time decode (numpy, once) against unpacking inside the graph (lookup-table Gather, every run).

    The in-graph variant keeps only the packed codes resident but pays the unpack on
    every inference; the load-time one holds float32 values. Both give identical values.
    """
    import onnxruntime as ort

    from edge.format.quant import decode

    proto = _lut_graph(encs)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {f"codes{i}": e.codes for i, e in enumerate(encs.values())}
    feeds.update({f"stats{i}": e.stats for i, e in enumerate(encs.values())})
    for got, e in zip(session.run(None, feeds), encs.values()):
        if not np.array_equal(got, decode(e)):
            raise AssertionError("in-graph lookup-table unpack differs from edge.format.quant.decode")
    return {
        "graph_unpack_ms_per_run_p50": p50(time_calls(lambda: session.run(None, feeds), 100)),
        "load_decode_ms_p50": p50(time_calls(lambda: [decode(e) for e in encs.values()], 100)),
        "packed_bytes": int(sum(e.codes.nbytes + e.stats.nbytes for e in encs.values())),
        "decoded_bytes": int(sum(4 * e.count for e in encs.values())),
    }


def _lut_graph(encs: dict):
    """ONNX graph: per tensor, uint8 codes -> Gather from a [256, 8 // bits] table of codes -> sigma * . + mu."""
    from onnx import TensorProto, helper, numpy_helper

    from edge.format.quant import codebook

    nodes, inputs, outputs, inits = [], [], [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    for i, e in enumerate(encs.values()):
        if e.scheme != "gq":
            raise ValueError(f"lookup-table unpack is written for the gq scheme, not {e.scheme!r}")
        per = 8 // e.bits
        table = codebook(e.bits)[(np.arange(256)[:, None] >> (np.arange(per) * e.bits)) & ((1 << e.bits) - 1)]
        inputs += [
            helper.make_tensor_value_info(f"codes{i}", TensorProto.UINT8, [e.codes.size]),
            helper.make_tensor_value_info(f"stats{i}", TensorProto.FLOAT, [2]),
        ]
        outputs.append(helper.make_tensor_value_info(f"w{i}", TensorProto.FLOAT, list(e.shape)))
        flat = np.array([0, e.count], np.int64)
        nodes += [
            helper.make_node("Cast", [f"codes{i}"], [f"idx{i}"], to=TensorProto.INT32),
            helper.make_node("Gather", [const(f"table{i}", table.astype(np.float32)), f"idx{i}"], [f"g{i}"]),
            helper.make_node("Reshape", [f"g{i}", const(f"all{i}", np.array([-1], np.int64))], [f"f{i}"]),
            helper.make_node("Slice", [f"f{i}", const(f"lo{i}", flat[:1]), const(f"hi{i}", flat[1:])], [f"s{i}"]),
            helper.make_node("Reshape", [f"s{i}", const(f"shape{i}", np.array(e.shape, np.int64))], [f"r{i}"]),
            helper.make_node("Gather", [f"stats{i}", const(f"one{i}", np.array(1, np.int64))], [f"sigma{i}"]),
            helper.make_node("Gather", [f"stats{i}", const(f"zero{i}", np.array(0, np.int64))], [f"mu{i}"]),
            helper.make_node("Mul", [f"r{i}", f"sigma{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"mu{i}"], [f"w{i}"]),
        ]
    model = helper.make_model(
        helper.make_graph(nodes, "unpack", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    return model


# -- report ---------------------------------------------------------------------------------------------------------


def markdown(r: dict) -> str:
    cfg, g, dev = r["config"], r["goals"], r["device"]
    u = dev["unpack"]
    lines = [
        f"Digits encoder (2 blocks, width 64), four target domains, one adapter per domain; {cfg['epochs']} epochs, "
        f"lr {cfg['lr']}, seed {cfg['seed']} at every precision. `bytes`: the saved adapter file (header included); "
        "`payload`: codes + statistics only. Accuracy: mean over the domains, torch and onnxruntime (same files). "
        "The gq/sign rows are trained at their precision (straight-through); the ComPEFT rows compress a trained "
        "fp32 adapter after the fact (transport), `@density (xM)`: kept fraction, and the multiple of the "
        "least-squares scale picked on each domain's train split (mean over domains).",
        "",
        "| rows | method | codec | dim | head | params | bytes | payload | mean acc | ORT mean acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        codec = (f"{x['scheme']} {x['bits']}-bit" if x["bits"] and x["bits"] < 32 else x["scheme"]) + (
            f" @{x['density']:g} (x{x['scale_multiple']:.2g})" if x.get("density") else ""
        )
        kind = f"seed {x['seed']}" if x["kind"] == "seed" else x["kind"]
        ort = f"{x['ort_mean_acc']:.2%}" if x["ort_mean_acc"] is not None else "-"
        pay = str(x["payload_bytes"]) if x["payload_bytes"] is not None else "-"
        lines.append(
            f"| {kind} | {x['method']} | {codec} | {x['dim'] if x['dim'] is not None else '-'} | "
            f"{'yes' if x['head'] else 'no'} | {x.get('params', '-')} | {x['bytes']} | {pay} | "
            f"{x['mean_acc']:.2%} | {ort} |"
        )
    lines += ["", f"1-bit vs fp32 bottleneck per width, seed {cfg['seed']} (goal: gap <= 1 point, file <= 1/25):", ""]
    lines += ["| dim | acc gap (points) | file ratio | payload ratio | met |", "|---|---|---|---|---|"]
    for d, x in g["per_dim"].items():
        lines.append(
            f"| {d} | {x['acc_gap_points']:+.2f} | {x['bytes_ratio']:.1f}x | {x['payload_ratio']:.1f}x | "
            f"{'yes' if x['met'] else 'no'} |"
        )
    if "met" in g:
        seeds = ", ".join(f"seed {k}: {x['acc_gap_points']:+.2f}" for k, x in g["per_seed"].items())
        lines += [
            "",
            f"Main width {g['dim']}, over {len(g['per_seed'])} seeds ({seeds}): fp32 minus 1-bit mean accuracy "
            f"{g['acc_gap_points']:+.2f} points, 1-bit file 1/{g['bytes_ratio']:.1f} of fp32: "
            f"**{'met' if g['met'] else 'not met'}** (goal: <= {GOALS['acc_gap_points']:g} point, >= "
            f"{GOALS['bytes_ratio']:g}x).",
        ]
    lines += [
        "",
        f"Device ({dev['strategy']} strategy), main 1-bit adapter: load (parse + decode) p50 "
        f"{dev['load_ms_p50']['1']:.3f} ms (fp32 file {dev['load_ms_p50']['32']:.3f} ms), switch p50 "
        f"{dev['switch_ms_p50']:.3f} ms, batch-1 inference p50 {dev['infer_ms_p50']:.3f} ms vs "
        f"{dev['base_infer_ms_p50']:.3f} ms for the plain base model.",
        "",
        f"Unpacking: decoding the 1-bit codes at load time (numpy) takes {u['load_decode_ms_p50']:.3f} ms once and "
        f"keeps {u['decoded_bytes']} bytes of float32 resident; unpacking them inside the graph (lookup-table "
        f"Gather, 1 thread) keeps {u['packed_bytes']} bytes but costs {u['graph_unpack_ms_per_run_p50']:.3f} ms on "
        f"every inference: load-time decoding (what the runtime does) pays for itself after "
        f"{math.ceil(u['load_decode_ms_p50'] / max(u['graph_unpack_ms_per_run_p50'], 1e-9))} inferences; the "
        "in-graph table only wins where resident memory per loaded adapter matters more than latency.",
        "",
    ]
    return "\n".join(lines)


def add_arguments(sp) -> None:
    d = LowbitBench()
    sp.add_argument("--dim", type=int, default=d.dim, help=f"bottleneck width of the main rows (default {d.dim})")
    sp.add_argument("--lora-dim", type=int, default=d.lora_dim, help=f"LoRA rank (default {d.lora_dim})")
    sp.add_argument("--epochs", type=int, default=d.epochs, help=f"training epochs (default {d.epochs})")
    sp.add_argument("--sweep-dims", type=int, nargs="*", default=list(d.sweep_dims), help="extra bottleneck widths")
    sp.add_argument("--seeds", type=int, nargs="+", default=list(d.goal_seeds), help="seeds of the 1-bit vs fp32 goal")
    sp.add_argument("--no-ort", action="store_true", help="skip the onnxruntime accuracy (torch only)")


def cli(args) -> int:
    import json

    from edge.commands import host_needed
    from edge.format.io import write_json
    from edge.machine import machine
    from lab.benchmarks import write_section

    host_needed("edge bench lowbit")
    cfg = LowbitBench(
        dim=args.dim,
        lora_dim=args.lora_dim,
        epochs=args.epochs,
        sweep_dims=tuple(args.sweep_dims),
        goal_seeds=tuple(args.seeds),
        ort=not args.no_ort,
    )
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    result = bench_lowbit(args.cache, cfg, backend=args.backend, threads=args.threads, progress=not args.quiet)
    result["machine"] = machine()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["load_avg_1min"] = {"start": load0, "end": os.getloadavg()[0]}
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)
    if args.md:
        body = markdown(result) + (
            f"\nRun took {result['seconds']:.0f} s ({result['trained_now']} adapters trained, the rest reused from the "
            f"cache); 1-min load average {load0:.1f} at start, "
            f"{result['load_avg_1min']['end']:.1f} at end (2 shared cores: timings are noisy).\n"
        )
        write_section(args.md, "lowbit", "Low-precision adapters (1-32 bits) and ComPEFT transport", body)
    return 0
