"""What a sentence-transformers folder says of its encoder: pooling, normalisation, maximum length (host side).

Read by :func:`exporters.hf.load_hf_encoder`; moved out of :mod:`exporters.hf` to keep that module small.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge.errors import ConfigError, FormatError
from edge.format.io import read_bounded

__all__ = ["sentence_transformers_settings"]

MAX_JSON_BYTES = 1 << 20  # a sentence-transformers settings file is a few hundred bytes


def sentence_transformers_settings(model_dir: Path) -> dict:
    """Pooling, normalisation and max length from a sentence-transformers layout (empty when there is none)."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return {}
    try:
        modules = _json(modules_file)
        out: dict = {}
        for m in modules:
            kind = str(m.get("type", "")).rsplit(".", 1)[-1]
            if kind == "Pooling":
                cfg = _json(model_dir / m["path"] / "config.json")
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
            out["max_seq_length"] = _json(st_cfg).get("max_seq_length")
        return out
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{model_dir}: unreadable sentence-transformers configuration: {e}") from e


def _json(path: Path):
    """A settings file, read bounded (regular files only: a FIFO or /dev/zero is refused, not read)."""
    return json.loads(read_bounded(path, MAX_JSON_BYTES, what="sentence-transformers settings").decode())
