"""Device-side text input: ``tokenizer.json`` through the ``tokenizers`` library, and sentence embeddings.

    rt = edge.Runtime("minilm.onnx")
    vectors = edge.text.embed(rt, ["first sentence", "second one"])   # [2, 384], as sentence-transformers

The exporter (:func:`exporters.hf.export_hf_encoder`) ships the model's ``tokenizer.json``
beside the ONNX file and records in the metadata its file name (``extra["tokenizer"]``),
the fixed sequence length (``extra["seq_len"]``, ``None`` when the axis is dynamic) and the
longest input the model was trained for (``extra["max_seq_length"]``).
:meth:`Tokenizer.for_model` reads those. No torch, no transformers: only ``tokenizers``
(Rust, with aarch64 wheels) and numpy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge.errors import BackendUnavailableError, ConfigError, FormatError

__all__ = ["Tokenizer", "embed", "mean_pool"]

_NAMES = ("input_ids", "attention_mask", "token_type_ids")
MAX_TOKENIZER_BYTES = 64 << 20  # the largest published tokenizer.json files (multilingual vocabularies) are ~20 MB
_MAX_LENGTH = 1 << 20  # tokens per text; far beyond any encoder's position table


def _length(what: str, value) -> int:
    """``value`` as a token count in [2, 2**20]; a bool, float, string or anything else is a :class:`ConfigError`
    (the values come from a model's metadata as well as from callers)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 2 <= int(value) <= _MAX_LENGTH:
        raise ConfigError(
            f"{what} must be an integer from 2 (room for the special tokens) to {_MAX_LENGTH}, got {value!r}; "
            "re-export the model or pass a valid value"
        )
    return int(value)


class Tokenizer:
    """A Hugging Face fast tokenizer (``tokenizer.json``) producing int64 model inputs.

    ``seq_len`` pads and truncates every text to exactly that many tokens (models exported
    with a fixed sequence axis); ``None`` pads each batch to its longest text, truncated at
    ``max_length``.
    """

    def __init__(self, tokenizer, *, seq_len: int | None = 128, max_length: int = 512, inputs=_NAMES) -> None:
        seq_len = None if seq_len is None else _length("seq_len", seq_len)
        max_length = _length("max_length", max_length)
        self._tok = tokenizer
        self.seq_len = seq_len
        self.max_length = seq_len or max_length
        self.inputs = tuple(n for n in _NAMES if n in inputs)
        pad_token = next((t for t in ("[PAD]", "<pad>") if tokenizer.token_to_id(t) is not None), "[PAD]")
        pad_id = tokenizer.token_to_id(pad_token)
        tokenizer.no_padding()
        tokenizer.no_truncation()
        tokenizer.enable_truncation(max_length=self.max_length)
        tokenizer.enable_padding(
            length=seq_len, pad_id=0 if pad_id is None else int(pad_id), pad_type_id=0, pad_token=pad_token
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> Tokenizer:
        """Load a ``tokenizer.json`` (Hugging Face ``tokenizers`` format)."""
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as e:
            raise BackendUnavailableError(
                "text models need the `tokenizers` package on the device: pip install tokenizers"
            ) from e
        from edge.format.io import read_bounded

        path = Path(path)
        # read here, bounded: tokenizers' own from_file blocks on a FIFO and reads /dev/zero until memory runs out
        data = read_bounded(path, MAX_TOKENIZER_BYTES, what="tokenizer")
        try:
            tok = _HFTokenizer.from_str(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise FormatError(f"cannot read tokenizer {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        except Exception as e:  # tokenizers raises a plain Exception for malformed files
            raise FormatError(
                f"cannot read tokenizer {path}: {e}; give the tokenizer.json the model was exported with"
            ) from e
        return cls(tok, **kwargs)

    @classmethod
    def for_model(cls, runtime) -> Tokenizer:
        """The tokenizer an exported text model names in its metadata, set up for its inputs."""
        extra = runtime.info.extra
        name = extra.get("tokenizer")
        if not name:
            raise ConfigError(
                f"model {runtime.info.name!r} names no tokenizer in its metadata; export it with "
                "exporters.hf.export_hf_encoder (which ships tokenizer.json), "
                "or pass tokenizer=Tokenizer.from_file(...)"
            )
        base = Path(str(name)).name  # a file beside the model, never a path out of its folder
        if base in ("", ".", ".."):
            raise FormatError(
                f"model {runtime.info.name!r} names its tokenizer {str(name)[:80]!r}, not a file name; re-export it, "
                "or pass tokenizer=Tokenizer.from_file(...)"
            )
        path = Path(runtime.model_path).with_name(base)
        if not path.is_file():
            raise FormatError(f"model {runtime.info.name!r} expects its tokenizer at {path}; copy it next to the model")
        return cls.from_file(
            path,
            seq_len=extra.get("seq_len"),
            max_length=extra.get("max_seq_length") or 512,
            inputs=runtime.info.inputs,
        )

    def encode(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        """Model inputs (int64 ``[n, seq]``) for ``texts``, only those the model takes."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ConfigError("no texts to encode")
        texts = list(texts)
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise ConfigError(f"texts must be strings, got a {type(bad).__name__}: {str(bad)[:40]!r}")
        try:
            enc = self._tok.encode_batch(texts)
        except Exception as e:  # tokenizers raises a plain Exception (a WordPiece vocabulary with no [UNK], ...)
            raise FormatError(
                f"the tokenizer cannot encode these texts: {str(e)[:200]}; give the tokenizer.json the model was "
                "exported with"
            ) from e
        arrays = {
            "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
        }
        return {n: arrays[n] for n in self.inputs}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Attention-masked mean over tokens (sentence-transformers' mean pooling): ``[n, t, d] -> [n, d]``."""
    m = mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def embed(
    runtime, texts: str | Sequence[str], *, tokenizer: Tokenizer | None = None, batch_size: int = 32
) -> np.ndarray:
    """Embeddings ``[n, d]`` of ``texts`` from a text model loaded in ``runtime``.

    Uses the model's first output; a token-level output (``[n, t, d]``, models exported with
    ``pooling="none"``) is mean-pooled here with the attention mask and L2-normalised when
    the metadata says ``normalize: "l2"``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = tokenizer or Tokenizer.for_model(runtime)
    out_name = runtime.info.outputs[0]
    parts = []
    for i in range(0, len(texts), batch_size):
        feeds = tokenizer.encode(texts[i : i + batch_size])
        y = runtime.run(feeds)[out_name]
        if y.ndim == 3:
            y = mean_pool(y, feeds["attention_mask"])
            if runtime.info.extra.get("normalize") == "l2":
                y = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)
        parts.append(y)
    return np.concatenate(parts).astype(np.float32, copy=False)
