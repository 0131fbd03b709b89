"""Low-precision, non-fusable adapters on the host: bottleneck (AdaptFormer) and LoRA, 1 to 32 bits.

Mirrors JieShibo/PETL-ViT ``binary_adapter``: every adapter matrix keeps a float latent
weight; the forward pass uses ``decode(encode(latent))`` of :mod:`edge.format.quant`
(in torch, with the same float32 operations, so the device decodes exactly what
training saw); gradients pass straight through the rounding (identity STE).

Where branches go: ``LowbitConfig.modules``, patterns as :func:`exporters.shira.select_targets`.

* ``"adapter"``: ``s * up(relu(down(.)))`` (no biases; ``up`` starts small, not zero, so
  ``gq`` has a spread to learn from) beside each module, ``module(x) + branch(x)``
  (``placement="parallel"``, AdaptFormer: input width = output width, e.g. an MLP or a
  block), or after it, ``y + branch(y)`` for ``y = module(x)`` (``"serial"``). Widths come
  from the module's first and last Linear/Conv; on conv maps the branch acts on channels.
  Names: ``{module}.adapter.down.weight``, ``{module}.adapter.up.weight``.
* ``"lora"``: ``base(x) + (alpha / r) * B(A(x))`` on each chosen ``nn.Linear`` or 1x1 conv
  (default: all). Names: ``{module}.lora_A.weight``, ``{module}.lora_B.weight``.
* ``modules=None`` on a model with a ``blocks`` ModuleList of pre-LN blocks (the demo's ViT):
  the bottleneck reads each block's residual stream beside its MLP (``blocks.{i}.adapter...``),
  LoRA goes on ``targets`` of ``blocks.{i}.attn``; ``layers`` picks the blocks.
* ``head`` adds a quantized delta on the classifier, ``{head}.delta.weight`` ("1-bit head").

The branch modules and the structural helpers live in :mod:`exporters.lowbit_branches`.
Base parameters keep their names and stay frozen. :func:`export_with_slots` exports the
model with the branch at zero and the adapter parameters as slots the device feeds;
:func:`lowbit_adapter` packs a trained branch for the device. Host side only (torch).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edge.errors import ConfigError
from edge.format import quant
from edge.registry import Registry
from exporters.data import Loss, batches, check_reiterable, loss_value
from exporters.fakequant import QLinear, fake_quant
from exporters.lowbit_branches import (
    AdaptedBlock,
    AdaptedHead,
    BottleneckAdapter,
    LoRAConv,
    LoRALinear,
    add_branch,
    has_blocks,
    is_1x1_conv,
    module_widths,
    replace_module,
)
from exporters.shira import match_modules

__all__ = [
    "ATTACH",
    "BottleneckAdapter",
    "LoRALinear",
    "LowbitConfig",
    "QLinear",
    "LoRAConv",
    "adapter_parameters",
    "attach",
    "export_with_slots",
    "fake_quant",
    "load_values",
    "lowbit_adapter",
    "set_quantize",
    "train_lowbit",
]


@dataclass(frozen=True)
class LowbitConfig:
    """What to attach and how to train it. ``bits=32`` means the ``fp32`` scheme whatever ``scheme`` says."""

    method: str = "adapter"  # "adapter" (bottleneck) or "lora"
    bits: int = 1
    scheme: str = "gq"  # "gq" or "sign" (1 bit)
    dim: int = 32  # bottleneck width or LoRA rank
    layers: tuple[int, ...] | None = None  # blocks mode: block indices; None: every block
    targets: tuple[str, ...] = ("q", "v")  # blocks mode, LoRA: attention linears to adapt
    modules: tuple[str, ...] | str | None = None  # any model: module names/suffixes or a regex (see module doc)
    placement: str = "parallel"  # bottleneck beside the module ("parallel") or after it ("serial")
    scale: float = 1.0  # bottleneck output scale s; LoRA alpha / r
    head: bool | str = False  # also train a quantized delta on the classifier ("head", or the nn.Linear named so)
    epochs: int = 30
    lr: float = 2e-2
    weight_decay: float = 1e-4
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:  # lists from JSON/YAML become tuples: the config stays hashable
        for f in ("layers", "targets", "modules"):
            if isinstance(getattr(self, f), list):
                object.__setattr__(self, f, tuple(getattr(self, f)))

    @property
    def codec(self) -> tuple[str, int]:
        """``(scheme, bits)`` the adapter matrices are stored in."""
        return ("fp32", 32) if self.bits == 32 else (self.scheme, self.bits)

    def check(self) -> None:
        scheme, bits = self.codec
        s = quant.SCHEMES.get(scheme) if scheme in quant.SCHEMES else None
        if s is None or bits not in s.bits:
            allowed = {n: quant.SCHEMES.get(n).bits for n in quant.SCHEMES if n != "fp32"}
            raise ConfigError(f"scheme {self.scheme!r} at {self.bits} bits is not available; allowed: {allowed} or 32")
        if self.method not in ATTACH:
            raise ConfigError(f"unknown low-bit method {self.method!r}; known: {ATTACH.names()}")
        if self.dim < 1 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(
                f"need dim, epochs, batch_size >= 1 and lr > 0; got {self.dim}, {self.epochs}, {self.batch_size}, "
                f"{self.lr}"
            )
        if self.placement not in ("parallel", "serial"):
            raise ConfigError(f"placement {self.placement!r} is unknown; allowed: 'parallel', 'serial'")
        if self.modules is not None and self.layers is not None:
            raise ConfigError("layers selects blocks of a 'blocks' model; with modules=..., name the modules instead")


# -- where branches go ----------------------------------------------------------------------------------------------


#: Low-bit methods: name -> ``fn(model, cfg)`` that adds the adapter modules in place.
ATTACH: Registry = Registry("low-bit adapter method")


@ATTACH.register("adapter")
def _attach_bottleneck(model: nn.Module, cfg: LowbitConfig) -> None:
    scheme, bits = cfg.codec
    if cfg.modules is None and has_blocks(model):
        blocks = model.blocks
        for i in _layers(cfg, len(blocks)):
            block = blocks[i]
            if not all(hasattr(block, a) for a in ("ln1", "attn", "ln2", "mlp")):
                raise ConfigError(f"block {i} ({type(block).__name__}) lacks ln1/attn/ln2/mlp; not a pre-LN block")
            d = block.ln2.normalized_shape[0]
            blocks[i] = AdaptedBlock(block, BottleneckAdapter(d, cfg.dim, cfg.scale, scheme, bits))
        return
    serial = cfg.placement == "serial"
    widths = {n: module_widths(m) for n, m in model.named_modules() if n}
    fits = [n for n, w in widths.items() if w and (serial or w[0] == w[1])]
    if cfg.modules is None:
        raise ConfigError(
            f"{type(model).__name__} has no 'blocks' ModuleList: pass modules=[...] to place the bottleneck; "
            f"modules it fits ({cfg.placement}): {fits[:20]}"
        )
    for name in match_modules(model, cfg.modules, fits, what=f"{cfg.placement}-bottleneck-capable"):
        module, (_, d_out, channels_first) = model.get_submodule(name), widths[name]
        if hasattr(module, "adapter"):
            raise ConfigError(f"module {name!r} already has an attribute 'adapter'; attach once per module")
        add_branch(module, BottleneckAdapter(d_out, cfg.dim, cfg.scale, scheme, bits, channels_first), serial)


@ATTACH.register("lora")
def _attach_lora(model: nn.Module, cfg: LowbitConfig) -> None:
    fits = [n for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or is_1x1_conv(m))]
    if cfg.modules is None and has_blocks(model):  # the digits ViT: targets of blocks.{i}.attn
        names = [f"blocks.{i}.attn.{t}" for i in _layers(cfg, len(model.blocks)) for t in cfg.targets]
        names = match_modules(model, names, fits, what="nn.Linear")
    else:
        names = fits if cfg.modules is None else match_modules(model, cfg.modules, fits, what="nn.Linear or 1x1 conv")
    for name in names:
        base = model.get_submodule(name)
        lora = LoRALinear if isinstance(base, nn.Linear) else LoRAConv
        replace_module(model, name, lora(base, cfg.dim, cfg.scale, *cfg.codec))


def attach(model: nn.Module, cfg: LowbitConfig) -> nn.Module:
    """A copy of ``model`` with the adapter of ``cfg`` attached; only the adapter parameters are trainable.

    The adapter starts near zero (``up``/``lora_B`` small), seeded by ``cfg.seed``.
    """
    cfg.check()
    if cfg.layers is not None and not has_blocks(model):
        raise ConfigError(
            f"layers={cfg.layers} picks blocks of a 'blocks' ModuleList, which {type(model).__name__} "
            "lacks; name the modules with modules=[...] instead"
        )
    adapted = copy.deepcopy(model).eval()
    for p in adapted.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        ATTACH.get(cfg.method)(adapted, cfg)
        if cfg.head:
            name = "head" if cfg.head is True else str(cfg.head)
            head = dict(adapted.named_modules()).get(name)
            if not isinstance(head, nn.Linear):
                raise ConfigError(f"head={cfg.head!r} needs the model's classifier as an nn.Linear named {name!r}")
            replace_module(adapted, name, AdaptedHead(head, *cfg.codec))
    adapted.lowbit_config = cfg
    return adapted


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters of an :func:`attach`-ed model by stable name, in module order."""
    out = {}
    for mname, m in model.named_modules():
        if isinstance(m, QLinear):
            out[f"{mname}.weight"] = m.weight
    return out


def set_quantize(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch fake quantization of every :class:`QLinear` on or off (off: the latent float weights)."""
    for m in model.modules():
        if isinstance(m, QLinear):
            m.quantize = enabled
    return model


def _layers(cfg: LowbitConfig, depth: int) -> list[int]:
    layers = list(range(depth)) if cfg.layers is None else list(cfg.layers)
    bad = [i for i in layers if not 0 <= i < depth]
    if bad or len(set(layers)) != len(layers) or not layers:
        raise ConfigError(f"layers {cfg.layers} must be distinct block indices in [0, {depth})")
    return layers


# -- training -------------------------------------------------------------------------------------------------------


def train_lowbit(
    model: nn.Module,
    x,
    y: np.ndarray | None = None,
    cfg: LowbitConfig = LowbitConfig(),
    progress: bool = True,
    *,
    loss: Loss | None = None,
) -> tuple[nn.Module, list[float]]:
    """Attach ``cfg``'s adapter to a copy of ``model`` and train it on ``(x, y)`` arrays or the batches ``x``.

    Data and ``loss`` as :mod:`exporters.shira` takes them (arrays reshuffled every epoch;
    batches, with ``y=None``, from a sized re-iterable such as a list or a ``DataLoader``).
    AdamW over the adapter parameters only (the base stays frozen and in eval mode),
    one-cycle cosine schedule with 10 % warm-up, quantization in every forward.
    Returns the adapted model (eval mode) and the mean loss of every epoch.
    """
    from tqdm.auto import tqdm

    adapted = attach(model, cfg)
    params = adapter_parameters(adapted)
    check_reiterable(x, y, cfg.epochs)
    if y is not None:
        per_epoch = math.ceil(len(x) / cfg.batch_size)
    elif hasattr(x, "__len__"):
        per_epoch = len(x)
    else:
        raise ConfigError(f"the one-cycle schedule needs the number of batches: {type(x).__name__} has no len()")
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * per_epoch, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for _ in tqdm(range(cfg.epochs), desc=f"{cfg.method} {cfg.bits}-bit", disable=not progress, leave=False):
        total, seen = 0.0, 0
        for inputs, target, n in batches(x, y, cfg.batch_size, loss is None, gen):
            out = adapted(**inputs) if isinstance(inputs, Mapping) else adapted(*inputs)
            value = loss_value(loss, out, target)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            sched.step()
            total, seen = total + value.item() * n, seen + n
        losses.append(total / seen)
    return adapted.eval(), losses


# -- export ---------------------------------------------------------------------------------------------------------


def export_with_slots(
    adapted: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path,
    *,
    name: str,
    input_names: Sequence[str] = ("pixels",),
    output_names: Sequence[str] = ("logits", "features"),
    extra: Mapping[str, object] | None = None,
    progress: bool = True,
):
    """Export the base model plus an empty adapter branch; returns ``(ModelInfo, {slot name: shape})``.

    Every adapter parameter is zero in the exported file (so it computes the base
    model's outputs, which the export validation checks against torch) and is marked a
    slot: the device feeds the decoded float32 adapter values there.
    """
    from exporters.onnx import export_onnx

    empty = set_quantize(copy.deepcopy(adapted).eval(), False)
    slots = adapter_parameters(empty)
    with torch.no_grad():
        for p in slots.values():
            p.zero_()
    cfg = getattr(adapted, "lowbit_config", None)
    meta = dict(extra or {})
    if cfg is not None:
        meta["lowbit"] = {"method": cfg.method, "dim": cfg.dim, "layers": cfg.layers, "head": cfg.head}
        if cfg.modules is not None:
            meta["lowbit"].update(modules=cfg.modules, placement=cfg.placement)
    info = export_onnx(
        empty,
        tuple(example_inputs),
        path,
        input_names=input_names,
        output_names=output_names,
        name=name,
        extra=meta,
        slots=list(slots),
        progress=progress,
    )
    return info, {k: tuple(p.shape) for k, p in slots.items()}


def lowbit_adapter(adapted: nn.Module, info, name: str, meta: Mapping[str, object] | None = None):
    """The trained branch of ``adapted`` as an :class:`edge.format.adapter.Adapter` for the model exported as ``info``.

    Every adapter matrix is encoded in the config's ``(scheme, bits)``; the adapter's
    dense values are the decoded float32 tensors, exactly what the forward pass used.
    ``fp32`` targets carry no encoding (the file stores their float32 values).
    """
    from edge.format.adapter import Adapter, DenseDelta

    cfg: LowbitConfig = adapted.lowbit_config
    scheme, bits = cfg.codec
    tensors, encodings = {}, {}
    for pname, p in adapter_parameters(adapted).items():
        enc = quant.encode(p.detach().cpu().numpy(), scheme, bits)
        tensors[pname] = DenseDelta(quant.decode(enc))
        if scheme != "fp32":
            encodings[pname] = enc
    shapes = {k: tuple(d.values.shape) for k, d in tensors.items()}
    info_meta = {"scheme": scheme, "bits": bits, "dim": cfg.dim, **dict(meta or {})}
    return Adapter(name, info.fingerprint, tensors, shapes, method=cfg.method, info=info_meta, encodings=encodings)


def load_values(adapted: nn.Module, tensors: Mapping[str, np.ndarray]) -> nn.Module:
    """Write decoded adapter values (name -> float32, source layout) into ``adapted`` and stop fake-quantizing.

    The result computes what the device computes with those values (``Adapter.tensors``
    of a saved file, or a ComPEFT reconstruction).
    """
    params = adapter_parameters(adapted)
    if set(tensors) != set(params):
        raise ConfigError(f"values name {sorted(tensors)}, the model's adapter has {sorted(params)}")
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(torch.as_tensor(np.asarray(v, dtype=np.float32)).reshape(params[k].shape))
    return set_quantize(adapted, False)
