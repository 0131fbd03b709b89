"""What exporters.hf refuses about a Hugging Face model before and while it pools it, in one typed line."""

from __future__ import annotations

import inspect

import torch

from edge.errors import ConfigError


def check_tokens(model: str, pooling: str, hidden: torch.Tensor, mask: torch.Tensor | None, outputs) -> None:
    """Refuse a ``pooling`` that ``hidden`` (the model's ``last_hidden_state``) does not fit, naming what fits.

    ``mean`` and ``cls`` need a ``[batch, tokens, hidden]`` sequence (a feature map: ``pooler`` when the model has a
    pooled output, else a wrapper of the user's own); masked ``mean`` needs one row per input token (FunnelBaseModel
    pools its sequence to fewer tokens than the attention mask has: weighing them by it would fail or mislead).
    """
    if hidden is None and isinstance(outputs, tuple):  # config.return_dict False, or torchscript True
        raise ConfigError(
            f"{model} returns a tuple, not transformers' model output (its config sets return_dict=False or "
            "torchscript=True): set return_dict=True and torchscript=False in its config.json and export again"
        )
    if hidden is None:  # a backbone (HGNetV2Backbone): feature maps only
        raise ConfigError(
            f"{model} returns {type(outputs).__name__} without a last_hidden_state (a backbone's feature maps), which "
            f"pooling {pooling!r} needs: wrap it in a torch module that pools the map you want and export that with "
            "exporters.export_onnx (README 'Your own model')"
        )
    if pooling == "none":
        return
    if hidden.dim() != 3:
        advice = (
            "Use pooling='pooler' (CLI: --pooling pooler), the model's own pooled output"
            if getattr(outputs, "pooler_output", None) is not None
            else "It has no pooler_output either: wrap it in a torch module that averages the map over its spatial "
            "axes and export that with exporters.export_onnx (README 'Your own model')"
        )
        raise ConfigError(
            f"{model} returns a {hidden.dim()}-D feature map {tuple(hidden.shape)}, not a token sequence: "
            f"pooling {pooling!r} would pool the wrong axis. {advice}"
        )
    if pooling == "mean" and mask is not None and hidden.shape[1] != mask.shape[1]:
        raise ConfigError(
            f"{model} returns {hidden.shape[1]} tokens for {mask.shape[1]} input tokens (it pools the sequence): "
            "pooling 'mean' cannot weigh them by the attention mask. Pass pooling='cls' (CLI: --pooling cls), its "
            "first token, or export the model that keeps one token per input (FunnelModel, not FunnelBaseModel)"
        )


def check_encoder(model: torch.nn.Module) -> None:
    """Refuse an encoder-decoder model (T5Model, BartModel: what ``AutoModel`` loads from their folders), whose
    forward needs decoder inputs, naming the encoder-only class to load instead."""
    config = getattr(model, "config", None)
    if "decoder_input_ids" not in inspect.signature(model.forward).parameters:  # config.is_encoder_decoder lies:
        return  # a saved T5EncoderModel's is False, and AutoModel loads its folder as T5Model
    kind = type(model).__name__
    encoder = kind.replace("ForConditionalGeneration", "Model").removesuffix("Model") + "EncoderModel"
    raise ConfigError(
        f"{kind} ({getattr(config, 'model_type', '?')!r}) is an encoder-decoder model: its forward needs decoder "
        "inputs, and export_hf_encoder exports encoders. Load the encoder alone in Python and pass that model to "
        "exporters.export_hf_encoder, e.g. "
        f"transformers.{encoder}.from_pretrained(DIR) when transformers has it (T5EncoderModel, MT5EncoderModel, "
        "UMT5EncoderModel), else model.get_encoder() wrapped and exported with exporters.export_onnx"
    )
