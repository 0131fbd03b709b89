"""``edge demo``: the main job on the embedded default (digits under domain shift).

The host half (pretrain, export, train adapters; needs torch) is cached; the device
half is what runs on a device: load the ONNX model on a backend, and for each target
domain switch its SHiRA adapter in fused mode and measure accuracy and latency.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edge.machine import p50

__all__ = ["evaluate_demo", "format_table"]


def evaluate_demo(
    model: Path,
    adapters: dict[str, Path],
    domains: dict,
    *,
    backend: str | None = None,
    strategy: str = "auto",
    threads: int | None = None,
    latency_runs: int = 100,
    lowbit_model: Path | None = None,
    lowbit_adapters: dict[str, Path] | None = None,
) -> dict:
    """Device half of the demo: accuracy per domain with and without its adapter, switch and inference latency.

    ``backend`` as :class:`edge.Runtime` takes it (None: the file's own engine; ``"auto"``: the fastest of the
    model's files here); ``result["backend"]`` is the engine that ran, ``result["engine"]`` why.
    """
    from edge.runtime import Runtime

    rt = Runtime(model, backend=backend, strategy=strategy, threads=threads)
    for name, path in adapters.items():
        rt.load_adapter(path, name=name)

    def accuracy(x: np.ndarray, y: np.ndarray) -> float:
        logits = rt.run({"pixels": x})["logits"]
        return float((logits.argmax(-1) == y).mean())

    rows, switch_ms = [], []
    for name in adapters:
        d = domains[name]
        rt.switch(None)
        base = accuracy(d.x_test, d.y_test)
        t0 = time.perf_counter()
        rt.switch(name)
        switch_ms.append((time.perf_counter() - t0) * 1e3)
        rt.wait_settled()
        rows.append({"name": name, "base_acc": base, "adapter_acc": accuracy(d.x_test, d.y_test)})
    clean = domains["clean"]
    rt.switch(None)
    rt.wait_settled()
    clean_acc = accuracy(clean.x_test, clean.y_test)

    # switch latency: cycle through the adapters a few times (first switch of each warms caches)
    names = list(adapters)
    for i in range(4 * len(names)):
        t0 = time.perf_counter()
        rt.switch(names[i % len(names)])
        switch_ms.append((time.perf_counter() - t0) * 1e3)
        rt.wait_settled()
    one = clean.x_test[:1]
    infer = []
    for _ in range(latency_runs + 5):
        t0 = time.perf_counter()
        rt.run({"pixels": one})
        infer.append((time.perf_counter() - t0) * 1e3)
    result = {
        "model": rt.info.name,
        "backend": rt.backend.name,
        "engine": rt.engine_choice.reason,
        "strategy": rt.strategy,
        "providers": rt.providers,
        "clean_acc": clean_acc,
        "domains": rows,
        "switch_ms_p50": p50(switch_ms[len(names) :]),
        "infer_ms_p50": p50(infer[5:]),
    }
    rt.close()
    for row in rows:
        row["shira_bytes"] = Path(adapters[row["name"]]).stat().st_size
    if lowbit_model is not None and lowbit_adapters:
        _lowbit_rows(rows, domains, lowbit_model, lowbit_adapters, backend, threads)
    return result


def _lowbit_rows(rows: list[dict], domains: dict, model: Path, adapters: dict[str, Path], backend, threads) -> None:
    """1-bit bottleneck adapters on the encoder exported with an empty branch (slots): accuracy and bytes."""
    from edge.runtime import Runtime

    with Runtime(model, backend=backend, threads=threads) as rt:
        for name, path in adapters.items():
            rt.load_adapter(path, name=name)
        for row in rows:
            d = domains[row["name"]]
            rt.switch(row["name"])
            logits = rt.run({"pixels": d.x_test})["logits"]
            row["lowbit_acc"] = float((logits.argmax(-1) == d.y_test).mean())
            row["lowbit_bytes"] = Path(adapters[row["name"]]).stat().st_size


def format_table(r: dict) -> str:
    lines = [
        f"model {r['model']} on {r['backend']} (strategy {r['strategy']}, providers {', '.join(r['providers'])})",
        f"clean-domain accuracy of the base model: {r['clean_acc']:.1%}",
        "",
        f"{'domain':<10} {'base acc':>9} {'SHiRA acc':>10} {'gain':>7} {'SHiRA B':>8} {'1-bit acc':>10} {'1-bit B':>8}",
    ]
    for d in r["domains"]:
        gain = d["adapter_acc"] - d["base_acc"]
        lb = f"{d['lowbit_acc']:>10.1%} {d['lowbit_bytes']:>8,}" if "lowbit_acc" in d else f"{'-':>10} {'-':>8}"
        lines.append(
            f"{d['name']:<10} {d['base_acc']:>9.1%} {d['adapter_acc']:>10.1%} {gain:>+7.1%} "
            f"{d.get('shira_bytes', 0):>8,} {lb}"
        )
    mean_b = np.mean([d["base_acc"] for d in r["domains"]])
    mean_a = np.mean([d["adapter_acc"] for d in r["domains"]])
    low = [d["lowbit_acc"] for d in r["domains"] if "lowbit_acc" in d]
    mean_l = f"{np.mean(low):>10.1%}" if low else f"{'-':>10}"
    lines += [
        f"{'mean':<10} {mean_b:>9.1%} {mean_a:>10.1%} {mean_a - mean_b:>+7.1%} {'':>8} {mean_l}",
        "SHiRA: sparse, fused into the weights (no inference cost)."
        + (
            " 1-bit: a width-256 bottleneck branch (packed codes + per-matrix stats), switched in the model's slots."
            if low
            else ""
        ),
        "",
        f"switch latency p50 {r['switch_ms_p50']:.3f} ms; inference latency p50 (batch 1) {r['infer_ms_p50']:.3f} ms",
    ]
    return "\n".join(lines)
