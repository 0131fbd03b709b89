"""What :func:`exporters.hf.export_hf_encoder` checks of a checkpoint's weights and of the settings it was given.

* :func:`load_checkpoint` loads a local folder with ``transformers`` (safetensors only: a folder whose weights are a
  pickle is refused), keeping its load report: the weights the model has and the checkpoint lacked
  (``missing_keys``) or held in another shape (``mismatched_keys``), which ``transformers`` fills with random values
  and only prints about.
* :func:`check_weights` refuses the export when the traced forward reads any of them: the line is what the
  exported graph uses, found by running the wrapped encoder once on the example inputs and recording every tensor
  its torch functions read (a weight the export drops, like BERT's pooler under mean pooling, passes, logged).
* :func:`check_settings` refuses a shape setting the model's kind does not take (``image_size`` for a text
  model...), which would otherwise be ignored without a word.

Host side: imports torch.
"""

from __future__ import annotations

import logging
import numbers
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from edge.errors import ConfigError, EdgeError, FormatError

__all__ = [
    "SETTINGS",
    "load_checkpoint",
    "check_weights",
    "read_storages",
    "check_settings",
    "check_seq_len",
    "image_side",
]

log = logging.getLogger(__name__)

#: model kind -> the shape settings it takes (each also an ``edge export`` flag)
SETTINGS = {
    "text": ("seq_len", "dynamic_seq", "tokenizer"),
    "vision": ("image_size",),
    "audio": ("audio_length",),
}
_SHOWN = 5  # weights named in a refusal


def load_checkpoint(auto_class, model_dir: Path) -> tuple[torch.nn.Module, dict]:
    """``auto_class.from_pretrained(model_dir)`` offline, and ``{"unloaded": [(name, tensor, why), ...]}``: the
    model's weights the checkpoint did not fill (missing, or stored in another shape)."""
    _refuse_pickles(model_dir)
    try:
        model, report = auto_class.from_pretrained(  # no weights file: transformers' OSError names the files it wants
            str(model_dir),
            local_files_only=True,
            use_safetensors=True,  # never a pickle (pytorch_model.bin) of a folder a user hands us
            attn_implementation="eager",
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, refused only when the export reads them
        )
    except ValueError as e:  # an unknown model_type, a config transformers cannot build: the folder's, not a bug
        raise FormatError(
            f"{model_dir}: transformers cannot build a model from its config.json ({' '.join(str(e).split())[:300]}); "
            "give the folder save_pretrained wrote, with a model_type this transformers knows"
        ) from e
    unloaded = []
    for name in sorted(report.get("missing_keys") or ()):
        if not _learned(model, name):  # a buffer the model's code computes at construction (rotary inv_freq, ids)
            log.info("%s: %s is not in the checkpoint; the model computes it at construction", model_dir, name)
            continue
        unloaded.append((name, _tensor(model, name), "missing"))
    for name, stored, wanted in sorted(report.get("mismatched_keys") or (), key=lambda k: k[0]):
        unloaded.append((name, _tensor(model, name), f"shape {list(stored)} in the checkpoint, {list(wanted)} wanted"))
    return model, {"unloaded": [u for u in unloaded if u[1] is not None]}


#: weights files of other formats than safetensors: pickles (torch.load), and TensorFlow's / Flax's
_OTHER_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def _refuse_pickles(model_dir: Path) -> None:
    """A folder whose weights are only a pickle (``pytorch_model.bin``) or another framework's file is refused
    before transformers would load it: edge reads safetensors only."""
    if any(model_dir.glob("*.safetensors")) or (model_dir / "model.safetensors.index.json").is_file():
        return
    others = [n for n in _OTHER_WEIGHTS if (model_dir / n).is_file()]
    if others:
        raise FormatError(
            f"{model_dir} holds its weights as {others[0]}, not safetensors; edge never loads pickles (or another "
            "framework's file) from a folder it is given: convert it on a machine you trust with transformers "
            "(AutoModel.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)) and export OUT"
        )


def _learned(model: torch.nn.Module, name: str) -> bool:
    """Whether ``name`` holds learned values: a parameter, or a norm's running statistics (which training, not the
    model's code, sets). Other buffers (rotary frequencies, position ids) are computed at construction."""
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        pass
    owner, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(owner) if owner else model
    except AttributeError:
        return True  # a name the model does not resolve: kept, _tensor decides
    return isinstance(module, torch.nn.modules.batchnorm._NormBase) and leaf in ("running_mean", "running_var")


def _tensor(model: torch.nn.Module, name: str) -> torch.Tensor | None:
    for get in (model.get_parameter, model.get_buffer):
        try:
            return get(name)
        except AttributeError:
            continue
    return None


#: tensor properties (their ``__get__``) and methods that read a tensor's metadata, not its values
_METADATA = frozenset(
    ("__get__", "__len__", "size", "dim", "ndimension", "numel", "nelement", "element_size", "stride")
    + ("is_floating_point", "is_complex", "is_signed", "is_contiguous", "storage_offset", "get_device")
)


class _Reads(TorchFunctionMode):
    """Records the storages of every tensor a torch function (or tensor method) is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in _METADATA:  # reads no values (XLNet's self.dtype asks its mask_emb)
            return func(*args, **(kwargs or {}))
        for leaf in tree_leaves((args, kwargs or {})):
            if isinstance(leaf, torch.Tensor) and not leaf.is_meta:
                self.storages.add(leaf.untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def read_storages(encoder: torch.nn.Module, examples: tuple) -> set[int]:
    """The storages (``untyped_storage().data_ptr()``) of every tensor ``encoder(*examples)`` reads (:func:`_probe`)."""
    reads = _Reads()
    with torch.no_grad(), reads:
        _probe(encoder, examples)
    return reads.storages - {0}


def check_weights(encoder: torch.nn.Module, examples: tuple, unloaded, source: object) -> set[int]:
    """Refuse (:class:`FormatError`) when ``encoder(*examples)`` reads a weight of ``unloaded``
    (:func:`load_checkpoint`): the export would hold random values for it. Returns the storages it read."""
    read = read_storages(encoder, examples)
    if not unloaded:
        return read
    used = [(n, why) for n, t, why in unloaded if t.untyped_storage().data_ptr() in read]
    unused = [n for n, t, _ in unloaded if t.untyped_storage().data_ptr() not in read]
    if unused:
        log.info("%s: %d weight(s) not in the checkpoint, unused by the export: %s", source, len(unused), unused)
    if used:
        shown = "; ".join(f"{n} ({why})" for n, why in used[:_SHOWN]) + (" ..." if len(used) > _SHOWN else "")
        raise FormatError(
            f"{source}: {len(used)} weight(s) the exported model uses are missing from the checkpoint or stored "
            f"there in another shape, so they would be exported random: {shown}. Give the complete checkpoint "
            "of this architecture (config.json with the weights save_pretrained wrote beside it, named as the "
            "config's model class names them)"
        )
    return read


#: the setting (and ``edge export`` flag) that sizes each kind's example inputs
_SIZES = {
    "text": "seq_len (--seq-len)",
    "vision": "image_size (--image-size)",
    "audio": "audio_length (--audio-length)",
}


def _probe(encoder: torch.nn.Module, examples: tuple) -> None:
    """Run ``encoder`` once on the example inputs: a model that fails on them (it needs inputs the exporter does not
    give, such as a layout model's ``bbox`` or a two-tower model's other tower, or the inputs are too small for it)
    is a :class:`ConfigError` saying which inputs were given and what to do, not the library's traceback later."""
    try:
        encoder(*examples)
    except (EdgeError, MemoryError, RecursionError, torch.OutOfMemoryError):  # not the inputs' fault
        raise
    except Exception as e:  # noqa: BLE001 -- any library error here is the model refusing the inputs it was given
        backbone = getattr(encoder, getattr(encoder, "prefix", ""), encoder)
        what = f"{type(backbone).__name__} ({getattr(getattr(backbone, 'config', None), 'model_type', '?')})"
        given = ", ".join(f"{n} {list(t.shape)}" for n, t in zip(encoder.input_names, examples, strict=False))
        raise ConfigError(
            f"{what} fails on the {encoder.modality} inputs export_hf_encoder gives it ({given}): "
            f"{type(e).__name__}: {' '.join(str(e).split())[:200]}. If it needs other inputs (a layout model's bbox, "
            "a two-tower model's other tower), wrap it in a torch module that takes what it needs and export that with "
            f"exporters.export_onnx; if the inputs are too small for it, pass a larger {_SIZES[encoder.modality]}"
        ) from e


def image_side(model: torch.nn.Module, image_size: int | None) -> int:
    """The square example image's side: ``image_size`` given, else the config's (an int, or a square pair as Hiera's
    ``[224, 224]``), else 224. A config of another shape is refused: the export takes square images."""
    side = image_size or getattr(model.config, "image_size", None) or 224
    if isinstance(side, (list, tuple)) and len(side) == 2 and side[0] == side[1]:
        side = side[0]
    if isinstance(side, bool) or not isinstance(side, numbers.Integral):
        raise ConfigError(
            f"{type(model).__name__}'s config.image_size is {side!r}, not a square side: export_hf_encoder exports "
            "square images; pass image_size= (edge export --image-size N) if the model takes them, else wrap it and "
            "export it with exporters.export_onnx"
        )
    return int(side)


def check_seq_len(model: torch.nn.Module, seq_len: int, padded: tuple[str, ...] = ()) -> None:
    """Refuse ``seq_len`` beyond ``model``'s position table. Models whose position ids start after the padding index
    (RoBERTa's ``create_position_ids_from_input_ids``: ``padded`` model types, or any whose position embedding has a
    ``padding_idx``, as Data2Vec-text's and XLM-R-XL's) have that many positions fewer."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or limit <= 0:  # transformers' "no limit" (XLNet's -1: relative positions, any length)
        return
    offsets = [
        m.padding_idx + 1
        for n, m in model.named_modules()
        if n.endswith("position_embeddings") and isinstance(getattr(m, "padding_idx", None), int)  # I-BERT's too
    ]
    if getattr(config, "model_type", None) in padded:
        offsets.append(int(getattr(config, "pad_token_id", 1) or 0) + 1)
    limit -= max(offsets, default=0)
    if seq_len > limit:
        raise ConfigError(
            f"seq_len {seq_len} is longer than {getattr(config, 'model_type', type(model).__name__)}'s "
            f"{limit} positions (max_position_embeddings {config.max_position_embeddings}); use seq_len <= {limit} "
            f"(edge export --seq-len {limit})"
        )


_FLAGS = {"seq_len": "--seq-len", "dynamic_seq": "--dynamic-seq", "tokenizer": None}
_FLAGS.update(image_size="--image-size", audio_length="--audio-length")


def check_settings(kind: str, model: torch.nn.Module, given: dict) -> None:
    """Refuse a setting of ``given`` (None or False: not given) that ``model``, of ``kind``, does not take."""
    what = f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')})"
    for key, value in given.items():
        if value is None or value is False or key in SETTINGS[kind]:
            continue
        flag = f" ({_FLAGS[key]})" if _FLAGS.get(key) else ""
        takes = next(k for k, v in SETTINGS.items() if key in v)
        article = "an" if kind == "audio" else "a"
        raise ConfigError(
            f"{key}={value!r}{flag} is a setting of {takes} models; {what} is {article} {kind} model, which takes "
            f"{', '.join(SETTINGS[kind])}: leave {key} out"
        )
