"""The int8 benches' shared body (issue 18): rows per demo encoder and for MiniLM, and the driver, on one backend.

:mod:`lab.bench_quantized` (onnxruntime) and :mod:`lab.bench_quantized_litert` (LiteRT) each describe their backend
in a :class:`QuantBackend` (its bases, how a model is quantized and read back, what a plain run and the memory probes
are) and render their own section; what they measure is built here, once, so the two rows keep one shape::

    {"model", "base", "bytes", "infer_ms_p50", "static_infer_ms_p50", "rss_mb", "plain_rss_mb", "switch_ms_p50",
     "mean_acc_base", "mean_acc_adapted", ...}    # MiniLM: "cosine_base", "cosine_adapted" instead of accuracy
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import ConfigError
from edge.machine import load_average
from edge.runtime import Runtime
from lab.bench_quantized_timing import paired_timings, switchable
from lab.benchmarks import default_targets, random_shira

__all__ = [
    "DEMO_FAMILIES",
    "GOALS",
    "INT_EPOCHS_X",
    "SENTENCES",
    "QuantBackend",
    "add_arguments",
    "cached_quantized",
    "goals",
    "calibration_set",
    "demo_rows",
    "emit",
    "family_options",
    "goal_lines",
    "judged",
    "measure",
    "measure_args",
    "minilm_rows",
    "requantized_cell",
    "rss_cell",
    "switch_cell",
    "timings",
]

DEMO_FAMILIES = ("vit", "cnn")
#: keys of a bases entry that are the bench's, not the quantizer's: the calibration set (:func:`calibration_set`),
#: and whether integer SHiRA trains with the static graph's activation grids in the loop
BENCH_KEYS = ("calib", "train_activations")
INT_EPOCHS_X = 1  # integer SHiRA trains this many times the fp32 recipe's epochs (1: the same recipe)
SENTENCES = [
    "An edge device adapts to drifting data.",
    "The sensor on the shop floor reports a new kind of vibration.",
    "Translate the manual into plain words for the night shift.",
    "A camera at the gate sees more rain than it did last week.",
    "Small models run on cheap boards without a network.",
    "The update arrived overnight and the pump kept running.",
    "Switching adapters costs less than loading another model.",
    "Quantized weights take a quarter of the memory.",
]


def _float_pixels(path: Path, x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x)


@dataclass(frozen=True)
class QuantBackend:
    """What one backend's int8 bench runs on (each callable imports its host-side libraries when called).

    Attributes:
        name: the :class:`~edge.runtime.Runtime` backend (``"onnxruntime"``, ``"tflite"``).
        bases: base name -> ``{"demo": options, "minilm": options}`` (None: the float model); a demo family's own key
            (``"vit"``) overrides ``"demo"``, and a value given per family is resolved by :func:`family_options`.
        quantize: ``(src, options, calib, check, store) -> (int8 file, report dict)``, cached.
        quantized_base: ``path -> (info, {param: exporters.qshira.QuantBase})``, what integer SHiRA trains on.
        activation_grid: ``path -> {param: OpGrid}``, the static graph's activation grids.
        minilm: ``(cache, progress) -> (float MiniLM file, feeds of SENTENCES)``.
        plain: ``(path, settled runtime, threads) -> (run(feeds), extra row fields)``, the plain engine compared with.
        memory: ``(path, feeds, threads) -> row fields`` (``rss_mb``, ``plain_rss_mb``, or why not measured).
        strategy: the strategy accuracy and cosine are measured on.
        builtin_strategy: also measure the adapted accuracy on this one (``mean_acc_adapted_builtin``).
        calib: the calibration set a bases entry without ``"calib"`` takes.
        pixels: ``(path, digits) -> feed`` (an int8 input quantizes them with its scale).
    """

    name: str
    bases: dict
    quantize: Callable
    quantized_base: Callable
    activation_grid: Callable
    minilm: Callable
    plain: Callable
    memory: Callable
    strategy: str
    builtin_strategy: str | None = None
    calib: str = "clean"
    pixels: Callable = _float_pixels

    def options(self, base: str, family: str) -> dict | None:
        """The bases entry for ``base`` on a demo ``family``, per-family values resolved."""
        entry = self.bases[base]
        return family_options(entry.get(family, entry["demo"]), family)


def family_options(opts: dict | None, family: str) -> dict | None:
    """A bases entry for one demo family: each value given per family (a dict keyed by every family) is its own."""
    if opts is None:
        return None
    return {k: v[family] if isinstance(v, dict) and set(v) == set(DEMO_FAMILIES) else v for k, v in opts.items()}


def calibration_set(domains: dict, kind: str, n: int = 512) -> np.ndarray:
    """Static quantization's calibration images: ``clean`` (the first ``n`` clean training digits) or ``domains``
    (``n`` drawn evenly from the clean and every shifted domain's training split: the inputs the device will see,
    so activation ranges cover inverted and noisy digits too; test splits are never used)."""
    if kind == "clean":
        return domains["clean"].x_train[:n]
    if kind != "domains":
        raise ConfigError(f"calibration set {kind!r}: known clean, domains")
    rng = np.random.default_rng(0)
    per = -(-n // len(domains))
    parts = [d.x_train[rng.permutation(len(d.x_train))[:per]] for d in domains.values()]
    return np.ascontiguousarray(np.concatenate(parts)[rng.permutation(per * len(domains))[:n]])


def cached_quantized(src: Path, fingerprint: str, opts: dict, version, store: Path, make: Callable):
    """``(int8 file, report dict)``: ``make(src, out, **options)`` once per float fingerprint, options and exporter
    ``version`` (the bench's own keys are in the cache key but not passed), its report kept beside the file."""
    blob = json.dumps([fingerprint, opts, version], sort_keys=True)
    out = store / f"{src.stem}.{opts['mode']}.{hashlib.sha256(blob.encode()).hexdigest()[:12]}{src.suffix}"
    report_path = out.with_suffix(".json")
    if not out.exists() or not report_path.exists():
        report = make(src, out, **{k: v for k, v in opts.items() if k not in BENCH_KEYS})
        report_path.write_text(json.dumps(report.as_dict()))
    return out, json.loads(report_path.read_text())


def _accuracy(be: QuantBackend, rt: Runtime, path: Path, d, name: str | None) -> float:
    rt.switch(name, clip=True)
    y = rt.run({"pixels": be.pixels(path, d.x_test)})["logits"]
    return float((y.argmax(1) == d.y_test).mean())


def _int_adapters(be: QuantBackend, path: Path, opts: dict, model, targets, cfg, domains) -> dict:
    """Integer SHiRA per domain trained on ``path``'s own grid (cached beside it, keyed on the trainer's version:
    ``exporters.qshira.TRAINER_VERSION``): domain -> adapter file."""
    import torch

    from exporters import shira
    from exporters.qshira import TRAINER_VERSION, int_shira_adapter, train_shira_int

    info, qbase = be.quantized_base(path)
    grids = be.activation_grid(path) if opts.get("train_activations") else None
    adapters = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread trains fastest on a shared machine
    try:
        for dn in cfg.domains:
            out = path.parent / f"{path.stem}.ishira{TRAINER_VERSION}-{dn}.safetensors"  # a new trainer: retrained
            if not out.exists():
                d = domains[dn]
                masks = shira.make_masks(
                    model, targets, density=cfg.density, kind=cfg.mask, calib=(d.x_train, d.y_train), seed=0
                )
                epochs = INT_EPOCHS_X * cfg.shira_epochs
                trained = train_shira_int(
                    model, masks, qbase, d.x_train, d.y_train, epochs=epochs, lr=cfg.shira_lr, activations=grids
                )
                meta = {"mask": cfg.mask, "density": cfg.density, "domain": dn, "epochs": epochs}
                int_shira_adapter(trained, info, dn, meta).save(out)
            adapters[dn] = out
    finally:
        torch.set_num_threads(threads)
    return adapters


def demo_rows(be: QuantBackend, family: str, cache: Path, bases: list[str], progress: bool) -> tuple[dict, dict]:
    """Accuracy rows per base for a demo encoder (integer SHiRA per domain on int8, cached), and the files."""
    from exporters import shira
    from lab import digits_model as dm
    from lab.datasets import load_domains
    from lab.pipeline import DemoConfig, prepare_demo

    cfg = DemoConfig(model=family)
    art = prepare_demo(cache, cfg, progress=progress, backend=be.name)
    domains = load_domains(cfg.domains, seed=cfg.seed)
    clean = domains["clean"]
    store = art.model.parent / "quantized"
    store.mkdir(exist_ok=True)
    model = dm.load_checkpoint(art.model.parent / "encoder.safetensors")
    targets = shira.select_targets(model, list(cfg.targets))
    rows, files = {}, {}
    for base in bases:
        row: dict = {"model": cfg.name, "base": base}
        opts = be.options(base, family)
        if opts is None:
            path, adapters = art.model, dict(art.adapters)
        else:
            calib = {"pixels": calibration_set(domains, opts.get("calib", be.calib))}
            path, row["quantization"] = be.quantize(art.model, opts, calib, {"pixels": clean.x_test[:64]}, store)
            adapters = _int_adapters(be, path, opts, model, targets, cfg, domains)
        with Runtime(path, backend=be.name, strategy=be.strategy) as rt:
            for dn, a in adapters.items():
                rt.load_adapter(a, name=dn)
            accs = {
                dn: (_accuracy(be, rt, path, domains[dn], None), _accuracy(be, rt, path, domains[dn], dn))
                for dn in cfg.domains
            }
            if opts is not None:  # the float path: fp32 adapters requantized onto this base at load
                clipped, req, nnz = 0, [], []
                for dn, a in art.adapters.items():
                    rt.load_adapter(a, name=f"{dn}-float", clip=True)
                    req.append(_accuracy(be, rt, path, domains[dn], f"{dn}-float"))
                    clipped += rt.clipped
                    nnz.append(rt.adapter(f"{dn}-float").nnz)
                row["mean_acc_requantized"] = float(np.mean(req))
                row["requantized_clipped_per_adapter"] = clipped / len(req)
                row["requantized_nnz"] = float(np.mean(nnz))  # entries per fp32 adapter, mean over domains
        if be.builtin_strategy is not None:  # e.g. what serves in a LiteRT hybrid runtime's settle window
            with Runtime(path, backend=be.name, strategy=be.builtin_strategy) as rt:
                for dn, a in adapters.items():
                    rt.load_adapter(a, name=dn)
                adapted = [_accuracy(be, rt, path, domains[dn], dn) for dn in cfg.domains]
            row["mean_acc_adapted_builtin"] = float(np.mean(adapted))
        row["mean_acc_base"] = float(np.mean([b for b, _ in accs.values()]))
        row["mean_acc_adapted"] = float(np.mean([a for _, a in accs.values()]))
        row["per_domain"] = {dn: {"base": b, "adapted": a} for dn, (b, a) in accs.items()}
        rows[base] = row
        files[base] = (path, {"pixels": be.pixels(path, clean.x_test[:1])})
    return rows, files


def minilm_rows(be: QuantBackend, cache: Path, bases: list[str], progress: bool) -> tuple[dict, dict]:
    """Embedding cosine to the fp32 model per base (base, and with one random float adapter on both)."""
    src, feeds = be.minilm(cache, progress)
    one = {k: np.ascontiguousarray(v[:1]) for k, v in feeds.items()}
    rows, files, ref = {}, {}, {}
    for base in bases:
        row: dict = {"model": "all-MiniLM-L6-v2", "base": base}
        path, opts = src, be.bases[base]["minilm"]
        if opts is not None:
            path, row["quantization"] = be.quantize(src, opts, feeds, feeds, src.parent)
        with Runtime(path, backend=be.name, strategy=be.strategy) as rt:
            info = rt.info
            a = random_shira(info, default_targets(info), 0.01, seed=1, name="A")
            if info.float_fingerprint is not None:  # the float adapter, for the float twin: requantized at load
                a = type(a)("A", info.float_fingerprint, a.tensors, a.shapes, info=a.info)
            rt.load_adapter(a, clip=True)
            embs = {"base": rt.run(feeds)["embeddings"]}
            rt.switch("A", clip=True)
            embs["adapted"] = rt.run(feeds)["embeddings"]
            row["adapter_clipped"] = rt.clipped
        if opts is None:
            ref = embs
        for k, e in embs.items():
            cos = (e * ref[k]).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref[k], axis=1)
            row[f"cosine_{k}"] = float(cos.mean())
        rows[base] = row
        files[base] = (path, one)
    return rows, files


def timings(be: QuantBackend, files: dict, threads: int | None, rounds: int, runs: int, switches: int) -> dict:
    """Per base: :func:`~lab.bench_quantized_timing.paired_timings` of the settled runtime against a plain run."""
    contestants, extra = {}, {}
    for base, (path, feeds) in files.items():
        rt = switchable(path, backend=be.name, threads=threads)
        plain, extra[base] = be.plain(path, rt, threads)
        contestants[base] = (rt, plain, feeds)
    out = paired_timings(contestants, rounds, runs, switches)
    for base, (path, _) in files.items():
        out[base].update(bytes=Path(path).stat().st_size, **extra[base])
    return out


def measure(
    be: QuantBackend,
    cache: Path,
    *,
    models: list[str],
    bases: list[str] | None,
    threads: int | None,
    rounds: int,
    runs: int,
    switches: int,
    memory: bool,
    progress: bool,
) -> list[dict]:
    """Every row: per model, its rows per base with their paired timings, the load, and (``memory``) resident MB."""
    bases = list(bases or be.bases)
    rows = []
    for m in models:
        if m == "minilm":
            rows_m, files = minilm_rows(be, cache, bases, progress)
        else:
            rows_m, files = demo_rows(be, m, cache, bases, progress)
        t = timings(be, files, threads, rounds, runs, switches)
        for b in bases:
            row = {**rows_m[b], **t[b], "load_1m": (load_average() or [None])[0]}
            if memory:
                row.update(be.memory(*files[b], threads))
            rows.append(row)
    return rows


def add_arguments(sp, bases: dict) -> None:
    """The bench's own flags (``edge bench quantized``, ``python -m lab.bench_quantized_litert``)."""
    sp.add_argument("--model", default="all", choices=["vit", "cnn", "minilm", "all"], help="model(s)")
    sp.add_argument("--bases", nargs="+", choices=list(bases), default=None, help="base precisions (default: all)")
    sp.add_argument("--rounds", type=int, default=11, help="timing rounds (contestants interleaved in each)")
    sp.add_argument("--runs", type=int, default=20, help="timed inferences per contestant per round")
    sp.add_argument("--no-memory", action="store_true", help="skip the resident-memory children")


def measure_args(be: QuantBackend, args, switches: int = 200) -> list[dict]:
    """:func:`measure` for parsed :func:`add_arguments` (and ``--cache``, ``--threads``, ``--quiet``). 200 switches
    per base: at 60 the 95 % interval of a 35 us switch's paired ratio spanned about +-0.09, too wide to judge a
    1.0 limit."""
    return measure(
        be,
        Path(args.cache),
        models=["vit", "cnn", "minilm"] if args.model == "all" else [args.model],
        bases=args.bases,
        threads=args.threads,
        rounds=args.rounds,
        runs=args.runs,
        switches=switches,
        memory=not args.no_memory,
        progress=not args.quiet,
    )


def emit(args, result: dict, section: tuple[str, str], render: Callable[[dict], str]) -> int:
    """Print the result (with the machine), write it to ``--json``, and its ``section`` of ``--md``."""
    from edge.format.io import write_json
    from edge.machine import machine
    from lab.benchmarks import write_section

    result["machine"] = machine()
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)
    if args.md:
        write_section(args.md, *section, render(result))
    return 0


def requantized_cell(r: dict) -> str:
    """The table cell of the fp32 adapters requantized onto an int8 base: mean accuracy (clipped of entries)."""
    if "mean_acc_requantized" not in r:
        return "-"
    return (
        f"{r['mean_acc_requantized']:.3f} ({r['requantized_clipped_per_adapter']:.0f} of {r['requantized_nnz']:,.0f})"
    )


def switch_cell(r: dict) -> str:
    """The table cell of the switch: its p50 right after settling (from caches evicted first, where measured)."""
    cold = r.get("switch_cold_ms_p50")
    return f"{r['switch_ms_p50']:.3f}" + ("" if cold is None else f" ({cold:.3f})")


def rss_cell(r: dict) -> str:
    """The table cell of resident memory: the switchable runtime's MB (a plain engine's; and with the runtime's
    session options where they differ from the engine's defaults, ``plain_options_rss_mb``)."""
    if r.get("rss_mb") is None:
        return "not measured"
    lean = r.get("plain_options_rss_mb")
    return f"{r['rss_mb']:.1f} ({r['plain_rss_mb']:.1f}" + ("" if lean is None else f"; {lean:.1f} no arena") + ")"


#: issue 18's limits: accuracy gap (points), inference overhead of the switchable runtime (%), switch x fp32
GOALS = {"acc_gap_points": 1.0, "infer_overhead_pct": 3.0, "switch_x": 1.0}


def goals(rows: list[dict]) -> dict:
    """The issue's goals per model and int8 base against fp32 of the same model, from figures measured in this run
    (both backends; the switch ratio paired within rounds where the row has it). The switch is judged twice where
    the row has both: right after settling (``switch_x_fp32``: from whatever each base's own rebuild left in the
    caches) and from caches evicted on every base alike (``switch_cold_x_fp32``, the switch's own cost; see
    :func:`lab.bench_quantized_timing.paired_timings`)."""
    out = {}
    by = {(r["model"], r["base"]): r for r in rows}
    for (model, base), r in by.items():
        f = by.get((model, "fp32"))
        if base == "fp32" or f is None:
            continue
        g = {}
        if "mean_acc_adapted" in r:
            gap = 100.0 * (f["mean_acc_adapted"] - r["mean_acc_adapted"])
            g["acc_gap_points"] = {"value": round(gap, 2), "limit": GOALS["acc_gap_points"], "met": gap <= 1.0}
        ov = r.get("infer_overhead_pct", 100.0 * (r["infer_ms_p50"] / r["static_infer_ms_p50"] - 1.0))
        g["infer_overhead_pct"] = judged(ov, GOALS["infer_overhead_pct"], r.get("infer_overhead_pct_spread"), 1)
        if r.get("rss_mb") is not None and f.get("plain_rss_mb") is not None:
            g["rss_below_fp32_plain"] = {"value": round(r["rss_mb"], 1), "limit": round(f["plain_rss_mb"], 1)}
            g["rss_below_fp32_plain"]["met"] = r["rss_mb"] < f["plain_rss_mb"]
        x = r.get("switch_x_fp32_paired", r["switch_ms_p50"] / f["switch_ms_p50"])  # paired within rounds
        g["switch_x_fp32"] = judged(x, GOALS["switch_x"], r.get("switch_x_fp32_spread"), 3)
        if "switch_cold_x_fp32_spread" in r:  # the same switch from the same cache state on every base
            cold = r["switch_cold_x_fp32_spread"]
            g["switch_cold_x_fp32"] = judged(cold["median"], GOALS["switch_x"], cold, 3)
        out[f"{model}/{base}"] = g
    return out


def judged(value: float, limit: float, spread: dict | None, digits: int) -> dict:
    """A paired goal's verdict: with the median's 95 % interval (``spread``, :func:`lab.bench_quantized_timing.spread`)
    it is met only when the whole interval is within ``limit``; an interval that crosses the limit is "within noise"
    (not met, whichever side the median is on); one wholly beyond it is "NOT met". Without an interval (a row of an
    older run): the value against the limit."""
    g = {"value": round(value, digits), "limit": limit, "met": value <= limit}
    if spread is not None:
        lo, hi = spread["ci95"]
        g.update(ci95=[round(lo, digits), round(hi, digits)], iqr=[round(v, digits) for v in spread["iqr"]])
        g["met"] = hi <= limit
        g["verdict"] = "met" if g["met"] else ("within noise" if lo <= limit else "NOT met")
    return g


def goal_lines(goals: dict) -> list[str]:
    """The section's goal list: one line per model and base, every goal's value, limit and verdict."""
    lines = ["", "Goals (issue 18), from this run's figures (paired goals: median, its 95 % interval):", ""]
    for k, g in goals.items():
        parts = ", ".join(
            f"{n} {v['value']}{_interval(v)} (limit {v['limit']}: {v.get('verdict', 'met' if v['met'] else 'NOT met')})"
            for n, v in g.items()
        )
        lines.append(f"- {k}: {parts}")
    return lines


def _interval(goal: dict) -> str:
    return f" [{goal['ci95'][0]}, {goal['ci95'][1]}]" if "ci95" in goal else ""
