"""From which model size a switchable int8 runtime holds less resident memory than a plain fp32 session.

Issue 18's goal "a switchable int8 runtime's resident memory below a plain fp32 session's" is met on MiniLM (87 MB
of fp32 weights) and not on the demo encoders (under 0.5 MB), where what onnxruntime and the runtime cost per session
outweighs the weights. ``edge bench quantized`` (``--ladder``, on by default with ``--model all``) measures the sizes
between on a ladder of text encoders built the way a user would: transformers' ``BertConfig``/``BertModel`` with
random weights (:class:`LadderConfig`: vocabulary, positions, head width and FFN width fixed; hidden size and layers
per rung), exported by :func:`exporters.hf.export_hf_encoder` (mean pooling, fixed sequence length) and quantized
by the bench's own path with the options it is given (``edge bench quantized``: MiniLM's ``int8-dynamic`` recipe,
:data:`lab.bench_quantized.BASES`, through :func:`lab.bench_quantized.quantized_model`).
Files are cached under ``CACHE/bert-ladder-KEY`` (KEY: a hash of the config), their int8 twins beside them.

Per rung, resident MB from :func:`lab.bench_memory.bench_memory` (fresh children, every library's pages mapped
first, above a baseline child; one memory round, as the int8 rows above take): a plain onnxruntime session of the
fp32 file and of the int8 file, and a settled ``hybrid`` and a ``bound`` runtime on the int8 file after a switch
cycle (the fp32 file's ``hybrid`` too, in the JSON). The crossover (:func:`crossover`) is the smallest rung whose int8
hybrid runtime is below the plain fp32 session, with the largest rung that is not, and whether every rung above it is
below too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge.errors import ConfigError
from edge.format.io import write_json
from edge.machine import load_average

__all__ = ["LADDER", "LADDER_VERSION", "LadderConfig", "crossover", "ladder", "ladder_lines", "ladder_models"]

LADDER_VERSION = 1  # bumped when the same config builds other files
#: the rungs (hidden size, layers): about 0.5, 2, 3, 6 and 20 MB of fp32 weights with the default config. Measured
#: 2026-12-01 (load 6-10, one memory round each) the int8 hybrid runtime went below the plain fp32 session between
#: 2.0 and 3.0 MB (h128-l2: 5.7 vs 5.0 MB; h160-l2: 6.5 vs 7.2), and stayed below at 4.2, 5.9, 10.1, 20.1 and 42 MB.
#: Depth moves it (two sessions, each with its own per-node state): at 6 layers between 3.0 and 5.1 MB (h96-l6: 9.7
#: vs 8.2; h128-l6: 11.1 vs 13.1), at 12 layers between 5.5 and 9.6 MB (h96-l12: 15.8 vs 15.8; h128-l12: 18.6 vs 24.3)
LADDER = ((64, 1), (128, 2), (160, 2), (192, 3), (320, 4))


@dataclass(frozen=True)
class LadderConfig:
    """What every rung shares: the vocabulary, the positions (= the exported sequence length), the width of an
    attention head (heads = hidden // head_dim), the FFN's width as a multiple of the hidden size, the torch seed."""

    vocab: int = 1024
    seq_len: int = 64
    head_dim: int = 32
    ffn_x: int = 4
    seed: int = 0
    rungs: tuple[tuple[int, int], ...] = LADDER

    def __post_init__(self) -> None:
        bad = [(h, n) for h, n in self.rungs if h <= 0 or n <= 0 or h % self.head_dim]
        if bad or not self.rungs:
            raise ConfigError(
                f"ladder rungs {bad or 'none'}: each needs a positive hidden size that is a multiple of head_dim "
                f"{self.head_dim}, and at least one layer"
            )

    def key(self) -> str:
        """The cache folder's key: every field but the rungs (each rung is its own file in the folder)."""
        fields = {k: v for k, v in asdict(self).items() if k != "rungs"}
        return hashlib.sha256(json.dumps({"v": LADDER_VERSION, **fields}, sort_keys=True).encode()).hexdigest()[:12]

    def feeds(self, batch: int) -> dict[str, np.ndarray]:
        """Token ids drawn at random (no padding), the mask and the segment ids: ``[batch, seq_len]`` int64."""
        ids = np.random.default_rng(self.seed).integers(1, self.vocab, (batch, self.seq_len), dtype=np.int64)
        ones = np.ones_like(ids)
        return {"input_ids": ids, "attention_mask": ones, "token_type_ids": np.zeros_like(ids)}


def ladder_models(
    cache: Path, quantize: Callable, options: dict, cfg: LadderConfig, progress: bool
) -> list[tuple[str, Path, Path, dict]]:
    """``(name, fp32 file, int8 file, one-row feeds)`` per rung, exported once and quantized once by
    ``quantize(src, options, calib, check, store) -> (file, report)`` (cached by it beside the fp32 file)."""
    import torch
    from transformers import BertConfig, BertModel

    from exporters.hf import export_hf_encoder

    root = Path(cache) / f"bert-ladder-{cfg.key()}"
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "config.json", asdict(cfg))
    check = cfg.feeds(8)
    out = []
    for hidden, layers in cfg.rungs:
        name = f"bert-h{hidden}-l{layers}"
        src = root / f"{name}.onnx"
        if not src.exists():
            bert = BertConfig(
                vocab_size=cfg.vocab,
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=hidden // cfg.head_dim,
                intermediate_size=cfg.ffn_x * hidden,
                max_position_embeddings=cfg.seq_len,
            )
            torch.manual_seed(cfg.seed)
            export_hf_encoder(BertModel(bert).eval(), src, seq_len=cfg.seq_len, name=name, progress=progress)
        q, _ = quantize(src, options, None, check, root)
        out.append((name, src, q, {k: v[:1] for k, v in check.items()}))
    return out


def ladder(
    cache: Path,
    quantize: Callable,
    options: dict,
    *,
    base: str = "int8-dynamic",
    cfg: LadderConfig = LadderConfig(),
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Every rung's resident MB (see the module doc) on its int8 twin made by ``quantize`` with ``options`` (the
    bench's ``base``, named in the result), and the :func:`crossover`."""
    from lab.bench_memory import bench_memory

    def memory(path: Path, feeds: dict, strategies: list[str]) -> dict:
        return bench_memory(path, feeds, strategies=strategies, threads=threads, repeat=1, progress=False)

    rows = []
    for name, src, q, feeds in ladder_models(cache, quantize, options, cfg, progress):
        f = memory(src, feeds, ["hybrid"])
        i = memory(q, feeds, ["hybrid", "bound"])
        rows.append(
            {
                "model": name,
                "params": f["params"],
                "weights_mb": 4 * f["params"] / 2**20,  # every float32 initializer of the fp32 file
                "bytes_fp32": src.stat().st_size,
                "bytes_int8": q.stat().st_size,
                "plain_fp32_rss_mb": f["plain"]["rss_mb"],
                "hybrid_fp32_rss_mb": f["strategies"]["hybrid"]["rss_mb"],
                "plain_int8_rss_mb": i["plain"]["rss_mb"],
                "hybrid_int8_rss_mb": i["strategies"]["hybrid"]["rss_mb"],
                "bound_int8_rss_mb": i["strategies"]["bound"]["rss_mb"],
                "load_1m": (load_average() or [None])[0],
            }
        )
    rows.sort(key=lambda r: r["weights_mb"])
    config = {k: v for k, v in asdict(cfg).items() if k != "rungs"}
    return {"config": config, "base": base, "rows": rows, "crossover": crossover(rows)}


def crossover(rows: list[dict]) -> dict:
    """Over rows sorted by fp32 weights: the smallest whose int8 hybrid runtime is below the plain fp32 session
    (``below``, None if none is), the largest that is not (``not_below``, None if all are), and whether every row
    above ``below`` is below too (``monotone``)."""
    hits = [r["hybrid_int8_rss_mb"] < r["plain_fp32_rss_mb"] for r in rows]
    first = hits.index(True) if True in hits else None
    misses = [r for r, hit in zip(rows, hits) if not hit]

    def rung(r: dict | None) -> dict | None:
        return None if r is None else {"model": r["model"], "weights_mb": round(r["weights_mb"], 2)}

    return {
        "below": rung(None if first is None else rows[first]),
        "not_below": rung(misses[-1] if misses else None),
        "monotone": first is not None and all(hits[first:]),
    }


def ladder_lines(result: dict) -> list[str]:
    """The section's ladder table and its crossover line."""
    c = result["config"]
    lines = [
        "",
        "Where the switchable int8 runtime goes below a plain fp32 session (issue 18's memory goal): BERT encoders "
        f"with random weights (vocabulary {c['vocab']}, sequence {c['seq_len']}, attention heads {c['head_dim']} "
        f"wide, FFN {c['ffn_x']}x), exported by `exporters.hf` and quantized {result['base']} as MiniLM above; "
        "resident MB above a baseline process, libraries mapped first (`lab.bench_memory`, one fresh process each).",
        "",
        "| encoder | params | fp32 weights MB | resident MB: plain fp32 | plain int8 | hybrid int8 | bound int8 "
        "| hybrid int8 < plain fp32 | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        below = "yes" if r["hybrid_int8_rss_mb"] < r["plain_fp32_rss_mb"] else "no"
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['weights_mb']:.2f} | {r['plain_fp32_rss_mb']:.1f} "
            f"| {r['plain_int8_rss_mb']:.1f} | {r['hybrid_int8_rss_mb']:.1f} | {r['bound_int8_rss_mb']:.1f} "
            f"| {below} | {r['load_1m']} |"
        )
    x = result["crossover"]

    def rung(r: dict | None) -> str:
        return "none" if r is None else f"{r['model']} ({r['weights_mb']} MB of fp32 weights)"

    lines += [
        "",
        f"Smallest ladder model where hybrid int8 < plain fp32: {rung(x['below'])}; largest where it is not: "
        f"{rung(x['not_below'])}; every larger ladder model below too: {'yes' if x['monotone'] else 'no'}.",
    ]
    return lines
