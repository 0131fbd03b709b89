"""ComPEFT transport rows of ``edge bench lowbit``: compressed adapters, their bytes and accuracy.

ComPEFT (global or per-tensor top-k of the values, ternary signs and one scale) applied
after training to the fp32 bottleneck adapters and to the demo's SHiRA adapters (whose
indices ride along uncompressed). The scale is tuned like ComPEFT's alpha: multiples of
the least-squares scale (:data:`ALPHA_GRID`), picked on each domain's train split; the
accuracy is that of the reconstruction from the serialized bytes, on the test split, in torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["ALPHA_GRID", "compeft_rows", "shira_rows"]


#: ComPEFT tunes alpha on held-out data: multiples of the least-squares scale, picked on the domain's train split.
ALPHA_GRID = (0.5, 1.0, 1.5, 2.0, 3.0)


def _compeft_tuned(values: dict, density: float, scope: str, model, domain, passthrough=None):
    """The ComPEFT compression of ``values`` whose scale multiple (``ALPHA_GRID``) does best on the train split.

    ``model(ternary)`` builds the torch model that uses the decompressed values. Returns the
    compression and the chosen multiple.
    """
    from dataclasses import replace

    from edge.format.compress import compeft
    from lab.digits_model import evaluate

    t0 = compeft(values, density, passthrough=passthrough, scope=scope)
    best = None
    for mult in ALPHA_GRID:
        t = replace(t0, scales={k: v * mult for k, v in t0.scales.items()}, alpha=t0.alpha * mult)
        got = evaluate(model(t), domain.x_train, domain.y_train)
        if best is None or got > best[0]:
            best = (got, t, mult)
    return best[1], best[2]


def compeft_rows(base, files: dict, targets, densities, dim: int) -> list[dict]:
    """ComPEFT of the fp32 bottleneck adapters: transport bytes and accuracy of the reconstruction (torch)."""
    from edge.format.compress import SCOPES, decompress, from_bytes, to_bytes
    from exporters import lowbit
    from lab.digits_model import evaluate

    lc = lowbit.LowbitConfig("adapter", bits=32, dim=dim)
    rows = []
    for scope in SCOPES:
        for density in densities:
            accs, sizes, mults = {}, [], []
            for d in targets:
                values = {k: t.values for k, t in files[d.name][1].tensors.items()}

                def model(t):
                    return lowbit.load_values(lowbit.attach(base, lc), decompress(t))

                t, mult = _compeft_tuned(values, density, scope, model, d)
                blob = to_bytes(t, {"name": d.name})
                sizes.append(len(blob))
                mults.append(mult)
                accs[d.name] = evaluate(model(from_bytes(blob)[0]), d.x_test, d.y_test)
            rows.append(_compressed_row("adapter+compeft", dim, scope, density, sizes, accs, mults))
    return rows


def shira_rows(base, adapters: dict[str, Path], targets, densities) -> list[dict]:
    """The demo's SHiRA adapters as they are, and ComPEFT of their values (indices ride along uncompressed)."""
    from edge.format.adapter import load_adapter
    from edge.format.compress import SCOPES, decompress, from_bytes, to_bytes
    from exporters.shira import merge_shira
    from lab.digits_model import evaluate

    loaded = {d.name: load_adapter(adapters[d.name]) for d in targets}

    def merged(d, values: dict):
        a = loaded[d.name]
        return merge_shira(base, {k: (a.tensors[k].indices, values[k]) for k in a.tensors})

    plain = {
        d.name: evaluate(merged(d, {k: t.values for k, t in loaded[d.name].tensors.items()}), d.x_test, d.y_test)
        for d in targets
    }
    sizes = [adapters[d.name].stat().st_size for d in targets]
    first = next(iter(loaded.values()))
    rows = [
        {
            "kind": "shira",
            "method": "shira",
            "scheme": "fp32",
            "bits": 32,
            "dim": None,
            "head": False,
            "params": first.nnz,
            "bytes": int(round(float(np.mean(sizes)))),
            "payload_bytes": int(first.nnz * 8),
            "mean_acc": float(np.mean(list(plain.values()))),
            "ort_mean_acc": None,
            "accs": plain,
        }
    ]
    for scope in SCOPES:
        for density in densities:
            accs, sizes, mults = {}, [], []
            for d in targets:
                a = loaded[d.name]
                values = {k: t.values for k, t in a.tensors.items()}
                indices = {f"{k}.indices": t.indices for k, t in a.tensors.items()}

                def model(t, d=d, values=values):
                    return merged(d, {k: v for k, v in decompress(t).items() if k in values})

                t, mult = _compeft_tuned(values, density, scope, model, d, passthrough=indices)
                blob = to_bytes(t, {"name": d.name})
                sizes.append(len(blob))
                mults.append(mult)
                accs[d.name] = evaluate(model(from_bytes(blob)[0]), d.x_test, d.y_test)
            rows.append(_compressed_row("shira+compeft", None, scope, density, sizes, accs, mults))
    return rows


def _compressed_row(method: str, dim, scope: str, density: float, sizes, accs, mults) -> dict:
    return {
        "kind": "compeft",
        "method": method,
        "scheme": f"ternary/{scope}",
        "bits": None,
        "dim": dim,
        "head": False,
        "density": density,
        "scale_multiple": float(np.mean(mults)),  # of the least-squares scale, tuned on the train split
        "bytes": int(round(float(np.mean(sizes)))),
        "payload_bytes": None,
        "mean_acc": float(np.mean(list(accs.values()))),
        "ort_mean_acc": None,
        "accs": accs,
    }
