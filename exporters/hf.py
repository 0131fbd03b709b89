"""Export Hugging Face encoders (BERT family, ViT, ResNet, ...) as pooled embedders, validated, offline.

:func:`export_hf_encoder` takes a local model directory (a ``transformers`` or
sentence-transformers checkpoint) or an already-built ``transformers`` model, wraps it
as :class:`PooledEncoder` (encoder -> pooling -> optional L2 normalisation, the recipe of
sentence-transformers' ``Pooling`` and ``Normalize`` modules) and exports it with
:func:`exporters.onnx.export_onnx`, so the file is checked against torch before it is
written. Each supported architecture (:data:`ARCHITECTURES`) is pooled the way it defines
its embedding: the model's own ``pooler_output`` for CNNs and Swin, the CLS token for ViT,
DeiT and Dinov2, mean over the attention mask for text (or what sentence-transformers says).
Another architecture is refused unless ``pooling`` is given, never pooled by guess. Audio encoders (wav2vec2 family,
Whisper's encoder, AST) export given ``pooling``: their example inputs come from :mod:`exporters.hf_audio`.
Parameter names keep the Hugging Face names behind the model's ``base_model_prefix``
(``bert.encoder.layer.0.attention.self.query.weight``), the same names HF task models use,
so adapters trained with PEFT map onto them by suffix (:mod:`edge.convert.peft`).

A text model's ``tokenizer.json`` is copied next to the ONNX file
(``NAME.tokenizer.json``) and named in the metadata, so :mod:`edge.text` tokenizes on the
device with the ``tokenizers`` library only. ``lora_slots`` adds zero LoRA branches
(``X.lora_A.weight``, ``X.lora_B.weight``) to chosen linear layers, exported as slots so
PEFT LoRA adapters can be switched in as branches. Host side only: imports torch.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from edge.errors import ConfigError, ExportValidationError, FormatError, RegistryError
from edge.format.io import atomic_write_bytes, load_json, read_bounded
from edge.format.modelinfo import ModelInfo
from exporters.hf_audio import AUDIO_INPUTS, audio_example
from exporters.hf_checks import check_seq_len, check_settings, check_weights, image_side, load_checkpoint, read_storages
from exporters.hf_pool import check_encoder, check_tokens
from exporters.hf_settings import sentence_transformers_settings
from exporters.hf_unused import drop_unread, prepare, say_dropped, unused_refusal
from exporters.lora_slots import add_lora_slots, lora_slot_names
from exporters.onnx import ATTENTION, export_onnx

__all__ = [
    "PooledEncoder",
    "TextEncoder",
    "VisionEncoder",
    "AudioEncoder",
    "POOLINGS",
    "ARCHITECTURES",
    "register_architecture",
    "export_hf_encoder",
    "load_hf_encoder",
    "add_lora_slots",
    "lora_slot_names",
]

log = logging.getLogger(__name__)

POOLINGS = ("mean", "cls", "pooler", "none")
_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_EXAMPLE_TEXT = "A small model adapts to new data on the edge device."

#: ``config.model_type`` -> the pooling that gives the architecture's embedding (the default ``pooling``).
ARCHITECTURES: dict[str, str] = {}


def register_architecture(model_type: str, pooling: str) -> None:
    """Declare how ``model_type`` defines its embedding, so :func:`export_hf_encoder` exports it by default."""
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling {pooling!r} is not supported; allowed: {', '.join(POOLINGS)}")
    if model_type in ARCHITECTURES:
        raise RegistryError(
            f"architecture {model_type!r} is already registered (pooling {ARCHITECTURES[model_type]!r})"
        )
    ARCHITECTURES[model_type] = pooling


for _types, _pooling in (
    (("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "albert", "electra"), "mean"),  # sentence-transformers
    (("vit", "deit", "dinov2"), "cls"),  # the CLS token after the final LayerNorm
    (("swin", "convnext", "resnet", "regnet", "mobilenet_v2", "efficientnet", "mobilevit"), "pooler"),
):
    for _type in _types:
        register_architecture(_type, _pooling)

#: text models whose position ids start after the padding index (RoBERTa's ``create_position_ids_from_input_ids``)
_PADDED_POSITIONS = ("roberta", "xlm-roberta", "mpnet", "camembert")


class PooledEncoder(torch.nn.Module):
    """A ``transformers`` encoder + pooling + optional L2 normalisation, with plain tensor inputs.

    Build one with :meth:`wrap`, which picks :class:`TextEncoder` (``input_ids``,
    ``attention_mask`` [, ``token_type_ids``]) or :class:`VisionEncoder` (``pixel_values``).
    ``forward`` returns ``(embeddings,)``: ``[batch, hidden]`` pooled, or ``[batch, tokens,
    hidden]`` with ``pooling="none"`` (then left for the caller to pool and normalise).
    Mean pooling over text weighs tokens by the attention mask (sentence-transformers'
    ``pooling_mode_mean_tokens``); over images it averages all tokens. ``pooler`` takes the
    model's own ``pooler_output`` (flattened: ResNet's is ``[batch, C, 1, 1]``). ``mean`` and
    ``cls`` need a token sequence; a model that returns a feature map is refused.
    """

    modality = ""
    input_names: tuple[str, ...] = ()

    def __init__(self, backbone: torch.nn.Module, *, pooling: str = "mean", normalize: bool = False) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling {pooling!r} is not supported; allowed: {', '.join(POOLINGS)}")
        self.prefix = getattr(backbone, "base_model_prefix", "") or "encoder"
        self.add_module(self.prefix, backbone)
        self.pooling, self.normalize = pooling, bool(normalize)

    @staticmethod
    def wrap(backbone: torch.nn.Module, **kwargs) -> PooledEncoder:
        """A :class:`TextEncoder` or :class:`VisionEncoder`, after what ``backbone.forward`` accepts."""
        accepted = _forward_args(backbone)
        if "pixel_values" in accepted:
            return VisionEncoder(backbone, **kwargs)
        if "input_ids" in accepted:
            enc = TextEncoder(backbone, **kwargs)
            enc.input_names = tuple(n for n in _TEXT_INPUTS if n in accepted)
            return enc
        if name := next((n for n in AUDIO_INPUTS if n in accepted), None):
            enc = AudioEncoder(backbone, **kwargs)
            enc.input_names = (name,)
            return enc
        raise ConfigError(
            f"{type(backbone).__name__}.forward takes neither input_ids nor pixel_values nor "
            f"{' or '.join(AUDIO_INPUTS)} (it takes {', '.join(list(accepted)[:3])}): export_hf_encoder handles text, "
            "vision and audio encoders; "
            "wrap it in a torch module that pools its last_hidden_state and export that with exporters.export_onnx"
        )

    def _pool(self, outputs, mask: torch.Tensor | None):
        if self.pooling == "pooler":
            pooled = getattr(outputs, "pooler_output", None)
            if pooled is None:
                raise ConfigError(
                    f"{type(getattr(self, self.prefix)).__name__} returns no pooler_output; "
                    "choose pooling='mean' or 'cls' (CLI: --pooling mean|cls), or a model built with its pooling layer"
                )
            out = pooled.flatten(1)
            return (torch.nn.functional.normalize(out, p=2, dim=-1) if self.normalize else out,)
        hidden = getattr(outputs, "last_hidden_state", None)
        check_tokens(type(getattr(self, self.prefix)).__name__, self.pooling, hidden, mask, outputs)
        if self.pooling == "cls":
            out = hidden[:, 0]
        elif self.pooling == "mean" and mask is not None:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            out = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        elif self.pooling == "mean":
            out = hidden.mean(dim=1)
        else:
            return (hidden,)
        return (torch.nn.functional.normalize(out, p=2, dim=-1) if self.normalize else out,)


class TextEncoder(PooledEncoder):
    modality = "text"
    input_names = _TEXT_INPUTS

    def forward(self, input_ids, second=None, third=None):  # input_names' order: FNet's second is token_type_ids
        kwargs = dict(zip(self.input_names, (input_ids, second, third)[: len(self.input_names)], strict=True))
        return self._pool(getattr(self, self.prefix)(**kwargs), kwargs.get("attention_mask"))


class VisionEncoder(PooledEncoder):
    modality = "vision"
    input_names = ("pixel_values",)

    def forward(self, pixel_values):
        return self._pool(getattr(self, self.prefix)(pixel_values=pixel_values), None)


class AudioEncoder(PooledEncoder):
    """A waveform's or spectrogram's encoder (``input_values`` or ``input_features``: :mod:`exporters.hf_audio`)."""

    modality = "audio"
    input_names = ("input_values",)

    def forward(self, audio):
        return self._pool(getattr(self, self.prefix)(**{self.input_names[0]: audio}), None)


def load_hf_encoder(model_dir: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """Load a local ``transformers`` encoder without network access, and what sentence-transformers says of it.

    Returns ``(model, settings)`` where ``settings`` may hold ``pooling``, ``normalize`` and
    ``max_seq_length`` read from a sentence-transformers layout (``modules.json``), and holds ``unloaded``: the
    weights the checkpoint lacked or held in another shape (:func:`exporters.hf_checks.load_checkpoint`).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FormatError(f"{model_dir} has no config.json; give a local Hugging Face model directory")
    config = load_json(read_bounded(model_dir / "config.json", 64 << 20, what="config.json"), source="config.json")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ConfigError(  # transformers' AutoModel picks the class by it; without it, a ValueError traceback
            f'{model_dir / "config.json"} has no "model_type" (e.g. "bert", "vit"): give the folder of a '
            "transformers checkpoint (save_pretrained writes it), or add the key naming its architecture"
        )
    model, report = load_checkpoint(AutoModel, model_dir)  # report: weights the checkpoint did not fill
    return model, {**sentence_transformers_settings(model_dir), **report}


def export_hf_encoder(
    model: str | os.PathLike | torch.nn.Module,
    path: str | os.PathLike,
    *,
    pooling: str | None = None,
    normalize: bool | None = None,
    seq_len: int | None = None,
    dynamic_seq: bool = False,
    image_size: int | None = None,
    audio_length: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    lora_slots: Sequence[str] = (),
    lora_rank: int = 8,
    name: str | None = None,
    extra: Mapping[str, object] | None = None,
    file_format: str = "onnx",
    attention: str | None = None,
    **kwargs,
) -> ModelInfo:
    """Export a Hugging Face encoder as a pooled embedder to ``path`` (validated on onnxruntime).

    Args:
        model: a local model directory or a ``transformers`` model (``BertModel``, ``ViTModel``...).
        pooling: ``mean``, ``cls``, ``pooler`` (the model's ``pooler_output``) or ``none``; default: the
            sentence-transformers setting when the directory has one, else the architecture's own
            (:data:`ARCHITECTURES`); an architecture not listed there needs it given.
        normalize: L2-normalise the output; default: whether sentence-transformers does.
        seq_len: example (and, unless ``dynamic_seq``, fixed) sequence length for text (128); longer texts are
            truncated there (sentence-transformers truncates at ``max_seq_length``: use ``dynamic_seq`` to match).
        image_size: example (and fixed) image side for vision (default: the model config's ``image_size``, else 224).
        audio_length: samples of a waveform encoder's (fixed) input, default 16000 (:mod:`exporters.hf_audio`).
        tokenizer: a ``tokenizer.json`` to ship beside the model (default: the directory's).
        lora_slots, lora_rank: module-name suffixes that get zero LoRA branches exported as slots.
        name: model name in the metadata (default: the directory or class name).
        extra: more JSON metadata; other keyword arguments go to the exporter.
        file_format: ``onnx`` (:func:`exporters.onnx.export_onnx`, the default) or ``tflite``
            (:func:`exporters.tflite.export_tflite`, needs the litert-torch converter; fixed shapes).
        attention: ``fused`` (one ai.onnx Attention node a layer, opset 23: onnxruntime >= 1.23) or
            ``decomposed`` (MatMul/Softmax, opset 20), see :data:`exporters.onnx.ATTENTION`; default: fused for
            text encoders exported to ONNX, decomposed otherwise (Swin's windowed attention does not trace
            through SDPA). Recorded in the metadata as ``extra["attention"]``.

    Raises:
        ConfigError: an architecture with no known pooling and none given, a pooling that does not fit
            the model's output, ``seq_len`` beyond the model's position embeddings, or a setting the model's kind
            does not take (``image_size`` for text...: :data:`exporters.hf_checks.SETTINGS`).
        FormatError: the exported graph reads a weight the checkpoint folder did not hold.

    Weights the forward never reads on the exported inputs (LUKE's entity tables on text) are left out with a
    warning naming them; weights it computes with but drops (MRA without its CUDA kernel) are a ConfigError
    (:mod:`exporters.hf_unused`).
    """
    given = {"seq_len": seq_len, "dynamic_seq": dynamic_seq, "image_size": image_size, "audio_length": audio_length}
    given["tokenizer"], seq_len = tokenizer, (128 if seq_len is None else seq_len)  # given: checked after wrap
    if file_format not in _EXPORTERS:
        raise ConfigError(f"file_format {file_format!r} is not supported; allowed: {', '.join(_EXPORTERS)}")
    settings: dict = {}
    if isinstance(model, (str, os.PathLike)):
        src = Path(model)
        model, settings = load_hf_encoder(src)
        name = name or src.name
        if tokenizer is None and (src / "tokenizer.json").is_file():
            tokenizer = src / "tokenizer.json"
    elif isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        model = copy.deepcopy(model)  # the pooler is dropped and slots are added below: leave the caller's model be
    else:
        raise ConfigError(f"model must be a local directory or a transformers model, got {type(model).__name__}")
    if getattr(model.config, "is_encoder_decoder", False) and callable(getattr(model, "get_encoder", None)):
        model = model.get_encoder()  # Whisper, T5: the encoder (the decoder generates, it embeds nothing)
        model.base_model_prefix = "encoder"  # parameters named as in the whole model: encoder.layers.0...
    check_encoder(model)
    pooling = pooling or settings.get("pooling") or _default_pooling(model)
    if attention is not None and (attention not in ATTENTION or (attention == "fused" and file_format != "onnx")):
        raise ConfigError(
            f"attention {attention!r} is not supported for {file_format}; allowed: "
            + ("fused, decomposed" if file_format == "onnx" else "decomposed")
        )
    if attention is None:  # fused where it pays and the model can: text on onnxruntime
        attention = "fused" if file_format == "onnx" and "input_ids" in _forward_args(model) else "decomposed"
        attention = _set_attention(model, attention, explicit=file_format != "onnx")  # fused is ONNX only
    else:
        _set_attention(model, attention, explicit=True)
    prepare(model, pooling)
    encoder = PooledEncoder.wrap(
        model, pooling=pooling, normalize=settings.get("normalize", False) if normalize is None else normalize
    ).eval()
    check_settings(encoder.modality, model, given)
    slots = add_lora_slots(encoder, lora_slots, lora_rank) if lora_slots else []
    name = name or type(model).__name__
    path = Path(path)
    info = {
        "source": str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        "model_type": getattr(model.config, "model_type", None),
        "modality": encoder.modality,
        "pooling": encoder.pooling,
        "normalize": "l2" if encoder.normalize else None,
        "attention": attention,
    }
    if slots:
        info["lora_slots"] = {"rank": int(lora_rank), "targets": list(lora_slots)}
    dynamic_axes = None
    if encoder.modality == "text":
        check_seq_len(model, seq_len, _PADDED_POSITIONS)
        batch = 2 if file_format == "onnx" else 1  # with 1, torch.export specialises some batches (Funnel) to 1
        examples = _text_examples(model, encoder.input_names, seq_len, tokenizer, batch)
        info["seq_len"] = None if dynamic_seq else int(seq_len)
        info["max_seq_length"] = int(settings.get("max_seq_length") or seq_len)
        if dynamic_seq:
            dynamic_axes = {n: {1: "seq"} for n in encoder.input_names}
        if tokenizer is not None:
            info["tokenizer"] = f"{path.stem}.tokenizer.json"
    elif encoder.modality == "audio":
        example, shape = audio_example(model, encoder.input_names[0], audio_length)
        examples, info = (example,), {**info, **shape}
    else:
        side = image_side(model, image_size)
        channels = int(getattr(model.config, "num_channels", 3))
        # batch 2: with a batch of 1, torch.export guards some models (ConvNeXt) into an empty batch range
        examples = (torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(0)),)
        info["image_size"] = side
    read = check_weights(encoder, examples, settings.get("unloaded"), info["source"])
    other = None  # a dynamic length: the weights read at another length must be the same
    if dynamic_axes:
        other = max(1, seq_len // 2) if seq_len > 1 else 2
        other = (other, read_storages(encoder, _text_examples(model, encoder.input_names, other, None, batch)))
    dropped = drop_unread(encoder, read, info["source"], other)
    if dynamic_axes:
        kwargs["dynamic_axes"] = dynamic_axes
    if file_format == "onnx":
        kwargs["opset"] = ATTENTION[attention][1]
    try:
        result = _EXPORTERS[file_format]()(
            encoder, examples, path, input_names=encoder.input_names, output_names=("embeddings",), name=name,
            extra={**info, **(extra or {})}, slots=slots, **kwargs,
        )  # fmt: skip
    except ExportValidationError as e:  # onnxruntime's fused Attention kernel refusing the graph (LayoutLM)
        if (refusal := unused_refusal(e, encoder, info["source"])) is not None:
            raise refusal from e
        if attention != "fused" or "Attention node" not in str(e):
            raise
        raise ExportValidationError(
            f"{e} It failed in onnxruntime's fused Attention kernel (attention='fused', the default for text): "
            "pass attention='decomposed' (edge export --attention decomposed)"
        ) from e
    say_dropped(dropped, info["source"])
    if tokenizer is not None and encoder.modality == "text":
        atomic_write_bytes(path.with_name(info["tokenizer"]), Path(tokenizer).read_bytes())
    return result


def _default_pooling(model: torch.nn.Module) -> str:
    model_type = getattr(model.config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    raise ConfigError(
        f"architecture {model_type!r} ({type(model).__name__}) is not one export_hf_encoder knows how to pool; "
        f"supported: {', '.join(sorted(ARCHITECTURES))}. If you know how it defines its embedding, pass pooling= "
        "('mean' over tokens, 'cls' its first token, 'pooler' its pooler_output; CLI: --pooling mean|cls|pooler) or "
        "call exporters.hf.register_architecture; otherwise wrap it yourself and use exporters.export_onnx"
    )


def _set_attention(model: torch.nn.Module, attention: str, explicit: bool) -> str:
    """Switch ``model`` to the attention implementation of ``attention``; return the one it runs.

    A model that cannot run SDPA (transformers keeps its eager attention, with a warning) is refused
    when ``fused`` was asked for, and exported ``decomposed`` when it was only the default.
    """
    impl = ATTENTION[attention][0]
    # a model without transformers' AttentionInterface only warns (a line on stderr under -q) and keeps its own
    can_set = getattr(model, "_can_set_attn_implementation", lambda: hasattr(model, "set_attn_implementation"))
    if _attn_running(model) != impl and can_set():
        try:
            model.set_attn_implementation(impl)
        except (ValueError, ImportError) as e:
            log.info("%s: no %s attention (%s)", type(model).__name__, impl, e)
    if _attn_running(model) == impl:
        return attention
    other = "decomposed" if attention == "fused" else "fused"
    if explicit:
        raise ConfigError(
            f"{type(model).__name__} cannot run {impl!r} attention, which attention={attention!r} needs; "
            f"pass attention={other!r} (CLI: --attention {other})"
        )
    log.info("%s cannot run %r attention: exporting it %s", type(model).__name__, impl, other)
    return _set_attention(model, other, explicit=True)


def _attn_running(model: torch.nn.Module) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def _tflite_exporter():
    from exporters.tflite import export_tflite

    return export_tflite


_EXPORTERS = {"onnx": lambda: export_onnx, "tflite": _tflite_exporter}


def _forward_args(model: torch.nn.Module) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(model.forward).parameters


def _text_examples(model, input_names, seq_len: int, tokenizer, batch: int) -> tuple[torch.Tensor, ...]:
    """Example inputs: ``batch`` sentences through ``tokenizer`` when given, else random ids with padding."""
    if tokenizer is not None:
        from edge.text import Tokenizer

        arrays = Tokenizer.from_file(tokenizer, seq_len=seq_len).encode([_EXAMPLE_TEXT, _EXAMPLE_TEXT[:20]][:batch])
        vocab = getattr(model.config, "vocab_size", None)
        if vocab and int(arrays["input_ids"].max()) >= int(vocab):  # another model's tokenizer
            raise ConfigError(
                f"tokenizer {tokenizer} gives ids up to {int(arrays['input_ids'].max())}, beyond the model's "
                f"vocab_size {vocab}: it is another model's; pass the tokenizer.json saved with this model"
            )
        return tuple(torch.from_numpy(arrays[n]) for n in input_names)
    gen = torch.Generator().manual_seed(0)
    vocab = getattr(model.config, "vocab_size", None) or 256  # no vocabulary (Canine reads code points): bytes
    ids = torch.randint(1, int(vocab), (batch, seq_len), generator=gen)
    mask = torch.ones(batch, seq_len, dtype=torch.int64)
    mask[0, seq_len - seq_len // 4 :] = 0  # some padding, so masked pooling is exercised
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(arrays[n] for n in input_names)
