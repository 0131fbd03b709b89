"""What a sentence-transformers folder says of its encoder: pooling, normalisation, maximum length (host side).

Read by :func:`exporters.hf.load_hf_encoder`; moved out of :mod:`exporters.hf` to keep that module small.
"""

from __future__ import annotations

from pathlib import Path

from edge.errors import ConfigError, FormatError
from edge.format.io import load_json, read_bounded

__all__ = ["sentence_transformers_settings"]

MAX_JSON_BYTES = 1 << 20  # a sentence-transformers settings file is a few hundred bytes
MAX_SEQ_LENGTH = 1 << 20  # tokens, as edge.text.Tokenizer takes them (2 to 2**20): the device reads this value


def sentence_transformers_settings(model_dir: Path) -> dict:
    """Pooling, normalisation and max length from a sentence-transformers layout (empty when there is none).

    Files of another shape (``modules.json`` not a list of objects, a settings file not an object, a
    ``max_seq_length`` that is no positive integer) are a :class:`FormatError` naming the file and what it holds.
    """
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return {}
    try:
        modules = _json(modules_file)
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise _shape(modules_file, modules, "a list of objects ({'type': ..., 'path': ...})")
        out: dict = {}
        for m in modules:
            kind = str(m.get("type", "")).rsplit(".", 1)[-1]
            if kind == "Pooling":
                cfg_file = model_dir / m["path"] / "config.json"
                cfg = _json(cfg_file)
                if not isinstance(cfg, dict):
                    raise _shape(cfg_file, cfg, "an object of pooling_mode_* flags")
                modes = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
                chosen = [v for k, v in modes.items() if cfg.get(k)]
                others = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v and k not in modes]
                if len(chosen) != 1 or others:
                    raise ConfigError(
                        f"{model_dir}: sentence-transformers pooling {cfg} is not supported; "
                        "allowed: exactly one of mean or cls tokens"
                    )
                out["pooling"] = chosen[0]
            elif kind == "Normalize":
                out["normalize"] = True
        st_cfg = model_dir / "sentence_bert_config.json"
        if st_cfg.is_file():
            cfg = _json(st_cfg)
            if not isinstance(cfg, dict):
                raise _shape(st_cfg, cfg, "an object with max_seq_length")
            length = cfg.get("max_seq_length")
            if length is not None and (
                isinstance(length, bool) or not isinstance(length, int) or not 2 <= length <= MAX_SEQ_LENGTH
            ):
                raise FormatError(
                    f"{st_cfg}: max_seq_length is {repr(length)[:40]}; allowed: an integer from 2 to {MAX_SEQ_LENGTH} "
                    "(or none); fix the file or remove the key"
                )
            out["max_seq_length"] = length
        return out
    except (ConfigError, FormatError):
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{model_dir}: unreadable sentence-transformers configuration: {e}") from e


def _json(path: Path):
    """A settings file, read bounded (regular files only: a FIFO or /dev/zero is refused, not read) and parsed
    depth-limited, duplicate keys and NaN refused (:func:`edge.format.io.load_json`)."""
    data = read_bounded(path, MAX_JSON_BYTES, what="sentence-transformers settings")
    return load_json(data, source=f"sentence-transformers settings {path}")


def _shape(path: Path, value, allowed: str) -> FormatError:
    return FormatError(
        f"{path}: holds a JSON {type(value).__name__}, not {allowed} as sentence-transformers writes it; "
        "fix the file or remove the sentence-transformers files from the folder"
    )
