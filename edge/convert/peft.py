"""Import adapters saved by Hugging Face PEFT (``save_pretrained``) into this project's adapter format.

    adapter = import_peft("runs/shira-task", "minilm.onnx")       # -> edge.format.adapter.Adapter
    adapter.save("shira-task.safetensors")

A PEFT adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``
(keys ``base_model.model.<module>.<part>``; adapters saved through transformers' or
sentence-transformers' PEFT integration lack that prefix or carry ``0.auto_model.``).
Device side: read with ``json`` and ``safetensors`` only, never torch, peft or pickle (an
``adapter_model.bin`` is refused).

* **SHiRA** (``peft_type: "SHIRA"``): ``<module>.shira_indices`` (int, ``[2, N]``: row, col of
  the ``[out, in]`` weight) and ``<module>.shira_weight`` (``[N]``) become a fused-mode
  ``shira`` adapter as they are (duplicated indices summed, as PEFT's sparse tensor does).
* **LoRA** (``peft_type: "LORA"``), ``lora_as=``:
  ``merged`` -- ``delta = scaling * B @ A`` (``scaling = lora_alpha / r``, or ``/ sqrt(r)`` with
  ``use_rslora``; ``rank_pattern``/``alpha_pattern`` and ``fan_in_fan_out`` honoured) stored as a
  ``shira`` adapter over every nonzero entry: exact, but *dense* (``out * in`` entries per
  module, so a switch writes whole matrices); ``branch`` -- ``A`` and ``scaling * B`` written into
  the model's LoRA slots (:func:`exporters.lora_slots.add_lora_slots`, ``X.lora_A.weight`` and
  ``X.lora_B.weight``, zero-padded up to the slot rank): a ``lora`` adapter switched without
  touching base weights; ``auto`` (default) -- ``branch`` when the model has slots for every
  module, else ``merged``.

PEFT module names map to the model's parameters by suffix: ``<module>.weight`` equal to a
parameter name, or one ending in the other at a ``.`` boundary (a model exported with a
wrapper prefix such as ``bert.``, or an adapter trained on a task model). Ambiguous or
missing names raise :class:`~edge.errors.AdapterMismatchError` listing the candidates.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.convert.peft_lora import low_rank_pair, merged_lora
from edge.errors import AdapterMismatchError, ConfigError, FormatError
from edge.format.adapter import Adapter, DenseDelta, SparseDelta
from edge.format.io import load_json, read_bounded, read_safetensors
from edge.format.modelinfo import ModelInfo
from edge.registry import Registry

__all__ = ["PeftAdapter", "IMPORTERS", "LORA_AS", "read_peft", "import_peft", "resolve_module"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
LORA_AS = ("auto", "merged", "branch")
MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 1 << 31
MAX_PATTERN_LEN = 1024
#: Wrapper prefixes of saved keys: PeftModel's, and a sentence-transformers Transformer module's ``auto_model``.
_PREFIX = re.compile(r"^(base_model\.model\.)?(\d+\.auto_model\.)?")
_PARTS = re.compile(r"^(?P<module>.+)\.(?P<part>lora_[AB]\.weight|lora_embedding_[AB]|shira_weight|shira_indices)$")


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT adapter folder as read from disk: its config and its tensors per module."""

    path: Path
    config: Mapping[str, object]
    modules: Mapping[str, Mapping[str, np.ndarray]]  # module path (PEFT prefix stripped) -> part -> array
    unknown: tuple[str, ...] = ()  # tensors that are neither LoRA nor SHiRA weights (refused at import)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "")).upper()


#: PEFT method (``peft_type``) -> ``fn(peft, info, lora_as) -> (method, tensors, shapes, info)``.
IMPORTERS: Registry[Callable] = Registry("PEFT method")


def read_peft(path: str | os.PathLike) -> PeftAdapter:
    """Read a PEFT adapter folder (or a file inside it). Raises :class:`FormatError` when unreadable."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        from edge.format.paths import not_a

        raise FormatError(
            f"{path} {not_a(path, 'a PEFT adapter folder')}: give the folder holding {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    weights = folder / WEIGHTS_NAME
    for name in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME):  # a link out (to /dev/zero, say) is named as one
        if (folder / name).is_symlink():
            _inside(folder, name)
    if not (folder / CONFIG_NAME).is_file():
        subs = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file())
        hint = f"; it has adapter subfolders {subs}: pass one of them" if subs else ""
        raise FormatError(f"{folder} has no {CONFIG_NAME}{hint}")
    if not weights.is_file():
        if (folder / PICKLE_NAME).is_file():
            raise FormatError(
                f"{folder} holds only {PICKLE_NAME}, a pickle file, which this runtime never loads (it can run "
                f"code). Re-save the adapter on the host with PeftModel.save_pretrained(..., "
                f"safe_serialization=True) to get {WEIGHTS_NAME}"
            )
        raise FormatError(f"{folder} has no {WEIGHTS_NAME}")
    config = load_json(
        read_bounded(folder / CONFIG_NAME, MAX_CONFIG_BYTES, what="PEFT config"), source=str(folder / CONFIG_NAME)
    )
    if not isinstance(config, dict):
        raise FormatError(f"{folder / CONFIG_NAME}: expected a JSON object, got {type(config).__name__}")
    kind = config.get("peft_type", "")
    kind = kind.upper() if isinstance(kind, str) else ""
    if kind not in IMPORTERS:
        raise ConfigError(
            f"{folder}: PEFT method {kind or '(none)'!r} is not supported; supported: {', '.join(IMPORTERS.names())}. "
            "Merge it on the host (merge_and_unload) and re-export the model instead"
        )
    modules: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    for key, arr in read_safetensors(weights, MAX_WEIGHTS_BYTES, what="PEFT weights").items():
        m = _PARTS.match(_PREFIX.sub("", key, count=1))
        if not m:
            unknown.append(key)
            continue
        parts = modules.setdefault(m["module"], {})
        if m["part"] in parts:
            raise FormatError(f"{weights}: {key!r} is stored twice (under another wrapper prefix); re-save it")
        parts[m["part"]] = arr
    if not modules and not unknown:
        raise FormatError(f"{weights} holds no adapter tensors")
    return PeftAdapter(folder, config, modules, tuple(unknown))


def import_peft(
    peft: str | os.PathLike | PeftAdapter,
    model: ModelInfo | str | os.PathLike,
    *,
    lora_as: str = "auto",
    name: str | None = None,
) -> Adapter:
    """Convert a PEFT adapter for ``model`` (a :class:`ModelInfo`, a Runtime, or an exported ``.onnx``/``.tflite``).

    Raises:
        ConfigError: an unsupported PEFT method or option, or an unknown ``lora_as``.
        AdapterMismatchError: a module the model lacks, an ambiguous name, or a shape that differs
            from the model's (the adapter was trained on another base).
        FormatError: unreadable or inconsistent files.
    """
    if lora_as not in LORA_AS:
        raise ConfigError(f"lora_as={lora_as!r} is not supported; allowed: {', '.join(LORA_AS)}")
    peft = peft if isinstance(peft, PeftAdapter) else read_peft(peft)
    info = _model_info(model)
    method, tensors, shapes, extra = IMPORTERS.get(peft.peft_type)(peft, info, lora_as)
    meta = {
        "source": "peft",
        "peft_type": peft.peft_type,
        "peft_version": peft.config.get("peft_version"),
        "base_model_name_or_path": peft.config.get("base_model_name_or_path"),
        "modules": len(peft.modules),
        **extra,
    }
    return Adapter(name or peft.path.name, info.fingerprint, tensors, shapes, method=method, info=meta)


def resolve_module(module: str, info: ModelInfo, suffix: str = ".weight") -> str:
    """The model parameter a PEFT module's weight maps to (see the module doc for the rule)."""
    want = module + suffix
    names = [k for k, t in info.tensors.items() if not t.slot]
    if want in names:
        return want
    found = [k for k in names if k.endswith("." + want)] or [k for k in names if want.endswith("." + k)]
    if len(found) == 1:
        return found[0]
    if found:
        raise AdapterMismatchError(
            f"PEFT module {module!r} matches several parameters of model {info.name!r}: {sorted(found)[:8]}; "
            "the name is ambiguous (export the model without the duplicated sub-model)"
        )
    close = difflib.get_close_matches(want, names, n=3, cutoff=0.5)
    raise AdapterMismatchError(
        f"PEFT target module {module!r} has no weight in model {info.name!r} (looked for {want!r}"
        f"{'; closest: ' + ', '.join(close) if close else ''}). The adapter was trained on another "
        "base model, or the exported model lacks that module"
    )


# -- methods ---------------------------------------------------------------------------------------------------------


@IMPORTERS.register("SHIRA")
def _import_shira(peft: PeftAdapter, info: ModelInfo, lora_as: str):
    _refuse_options(peft)
    _refuse_unknown(peft)
    swap = bool(peft.config.get("fan_in_fan_out"))
    r = peft.config.get("r")
    tensors, shapes = {}, {}
    for module, parts in peft.modules.items():
        if set(parts) != {"shira_weight", "shira_indices"}:
            raise FormatError(
                f"{peft.path}: module {module!r} needs shira_weight and shira_indices, has {sorted(parts)}"
            )
        target = _claim(resolve_module(module, info), module, tensors)
        shape = tuple(info.tensors[target].shape)
        idx, val = parts["shira_indices"], parts["shira_weight"]
        if idx.ndim != 2 or idx.shape[0] != 2 or val.ndim != 1 or val.shape[0] != idx.shape[1] or len(shape) != 2:
            raise FormatError(
                f"{peft.path}: {module}: shira_indices {idx.shape} and shira_weight {val.shape} must be [2, N] and "
                f"[N] for a 2-D weight (model has {shape})"
            )
        if not np.issubdtype(idx.dtype, np.integer) or val.dtype.kind != "f":
            raise FormatError(
                f"{peft.path}: {module}: shira_indices must be integers and shira_weight floats, got "
                f"{idx.dtype} and {val.dtype}"
            )
        idx = idx[::-1] if swap else idx  # PEFT's indices address [out, in]; fan_in_fan_out weights are [in, out]
        if isinstance(r, int) and val.shape[0] != r * sum(shape):
            raise AdapterMismatchError(
                f"{peft.path}: {module}: {val.shape[0]} SHiRA entries, but r={r} on a {shape} weight of model "
                f"{info.name!r} gives r*(m+n)={r * sum(shape)}; the adapter was trained on a different base"
            )
        if idx.size and (idx.min() < 0 or np.any(idx.max(axis=1) >= np.asarray(shape))):
            raise AdapterMismatchError(
                f"{peft.path}: {module}: indices reach {tuple(int(v) for v in idx.max(axis=1))}, outside the "
                f"{shape} weight {target!r} of model {info.name!r}; the adapter was trained on a different base"
            )
        tensors[target] = _coalesce(idx.astype(np.int64), val.astype(np.float32), shape)
        shapes[target] = shape
    return "shira", tensors, shapes, {"mask": peft.config.get("mask_type"), "r": r}


_LORA_REFUSED = {  # option -> why it cannot be imported as W + scaling * B @ A
    "use_dora": "DoRA rescales each column by a learned magnitude",
    "lora_bias": "a trained bias on lora_B",
    "layer_replication": "layers are duplicated",
    "target_parameters": "LoRA on raw parameters",
    "trainable_token_indices": "trainable token embeddings",
    "alora_invocation_tokens": "activated LoRA only acts after its invocation tokens",
    "use_qalora": "QA-LoRA pools inputs",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routes each token among several LoRA experts",
    "kasa_config": "KaSA truncates the base weight and scales B @ A by a learned diagonal",
    "monteclora_config": "MonteCLoRA samples its weights",
    "velora_config": "VeLoRA keeps per-layer buffers",
}
_COMMON = "task_type peft_type auto_mapping peft_version base_model_name_or_path revision inference_mode r"
_KNOWN = {  # PEFT 0.21's options; any other one set to a non-default value is refused (it may change the math)
    "SHIRA": set(f"{_COMMON} mask_type random_seed target_modules fan_in_fan_out init_weights modules_to_save".split()),
    "LORA": set(_LORA_REFUSED).union(
        f"""{_COMMON} target_modules exclude_modules lora_alpha lora_dropout bias
        fan_in_fan_out use_rslora modules_to_save init_lora_weights layers_to_transform layers_pattern rank_pattern
        alpha_pattern megatron_config megatron_core loftq_config eva_config corda_config lora_ga_config
        qalora_group_size ensure_weight_tying runtime_config""".split()
    ),
}


@IMPORTERS.register("LORA")
def _import_lora(peft: PeftAdapter, info: ModelInfo, lora_as: str):
    cfg = peft.config
    for key, why in _LORA_REFUSED.items():
        if cfg.get(key):
            raise ConfigError(
                f"{peft.path}: LoRA option {key}={cfg[key]!r} is not supported ({why}); "
                "merge on the host with merge_and_unload() and re-export the model"
            )
    _refuse_options(peft)
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(("pissa", "olora", "corda", "loftq", "lora_ga")):
        raise ConfigError(
            f"{peft.path}: init_lora_weights={cfg['init_lora_weights']!r} changes the base weights; convert the "
            "adapter to plain LoRA when saving (save_pretrained(path_initial_model_for_weight_conversion=...))"
        )
    _refuse_unknown(peft)
    deltas, kernels = {}, {}  # target -> (A, B, scaling, embedding) as 2-D; target -> (in, *kernel) of a conv LoRA
    for module, parts in peft.modules.items():
        emb = "lora_embedding_A" in parts
        need = {"lora_embedding_A", "lora_embedding_B"} if emb else {"lora_A.weight", "lora_B.weight"}
        if set(parts) != need:
            raise FormatError(f"{peft.path}: module {module!r} needs {sorted(need)}, has {sorted(parts)}")
        if not all(parts[k].dtype.kind == "f" for k in need):
            raise FormatError(
                f"{peft.path}: {module}: LoRA weights must be floats, got {[str(parts[k].dtype) for k in need]}"
            )
        a, b, kernel = low_rank_pair(*(parts[k].astype(np.float32) for k in sorted(need)), f"{peft.path}: {module}")
        r = a.shape[0]
        alpha = _number(_pattern(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8)), f"{module}: lora_alpha")
        if r == 0:
            raise FormatError(f"{peft.path}: {module}: LoRA of rank 0")
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        target = _claim(resolve_module(module, info), module, deltas)
        deltas[target] = (a, b, scaling, emb)
        if kernel is not None:
            kernels[target] = kernel
    slotted = not kernels and all(_fits_slots(info, t, a.shape[0], emb) for t, (a, _, _, emb) in deltas.items())
    mode = ("branch" if slotted else "merged") if lora_as == "auto" else lora_as
    extra = {
        "lora_as": mode,
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "use_rslora": bool(cfg.get("use_rslora")),
    }
    if mode == "branch":
        if kernels:
            raise ConfigError(
                f"{peft.path}: convolution LoRA on {sorted(kernels)[:3]} has no slots; use lora_as='merged'"
            )
        return ("lora", *_lora_branch(peft, info, deltas), extra)
    tensors, shapes = merged_lora(peft.path, info, deltas, kernels, bool(cfg.get("fan_in_fan_out")))
    extra["dense"] = True
    return "shira", tensors, shapes, extra


def _lora_branch(peft: PeftAdapter, info: ModelInfo, deltas):
    if peft.config.get("fan_in_fan_out"):
        raise ConfigError(f"{peft.path}: fan_in_fan_out LoRA cannot use linear slots; import with lora_as='merged'")
    tensors, shapes = {}, {}
    for target, (a, b, scaling, emb) in deltas.items():
        slots = _slots(info, target)
        if slots is None or emb:
            raise AdapterMismatchError(
                f"model {info.name!r} has no LoRA slots for {target!r}; export it with "
                "exporters.hf.export_hf_encoder(lora_slots=[...]) or import with lora_as='merged'"
            )
        sa, sb = slots
        rank = info.tensors[sa].shape[0]
        want_a, want_b = tuple(info.tensors[sa].shape), tuple(info.tensors[sb].shape)
        if a.shape[0] > rank or a.shape[1] != want_a[1] or b.shape[0] != want_b[0]:
            raise AdapterMismatchError(
                f"{peft.path}: LoRA on {target!r} is A {a.shape}, B {b.shape}; the model's slots are A {want_a}, "
                f"B {want_b} (rank {rank}). Export with lora_rank >= {a.shape[0]}, or use the matching base"
            )
        pa, pb = np.zeros(want_a, np.float32), np.zeros(want_b, np.float32)
        pa[: a.shape[0]] = a
        pb[:, : a.shape[0]] = b * np.float32(scaling)
        tensors[sa], tensors[sb] = DenseDelta(pa), DenseDelta(pb)
        shapes[sa], shapes[sb] = want_a, want_b
    return tensors, shapes


# -- helpers ---------------------------------------------------------------------------------------------------------


def _model_info(model) -> ModelInfo:
    if isinstance(model, ModelInfo):
        return model
    if hasattr(model, "info") and isinstance(model.info, ModelInfo):  # a Runtime
        return model.info
    from edge.format.io import check_regular
    from runtimes import read_model_info

    check_regular(model, what="model file")
    return read_model_info(model)


def _refuse_unknown(peft: PeftAdapter) -> None:
    if peft.unknown:
        raise ConfigError(
            f"{peft.path}: {len(peft.unknown)} tensor(s) are not {peft.peft_type} weights and cannot be imported: "
            f"{list(peft.unknown[:5])}{' ...' if len(peft.unknown) > 5 else ''}. Whole modules (modules_to_save), "
            "trainable tokens, biases or DoRA magnitudes have no delta form; train without them or merge on the host"
        )


def _refuse_options(peft: PeftAdapter) -> None:
    bad = sorted(
        k for k, v in peft.config.items() if k not in _KNOWN[peft.peft_type] and v not in (None, False, {}, [])
    )
    if bad:
        raise ConfigError(
            f"{peft.path}: {peft.peft_type} option(s) {bad[:5]} are unknown to this importer (it knows PEFT 0.21's) "
            "and may change what the adapter computes; merge on the host (merge_and_unload) and re-export the model"
        )


def _slots(info: ModelInfo, target: str) -> tuple[str, str] | None:
    stem = target.removesuffix(".weight")
    a, b = f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"
    ok = all(n in info.tensors and info.tensors[n].slot for n in (a, b))
    return (a, b) if ok else None


def _fits_slots(info: ModelInfo, target: str, rank: int, embedding: bool) -> bool:
    slots = _slots(info, target)
    return slots is not None and not embedding and info.tensors[slots[0]].shape[0] >= rank


def _claim(target: str, module: str, taken: Mapping) -> str:
    if target in taken:
        raise AdapterMismatchError(f"PEFT module {module!r} maps to {target!r}, which another module already maps to")
    return target


def _pattern(patterns, module: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: first key matching the module name's end.

    Keys are user text, so they are never compiled by Python's backtracking ``re``: with
    ``google-re2`` installed they are matched as PEFT matches them, in linear time
    (``(.*\\.)?(KEY)`` against the whole name); without it, a key matches literally (the
    module name or its dotted suffix).
    """
    if patterns is None:
        return default
    if not isinstance(patterns, Mapping):
        raise ConfigError(f"alpha_pattern/rank_pattern must be an object of pattern -> value, got {patterns!r:.80}")
    for key, value in patterns.items():
        if not isinstance(key, str) or len(key) > MAX_PATTERN_LEN:
            raise ConfigError(f"pattern {str(key)[:80]!r} must be a string of at most {MAX_PATTERN_LEN} characters")
        if _matches(key, module):
            return value
    return default


def _matches(key: str, module: str) -> bool:
    try:
        import re2
    except ImportError:
        return module == key or module.endswith("." + key)
    try:
        return re2.fullmatch(rf"(.*\.)?({key})", module) is not None
    except re2.error as e:
        raise ConfigError(f"pattern {key[:80]!r} is not a regular expression RE2 accepts: {e}") from e


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r:.80}")
    return float(value)


def _inside(folder: Path, name: str) -> None:
    """Refuse a file of the folder that is a link leading outside it."""
    real = (folder / name).resolve()
    if real.parent != folder.resolve():
        raise FormatError(f"{folder / name} leads outside {folder} (a link to {real}); refused")


def _coalesce(idx: np.ndarray, val: np.ndarray, shape: tuple[int, ...]) -> SparseDelta:
    """Sorted unique entries, duplicates summed (``torch.sparse_coo_tensor`` semantics)."""
    flat = np.ravel_multi_index(tuple(idx), shape)
    pos, inv = np.unique(flat, return_inverse=True)
    acc = np.zeros(pos.shape, np.float32)
    np.add.at(acc, inv, val)
    return SparseDelta(np.stack(np.unravel_index(pos, shape)).astype(np.int32), acc)
