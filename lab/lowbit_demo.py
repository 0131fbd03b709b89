"""The demo's cached low-bit pipeline (shared by `edge train` and `edge bench lowbit`), on the digits encoder.

Built on the general host API of :mod:`exporters.lowbit`: one slot model per adapter
structure, exported once, and one trained adapter file per (config, domain), both
cached under a root folder and reused when present. Host side only: imports torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from exporters.lowbit import LowbitConfig, attach, export_with_slots, lowbit_adapter, train_lowbit

__all__ = ["adapter_nbytes", "adapter_stem", "slot_model", "structure_key", "train_domain"]


def structure_key(cfg: LowbitConfig) -> str:
    """What decides the exported graph: method, width, layers, LoRA targets, modules, placement, head.

    Not bits or training. Configs with the fields' defaults keep the keys they had before
    ``modules``/``placement`` existed, so cached files stay valid.
    """
    layers = "all" if cfg.layers is None else "_".join(map(str, cfg.layers))
    targets = "-" + "_".join(cfg.targets) if cfg.method == "lora" else ""
    if cfg.modules is not None:
        blob = json.dumps([cfg.modules, cfg.placement]).encode()
        targets += f"-m{hashlib.sha256(blob).hexdigest()[:6]}"
    head = "" if not cfg.head else "-head" if cfg.head is True else f"-head_{cfg.head}"
    return f"{cfg.method}-r{cfg.dim}-l{layers}{targets}{head}"


def adapter_stem(cfg: LowbitConfig, domain: str) -> str:
    """File stem of a trained adapter: readable fields plus a hash of the whole config."""
    fields = asdict(cfg)
    for key, default in (("modules", None), ("placement", "parallel")):  # keep pre-existing stems stable
        if fields[key] == default:
            del fields[key]
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    scheme, bits = cfg.codec
    codec = scheme if scheme == "fp32" else f"{scheme}{bits}"
    return f"{structure_key(cfg)}-{codec}-{domain}-{h}"


def slot_model(root, model: nn.Module, cfg: LowbitConfig, example, progress: bool = True):
    """``root/slots-<structure>.onnx``: the base model with ``cfg``'s empty branch, exported once and reused."""
    from exporters.onnx import load_model_info

    path = Path(root) / f"slots-{structure_key(cfg)}.onnx"
    if path.exists():
        return path, load_model_info(path)
    info, _ = export_with_slots(
        attach(model, cfg),
        (torch.as_tensor(example),),
        path,
        name=f"digits-vit+{structure_key(cfg)}",
        extra={"task": "digits", "labels": list(range(10)), "input": "pixels [B,1,8,8] float32 in [0,1]"},
        progress=progress,
    )
    return path, info


def train_domain(root, model: nn.Module, cfg: LowbitConfig, domain, info, progress: bool = True):
    """Train (or reuse from ``root``) ``cfg``'s adapter on ``domain``; returns ``(path, Adapter)``.

    The adapter's ``info`` records the host accuracy (fake-quantized torch forward) on the domain's test split.
    """
    from edge.format.adapter import load_adapter
    from lab.digits_model import evaluate

    path = Path(root) / f"{adapter_stem(cfg, domain.name)}.safetensors"
    if path.exists():
        adapter = load_adapter(path)
        if adapter.base_fingerprint == info.fingerprint:
            return path, adapter
    adapted, losses = train_lowbit(model, domain.x_train, domain.y_train, cfg, progress=progress)
    meta = {"domain": domain.name, "host_acc": evaluate(adapted, domain.x_test, domain.y_test)}
    meta.update(epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed, final_loss=round(losses[-1], 5))
    adapter = lowbit_adapter(adapted, info, domain.name, meta)
    adapter.save(path)
    return path, adapter


def adapter_nbytes(adapter) -> int:
    """Bytes of ``adapter`` as written by its ``save`` (the real file, header included)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return adapter.save(Path(tmp) / "a.safetensors").stat().st_size
