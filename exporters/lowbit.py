"""Low-precision, non-fusable adapters on the host: bottleneck (AdaptFormer) and LoRA, 1 to 32 bits.

Mirrors JieShibo/PETL-ViT ``binary_adapter``: every adapter matrix keeps a float
latent weight; the forward pass uses ``decode(encode(latent))`` of
:mod:`edge.quant` (computed in torch with the same float32 operations, so the
device decodes exactly what training saw) and gradients pass straight through the
rounding (identity STE) and into the per-matrix statistics.

* ``"adapter"``: ``x + mlp(ln2(x)) + s * up(relu(down(x)))`` in each chosen block
  (down ``d -> r``, up ``r -> d``, no biases, ``up`` initialised small, not zero:
  ``gq`` standardises each matrix and an all-zero one has no spread to learn from).
  Names: ``blocks.{i}.adapter.down.weight``, ``blocks.{i}.adapter.up.weight``.
* ``"lora"``: ``linear(x) + (alpha / r) * B(A(x))`` on chosen attention linears
  (``q`` and ``v`` by default). Names: ``blocks.{i}.attn.q.lora_A.weight``, ``...lora_B.weight``.
* ``head=True`` adds a quantized delta on the classifier weight, ``head.delta.weight``
  (no bias), the paper's "1-bit head" in delta form.

Base parameters keep their names and stay frozen. :func:`export_with_slots` exports the
model with the branch at zero (the base model's outputs) and the adapter parameters as
slots the device feeds; :func:`lowbit_adapter` packs a trained branch for the device.
:func:`slot_model` and :func:`train_domain` cache both next to the demo artifacts
(used by ``edge train`` and ``edge bench lowbit``). Host side only: this module imports torch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edge import quant
from edge.errors import ConfigError
from edge.registry import Registry

__all__ = [
    "ATTACH",
    "BottleneckAdapter",
    "LoRALinear",
    "LowbitConfig",
    "QLinear",
    "adapter_nbytes",
    "adapter_parameters",
    "adapter_stem",
    "attach",
    "export_with_slots",
    "fake_quant",
    "load_values",
    "lowbit_adapter",
    "set_quantize",
    "slot_model",
    "structure_key",
    "train_domain",
    "train_lowbit",
]


@dataclass(frozen=True)
class LowbitConfig:
    """What to attach and how to train it. ``bits=32`` means the ``fp32`` scheme whatever ``scheme`` says."""

    method: str = "adapter"  # "adapter" (bottleneck) or "lora"
    bits: int = 1
    scheme: str = "gq"  # "gq" or "sign" (1 bit)
    dim: int = 32  # bottleneck width or LoRA rank
    layers: tuple[int, ...] | None = None  # block indices; None: every block
    targets: tuple[str, ...] = ("q", "v")  # LoRA: attention linears to adapt
    scale: float = 1.0  # bottleneck output scale s; LoRA alpha / r
    head: bool = False  # also train a quantized delta on the classifier head
    epochs: int = 30
    lr: float = 2e-2
    weight_decay: float = 1e-4
    batch_size: int = 64
    seed: int = 0

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


# -- quantizer ------------------------------------------------------------------------------------------------------


class _NearestCode(torch.autograd.Function):
    """Forward: the nearest code (exactly the codebook value). Backward: identity (straight-through)."""

    @staticmethod
    def forward(ctx, w_hat: torch.Tensor, bounds: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        idx = torch.searchsorted(bounds, w_hat.detach().reshape(-1), right=True)
        return codes[idx].reshape(w_hat.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


def fake_quant(w: torch.Tensor, scheme: str, bits: int) -> torch.Tensor:
    """``edge.quant.decode(edge.quant.encode(w))`` in torch, with straight-through gradients.

    The statistics are computed in float64 and rounded to float32 and everything else
    runs in float32, operation for operation as :mod:`edge.quant` does.
    """
    if scheme == "fp32":
        return w
    if scheme == "gq":
        w64 = w.double()
        mu = w64.mean().float()
        sigma = (w64.std() if w.numel() > 1 else w64.sum() * 0).float()
        eps = torch.tensor(quant.EPS, dtype=torch.float32)
        w_hat = (w - mu) / (sigma + eps)
        codes = _NearestCode.apply(w_hat, torch.from_numpy(quant.thresholds(bits).copy()), _codebook(bits))
        return sigma * codes + mu
    if scheme == "sign":
        return _SignSTE.apply(w) * w.double().abs().mean().float()
    raise ConfigError(f"no torch quantizer for scheme {scheme!r}; known: gq, sign, fp32")


def _codebook(bits: int) -> torch.Tensor:
    return torch.from_numpy(quant.codebook(bits).copy())


class QLinear(nn.Module):
    """``y = x @ Q(W)^T``: a bias-free linear layer whose weight is fake-quantized."""

    def __init__(self, in_features: int, out_features: int, scheme: str, bits: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        self.scheme, self.bits = scheme, bits
        self.quantize = True  # off for export: the device feeds already decoded weights

    def small_init_(self) -> QLinear:
        """The reference's init for ``up``: truncated normal, std 1e-3, within +-2e-3."""
        nn.init.trunc_normal_(self.weight, std=1e-3, a=-2e-3, b=2e-3)
        return self

    def effective_weight(self) -> torch.Tensor:
        return fake_quant(self.weight, self.scheme, self.bits) if self.quantize else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())


# -- adapter modules ------------------------------------------------------------------------------------------------


class BottleneckAdapter(nn.Module):
    """AdaptFormer branch ``s * up(relu(down(x)))``, down ``d -> r`` and up ``r -> d`` without biases."""

    def __init__(self, d: int, r: int, scale: float = 1.0, scheme: str = "gq", bits: int = 1) -> None:
        super().__init__()
        self.down = QLinear(d, r, scheme, bits)
        self.up = QLinear(r, d, scheme, bits).small_init_()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(x))) * self.scale


class _AdaptedBlock(nn.Module):
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


class _AdaptedHead(nn.Module):
    """``head(f) + delta(f)``: a quantized delta on the classifier, base ``weight``/``bias`` kept by name."""

    def __init__(self, head: nn.Linear, scheme: str, bits: int) -> None:
        super().__init__()
        self.weight, self.bias = head.weight, head.bias
        self.delta = QLinear(head.in_features, head.out_features, scheme, bits).small_init_()

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.linear(f, self.weight, self.bias) + self.delta(f)


#: Low-bit methods: name -> ``fn(model, cfg)`` that adds the adapter modules in place.
ATTACH: Registry = Registry("low-bit adapter method")


@ATTACH.register("adapter")
def _attach_bottleneck(model: nn.Module, cfg: LowbitConfig) -> None:
    blocks = _blocks(model)
    for i in _layers(cfg, len(blocks)):
        block = blocks[i]
        if not all(hasattr(block, a) for a in ("ln1", "attn", "ln2", "mlp")):
            raise ConfigError(f"block {i} ({type(block).__name__}) lacks ln1/attn/ln2/mlp; not a pre-LN block")
        d = block.ln2.normalized_shape[0]
        scheme, bits = cfg.codec
        blocks[i] = _AdaptedBlock(block, BottleneckAdapter(d, cfg.dim, cfg.scale, scheme, bits))


@ATTACH.register("lora")
def _attach_lora(model: nn.Module, cfg: LowbitConfig) -> None:
    blocks = _blocks(model)
    scheme, bits = cfg.codec
    for i in _layers(cfg, len(blocks)):
        attn = blocks[i].attn
        for t in cfg.targets:
            base = getattr(attn, t, None)
            if not isinstance(base, nn.Linear):
                known = [n for n, m in attn.named_children() if isinstance(m, nn.Linear)]
                raise ConfigError(f"LoRA target {t!r} is not a linear layer of blocks.{i}.attn; choose from {known}")
            setattr(attn, t, LoRALinear(base, cfg.dim, cfg.scale, scheme, bits))


def attach(model: nn.Module, cfg: LowbitConfig) -> nn.Module:
    """A copy of ``model`` with the adapter of ``cfg`` attached; only the adapter parameters are trainable.

    The adapter starts near zero (``up``/``lora_B`` small), seeded by ``cfg.seed``.
    """
    cfg.check()
    adapted = copy.deepcopy(model).eval()
    for p in adapted.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        ATTACH.get(cfg.method)(adapted, cfg)
        if cfg.head:
            head = getattr(adapted, "head", None)
            if not isinstance(head, nn.Linear):
                raise ConfigError("head=True needs the model's classifier as an nn.Linear attribute named 'head'")
            adapted.head = _AdaptedHead(head, *cfg.codec)
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


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ConfigError(f"{type(model).__name__} has no 'blocks' ModuleList to attach adapters to")
    return blocks


def _layers(cfg: LowbitConfig, depth: int) -> list[int]:
    layers = list(range(depth)) if cfg.layers is None else list(cfg.layers)
    bad = [i for i in layers if not 0 <= i < depth]
    if bad or len(set(layers)) != len(layers) or not layers:
        raise ConfigError(f"layers {cfg.layers} must be distinct block indices in [0, {depth})")
    return layers


# -- training -------------------------------------------------------------------------------------------------------


def train_lowbit(
    model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: LowbitConfig = LowbitConfig(), progress: bool = True
) -> tuple[nn.Module, list[float]]:
    """Attach ``cfg``'s adapter to a copy of ``model`` and train it on ``(x, y)`` with cross-entropy.

    AdamW over the adapter parameters only (the base stays frozen and in eval mode),
    one-cycle cosine schedule with 10 % warm-up, quantization in every forward.
    Returns the adapted model (eval mode) and the mean loss of every epoch.
    """
    from tqdm.auto import tqdm

    adapted = attach(model, cfg)
    params = adapter_parameters(adapted)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    if len(xt) != len(yt) or not len(xt):
        raise ConfigError(f"x and y must be non-empty and of equal length, got {len(xt)} and {len(yt)}")
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(xt) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for _ in tqdm(range(cfg.epochs), desc=f"{cfg.method} {cfg.bits}-bit", disable=not progress, leave=False):
        total = 0.0
        for batch in torch.randperm(len(xt), generator=gen).split(cfg.batch_size):
            out = adapted(xt[batch])
            loss = F.cross_entropy(out[0] if isinstance(out, tuple) else out, yt[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(batch)
        losses.append(total / len(xt))
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
    """The trained branch of ``adapted`` as an :class:`edge.adapters.Adapter` for the model exported as ``info``.

    Every adapter matrix is encoded in the config's ``(scheme, bits)``; the adapter's
    dense values are the decoded float32 tensors, exactly what the forward pass used.
    ``fp32`` targets carry no encoding (the file stores their float32 values).
    """
    from edge.adapters import Adapter, DenseDelta

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


def adapter_nbytes(adapter) -> int:
    """Bytes of ``adapter`` as written by its ``save`` (the real file, header included)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return adapter.save(Path(tmp) / "a.safetensors").stat().st_size


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


# -- cached demo pipeline (shared by `edge train` and `edge bench lowbit`) --------------------------------------------


def structure_key(cfg: LowbitConfig) -> str:
    """What decides the exported graph: method, width, layers, LoRA targets, head (not bits or training)."""
    layers = "all" if cfg.layers is None else "_".join(map(str, cfg.layers))
    targets = "-" + "_".join(cfg.targets) if cfg.method == "lora" else ""
    return f"{cfg.method}-r{cfg.dim}-l{layers}{targets}{'-head' if cfg.head else ''}"


def adapter_stem(cfg: LowbitConfig, domain: str) -> str:
    """File stem of a trained adapter: readable fields plus a hash of the whole config."""
    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:8]
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
    from edge.adapters import load_adapter
    from exporters.digits_model import evaluate

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
