"""The low-bit adapter branches as torch modules, and where they fit in a model (:mod:`exporters.lowbit`).

* :class:`BottleneckAdapter`: AdaptFormer's ``s * up(relu(down(.)))``, hooked beside or after a
  module by :func:`add_branch`, or read off the residual stream of a pre-LN block (:class:`AdaptedBlock`);
* :class:`LoRALinear` / :class:`LoRAConv`: ``base(x) + (alpha / r) * B(A(x))`` on a linear or 1x1 conv;
* :class:`AdaptedHead`: a quantized delta on the classifier.

Every adapter matrix is a :class:`exporters.fakequant.QLinear`; base weights keep their names.
Which modules get a branch, and the config, are :mod:`exporters.lowbit`'s. Host side only (torch).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from edge.errors import ConfigError
from exporters.fakequant import QLinear

__all__ = [
    "AdaptedBlock",
    "AdaptedHead",
    "BottleneckAdapter",
    "LoRAConv",
    "LoRALinear",
    "add_branch",
    "has_blocks",
    "is_1x1_conv",
    "module_widths",
    "replace_module",
]


class BottleneckAdapter(nn.Module):
    """AdaptFormer branch ``s * up(relu(down(x)))``, down ``d -> r`` and up ``r -> d`` without biases.

    ``channels_first``: ``x`` is a conv feature map ``[B, d, ...]`` and the branch acts on axis 1.
    """

    def __init__(
        self, d: int, r: int, scale: float = 1.0, scheme: str = "gq", bits: int = 1, channels_first: bool = False
    ) -> None:
        super().__init__()
        self.down = QLinear(d, r, scheme, bits)
        self.up = QLinear(r, d, scheme, bits).small_init_()
        self.scale = float(scale)
        self.channels_first = channels_first
        self.serial = False  # read the host module's output (serial) instead of its input (parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            return (self.up(F.relu(self.down(x.movedim(1, -1)))) * self.scale).movedim(-1, 1)
        return self.up(F.relu(self.down(x))) * self.scale


def _branch_hook(module: nn.Module, args: tuple, kwargs: dict, out):
    """Forward hook: add ``module.adapter`` of the module's input (parallel) or output (serial) to its output."""
    first = out[0] if isinstance(out, (tuple, list)) else out
    x = first if module.adapter.serial else (args[0] if args else next(iter(kwargs.values())))
    branch = module.adapter(x)
    if branch.shape[1:] != first.shape[1:]:  # a stride or a pool: same channels, another size (else a raw add error)
        raise ConfigError(
            f"a parallel bottleneck adds its branch of the input to the output, but this {type(module).__name__} maps "
            f"{tuple(x.shape[1:])} to {tuple(first.shape[1:])} per sample (a stride or a pooling): place it after "
            "the module (placement='serial') or on a module that keeps the shape"
        )
    y = first + branch
    return (y, *out[1:]) if isinstance(out, (tuple, list)) else y


class _SkipAdapter:
    """For containers whose forward iterates their children (nn.Sequential): ``adapter`` is a branch, not a layer."""

    def __iter__(self):
        return (m for k, m in self._modules.items() if k != "adapter")

    def __len__(self) -> int:
        return len(self._modules) - ("adapter" in self._modules)


def add_branch(module: nn.Module, adapter: BottleneckAdapter, serial: bool) -> None:
    """Hook ``adapter`` onto ``module``: ``module(x) + adapter(x)`` (parallel) or ``y + adapter(y)`` (serial).

    The adapter becomes ``module.adapter`` (so its parameters are named ``{module}.adapter...``);
    an ``nn.Sequential`` is given a subclass whose iteration skips it.
    """
    if isinstance(module, nn.Sequential):  # its forward runs every child: skip the branch
        module.__class__ = type(type(module).__name__, (_SkipAdapter, type(module)), {})
    module.adapter = adapter
    module.adapter.serial = serial
    module.register_forward_hook(_branch_hook, with_kwargs=True)


class AdaptedBlock(nn.Module):
    """A pre-LN transformer block with a bottleneck adapter in parallel to its MLP (reads the residual stream)."""

    def __init__(self, block: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = block.ln1, block.attn, block.ln2, block.mlp
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x)) + self.adapter(x)


class LoRALinear(nn.Module):
    """``linear(x) + (alpha / r) * lora_B(lora_A(x))``; keeps the base ``weight``/``bias`` under their names."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, scheme: str, bits: int) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = QLinear(base.in_features, rank, scheme, bits)
        self.lora_B = QLinear(rank, base.out_features, scheme, bits).small_init_()
        self.scaling = float(scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x)) * self.scaling


class LoRAConv(nn.Module):
    """LoRA on a 1x1 conv (no padding, one group): ``conv(x) + (alpha / r) * B(A(x[strided]))`` over channels.

    Keeps the base ``weight``/``bias`` under their names; ``lora_A`` is ``[r, in]``, ``lora_B`` ``[out, r]``.
    """

    def __init__(self, base: nn.modules.conv._ConvNd, rank: int, scaling: float, scheme: str, bits: int) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.stride = tuple(base.stride)
        self._conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.stride) - 1]
        self.lora_A = QLinear(base.in_channels, rank, scheme, bits)
        self.lora_B = QLinear(rank, base.out_channels, scheme, bits).small_init_()
        self.scaling = float(scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        strided = x[(slice(None), slice(None), *(slice(None, None, s) for s in self.stride))]
        branch = self.lora_B(self.lora_A(strided.movedim(1, -1))).movedim(-1, 1)
        return self._conv(x, self.weight, self.bias, self.stride) + branch * self.scaling


class AdaptedHead(nn.Module):
    """``head(f) + delta(f)``: a quantized delta on the classifier, base ``weight``/``bias`` kept by name."""

    def __init__(self, head: nn.Linear, scheme: str, bits: int) -> None:
        super().__init__()
        self.weight, self.bias = head.weight, head.bias
        self.delta = QLinear(head.in_features, head.out_features, scheme, bits).small_init_()

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.linear(f, self.weight, self.bias) + self.delta(f)


def has_blocks(model: nn.Module) -> bool:
    """Whether ``model`` has a non-empty ``blocks`` ModuleList (the demo's ViT layout)."""
    blocks = getattr(model, "blocks", None)
    return isinstance(blocks, nn.ModuleList) and len(blocks) > 0


def module_widths(module: nn.Module) -> tuple[int | None, int, bool] | None:
    """``(input width, output width, channels first)`` from the module's first and last Linear/Conv/Embedding.

    None when it has none, or they disagree on the layout (conv in, linear out); an embedding has no input width.
    """
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd))]
    conv = [isinstance(m, nn.modules.conv._ConvNd) for m in layers[:1] + layers[-1:]]
    if not layers or conv[0] != conv[-1]:
        return None
    first, last = layers[0], layers[-1]
    d_in = getattr(first, "in_features", getattr(first, "in_channels", None))
    return (
        d_in,
        getattr(last, "out_features", getattr(last, "out_channels", getattr(last, "embedding_dim", 0))),
        conv[0],
    )


def is_1x1_conv(m: nn.Module) -> bool:
    """Whether ``m`` is a 1x1 conv without padding or groups (what :class:`LoRAConv` adapts)."""
    if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or isinstance(m.padding, str) or m.groups != 1:
        return False
    return all(k == 1 for k in m.kernel_size) and all(p == 0 for p in m.padding)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``model`` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
