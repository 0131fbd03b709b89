"""Example inputs for Hugging Face audio encoders, so :func:`exporters.hf.export_hf_encoder` exports them (host side).

Three input layouts, told by the forward's input name and the config (never by the model type alone):

* a waveform ``input_values [B, samples]`` read by a convolutional feature extractor (``conv_kernel``,
  ``conv_stride``: wav2vec2, HuBERT, WavLM, Data2Vec-audio): ``audio_length`` samples, 16000 (one second at
  16 kHz) by default, at least the extractor's receptive field;
* a spectrogram ``input_values [B, max_length, num_mel_bins]`` (the Audio Spectrogram Transformer: its position
  table fixes both);
* log-mel features ``input_features [B, num_mel_bins, 2 * max_source_positions]`` (Whisper's encoder, whose
  length its position table fixes).

Any other audio layout is a :class:`~edge.errors.ConfigError` naming the model and what to do instead. No
architecture is registered with a default pooling: pass ``pooling=`` (``mean`` over frames, as the Hugging Face
``*ForSequenceClassification`` heads of wav2vec2 and Whisper do; ``pooler`` for AST's mean of its two
class tokens).
"""

from __future__ import annotations

import torch

from edge.errors import ConfigError

__all__ = ["AUDIO_INPUTS", "DEFAULT_SAMPLES", "audio_example"]

#: the forward arguments of an audio encoder
AUDIO_INPUTS = ("input_values", "input_features")
DEFAULT_SAMPLES = 16000


def _receptive_field(kernels, strides) -> int:
    """The fewest samples a stack of unpadded 1-D convolutions turns into one frame."""
    n = 1
    for k, s in reversed(list(zip(kernels, strides))):
        n = (n - 1) * int(s) + int(k)
    return n


def audio_example(model: torch.nn.Module, name: str, length: int | None) -> tuple[torch.Tensor, dict]:
    """A seeded batch of 2 inputs for ``model``'s ``name`` argument, and the metadata recording its shape."""
    config, what = model.config, f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')})"
    gen = torch.Generator().manual_seed(0)
    fixed = None
    if name == "input_features" and hasattr(config, "max_source_positions") and hasattr(config, "num_mel_bins"):
        shape, fixed = (int(config.num_mel_bins), 2 * int(config.max_source_positions)), "its position table"
    elif name == "input_values" and hasattr(config, "max_length") and hasattr(config, "num_mel_bins"):
        shape, fixed = (int(config.max_length), int(config.num_mel_bins)), "its max_length and num_mel_bins"
    elif name == "input_values" and hasattr(config, "conv_kernel") and hasattr(config, "conv_stride"):
        least = _receptive_field(config.conv_kernel, config.conv_stride)
        samples = DEFAULT_SAMPLES if length is None else length
        if not isinstance(samples, int) or isinstance(samples, bool) or not least <= samples <= 10 * 60 * 16000:
            raise ConfigError(
                f"audio_length {samples!r} does not fit {what}: its feature extractor needs at least {least} "
                f"samples (its receptive field); pass an integer from {least} to {10 * 60 * 16000} (ten minutes at "
                "16 kHz), the samples of one clip the device feeds"
            )
        return torch.randn(2, samples, generator=gen), {"audio_shape": [samples]}
    else:
        raise ConfigError(
            f"{what} takes {name} in a layout export_hf_encoder does not know (it exports a waveform "
            "input_values with a convolutional feature extractor, AST's spectrogram input_values and Whisper's "
            "input_features); wrap it in a torch module that pools its last_hidden_state and export that with "
            "exporters.export_onnx"
        )
    frames = shape[1] if name == "input_features" else shape[0]
    if length is not None and length != frames:
        raise ConfigError(
            f"audio_length {length!r} does not fit {what}: {fixed} fixes its input to {list(shape)} per clip "
            f"({frames} frames); leave audio_length unset"
        )
    return torch.randn(2, *shape, generator=gen), {"audio_shape": list(shape)}
