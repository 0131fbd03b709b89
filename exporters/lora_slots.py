"""Zero LoRA branches ("slots") on a model's linear layers, exported as writable inputs for PEFT LoRA adapters.

A slot is a ``lora_B(lora_A(x))`` branch beside an ``nn.Linear`` whose weights start at zero, so the
exported model computes exactly the base until a LoRA adapter's ``A`` and ``B`` are switched in
(``export_onnx(slots=...)``; :mod:`edge.convert.peft` maps a PEFT folder onto them). Host side: torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edge.errors import ConfigError

__all__ = ["add_lora_slots", "lora_slot_names"]


class _LoraSlotLinear(torch.nn.Linear):
    """``nn.Linear`` plus a LoRA branch ``lora_B(lora_A(x))`` whose weights start at zero (slots)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_B(self.lora_A(x))


def lora_slot_names(weight: str) -> tuple[str, str]:
    """Slot parameter names ``(A, B)`` of the LoRA branch on the linear weight ``X.weight``."""
    stem = weight.removesuffix(".weight")
    return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"


def add_lora_slots(model: torch.nn.Module, targets: Sequence[str], rank: int) -> list[str]:
    """Give every ``nn.Linear`` whose name ends with one of ``targets`` a zero LoRA branch of ``rank``.

    Targets match module names as PEFT's ``target_modules`` list does (exact name or
    ``.``-separated suffix). Returns the new slot parameter names (pass them to
    ``export_onnx(slots=...)``). Raises :class:`ConfigError` when a target matches nothing.
    """
    if rank < 1:
        raise ConfigError(f"lora rank must be >= 1, got {rank}")
    slots, hit = [], set()
    for name, mod in list(model.named_modules()):
        match = [t for t in targets if name == t or name.endswith("." + t)]
        if not match or type(mod) is not torch.nn.Linear:
            continue
        hit.update(match)
        mod.__class__ = _LoraSlotLinear
        mod.lora_A = torch.nn.Linear(mod.in_features, rank, bias=False)
        mod.lora_B = torch.nn.Linear(rank, mod.out_features, bias=False)
        torch.nn.init.zeros_(mod.lora_A.weight)
        torch.nn.init.zeros_(mod.lora_B.weight)
        slots += list(lora_slot_names(f"{name}.weight"))
    missing = [t for t in targets if t not in hit]
    if missing:
        raise ConfigError(f"lora slot targets {missing} match no nn.Linear module of the model; name module suffixes")
    return slots
