"""Weights of a Hugging Face encoder its exported embedder does not use: left out with a warning, or refused.

:func:`exporters.onnx.export_onnx` refuses a parameter the exported graph does not hold (a Python caller sets it
to None). From ``edge export HF_DIR`` nobody can, so :func:`exporters.hf.export_hf_encoder` decides here:

* :func:`prepare` drops what an embedder never uses, by design: the classifier pooler under another pooling,
  ESM's contact head, the masked-modelling tokens (``mask_token``, ``masked_spec_embed``).
* :func:`drop_unread`: a parameter the eager forward never reads on the example inputs (LUKE's entity tables on a
  text-only export, XLNet's ``mask_emb`` without ``target_mapping``, a relative-position Wav2Vec2-Conformer's
  ``pos_conv_embed``) is re-registered as a buffer, which the exporter leaves out, and named in a warning. That
  holds for every input the graph accepts: its shapes are the traced ones (torch.export refuses a path that
  depends on the values), and with ``dynamic_seq`` the forward is read again at another length: a model reading
  other weights there (a path chosen by length) is refused, to be exported at a fixed ``--seq-len``.
* :func:`unused_refusal`: a parameter the forward reads but whose result never reaches the output (MRA without its
  CUDA kernel returns zeros for attention: its key and value weights are computed and dropped) means the graph
  computes something else than the architecture: refused, naming them and the flags that could help.

Host side: imports torch.
"""

from __future__ import annotations

import logging

import torch

from edge.errors import ConfigError, ExportValidationError

__all__ = ["prepare", "drop_unread", "say_dropped", "unused_refusal"]

log = logging.getLogger(__name__)

_SHOWN = 8  # names in a message
_SIZE_FLAGS = {"text": "--seq-len", "vision": "--image-size", "audio": "--audio-length"}


def prepare(model: torch.nn.Module, pooling: str) -> None:
    """Drop parameters the embedding does not use."""
    pooler = getattr(model, "pooler", None)
    if pooling != "pooler" and pooler is not None and any(True for _ in pooler.parameters()):
        model.pooler = _NoPooler()  # BERT's and ViT's dense+tanh poolers feed classifiers, not embedders
    if getattr(model, "contact_head", None) is not None:  # ESM: contacts come from attention maps, not embeddings
        model.contact_head = None
    for module in model.modules():
        if isinstance(getattr(module, "attention_bias_cache", None), dict):  # LeViT's eval cache: a constant
            module.get_attention_biases = lambda _device=None, m=module: m.attention_biases[:, m.attention_bias_idxs]
        # ViT, Swin and Dinov2 masked-image-modelling tokens, wav2vec2's SpecAugment embedding: unused without a mask
        for key in ("mask_token", "masked_spec_embed"):
            if (token := module._parameters.get(key)) is not None:
                del module._parameters[key]
                module.register_buffer(key, token.detach(), persistent=False)


class _NoPooler(torch.nn.Module):
    """A dropped pooler, for models that call theirs anyway (SqueezeBERT) or feed it to an activation (ALBERT's
    tanh): an empty slice of its input, which no exported output reads."""

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden[..., :0]


def _shown(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f" ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def drop_unread(encoder: torch.nn.Module, read: set[int], source: object, other: tuple[int, set[int]] | None = None):
    """Leave out of the export the parameters of ``encoder`` whose storage is not in ``read`` (what the forward
    read, :func:`exporters.hf_checks.read_storages`); return their names, for :func:`say_dropped`.

    ``other``: ``(length, storages read at that length)`` for a ``dynamic_seq`` export; parameters read at one of
    the two lengths only are refused (:class:`ConfigError`): the traced graph would be wrong at other lengths.
    """
    params = {n: p for n, p in encoder.named_parameters() if p.numel()}  # an empty one: nothing to leave out
    if other is not None:
        length, read_there = other
        differ = sorted(n for n, p in params.items() if (_key(p) in read) != (_key(p) in read_there))
        if differ:
            raise ConfigError(
                f"{source}: the model reads other weights at other sequence lengths ({_shown(differ)} at one of the "
                f"two lengths tried, {length} and the example's), so one graph traced for every length "
                "(dynamic_seq, edge export --dynamic-seq) would compute something else at some of them; export a "
                "fixed length instead: leave out --dynamic-seq and pass the length you serve (--seq-len N)"
            )
    unread = {_key(p) for p in params.values() if _key(p) not in read}
    if not unread:
        return []
    names = [n for n, p in params.items() if _key(p) in unread]
    for module in encoder.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and p.numel() and _key(p) in unread:
                del module._parameters[key]
                module.register_buffer(key, p.detach(), persistent=False)
    return names


def say_dropped(names: list[str], source: object) -> None:
    """The warning for :func:`drop_unread`'s names, once the export succeeded (a refused one says its error only)."""
    if names:
        log.warning(
            "%s: %d weight(s) the forward never reads on the exported inputs are left out of the export "
            "(adapters cannot target them): %s",
            source, len(names), _shown(names),
        )  # fmt: skip


def unused_refusal(e: ExportValidationError, encoder: torch.nn.Module, source: object) -> ConfigError | None:
    """The refusal for :func:`exporters.onnx.export_onnx`'s "parameters are not initializers" error, after
    :func:`drop_unread` (so these parameters were read and their result dropped), worded for ``edge export``;
    None for another error."""
    missing = getattr(e, "parameters", None)
    if not missing:
        return None
    backbone = getattr(encoder, getattr(encoder, "prefix", ""), encoder)
    what = f"{type(backbone).__name__} ({getattr(getattr(backbone, 'config', None), 'model_type', '?')})"
    flag = _SIZE_FLAGS.get(getattr(encoder, "modality", ""), "--seq-len")
    where = "" if str(source) == type(backbone).__name__ else f"{source}: "  # a model object's source: its class
    return ConfigError(
        f"{where}{what} computes with {len(missing)} weight(s) whose result never reaches its output on the "
        f"example inputs, so the exported graph would leave them out and compute something other than the "
        f"architecture: {_shown(list(missing))}. This is the model's code on this host (MRA without its CUDA "
        "kernel, for one, returns zeros for attention), not something edge export can leave out: it is not "
        f"supported; if the model takes that path only at some input sizes, export another size ({flag} N)"
    )
