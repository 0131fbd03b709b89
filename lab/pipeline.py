"""The host half of the demo: pretrain the digits encoder, export it, train one SHiRA adapter per domain.

Two encoder families (``DemoConfig.model``): the tiny ViT of :mod:`lab.digits_model`
(``vit``, the default) and the small CNN of :mod:`lab.digits_cnn` (``cnn``), on which
SHiRA adapts every convolution and both linear layers. The 1-bit bottleneck adapters are
built for the ViT only.

Every artifact is cached under ``cache/<config hash>/`` and written atomically, so a
second run (or a run after an interruption) reuses whatever is complete. An exported file from
before source fingerprints (``extra["source_fingerprint"]``, the mark of ``.onnx``/``.tflite``
twins) is exported again from the cached torch weights, never retrained (:func:`_onnx_export`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge.cache_trust import make_levels
from edge.errors import ConfigError, EdgeError
from edge.format.modelinfo import ModelInfo

__all__ = ["DemoConfig", "DemoArtifacts", "host_shira_reference", "prepare_demo"]

log = logging.getLogger("lab.demo")
PIPELINE_VERSION = 1  # bump when a change makes old cached artifacts wrong
LOWBIT_DIM = 256  # width of the demo's 1-bit bottleneck adapter (1-bit within 1 point of fp32 from ~200 up)
#: encoder family -> its SHiRA defaults: the modules adapted (exporters.shira.select_targets patterns) and the
#: density. The CNN (8k weights in its targets) gets 0.15 for about as many entries as the ViT's 2 % (1.2k vs 1.3k)
MODEL_DEFAULTS = {
    "vit": {"targets": ("q", "k", "v", "proj", "fc1", "fc2"), "density": 0.02},
    "cnn": {"targets": ("stem.conv", "dw1.conv", "pw1.conv", "dw2.conv", "pw2.conv", "pre", "head"), "density": 0.15},
}


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides the demo's artifacts (part of the cache key).

    ``model`` is the encoder family (:data:`MODEL_DEFAULTS`); ``targets`` and ``density``
    default to the family's (``None`` is replaced by them).
    """

    model: str = "vit"
    seed: int = 0
    domains: tuple[str, ...] = ("rotate", "noise", "invert", "blur")
    pretrain_epochs: int = 60
    mask: str = "wm"  # best measured on the demo domains (edge bench masks): ahead of random, snip, grad
    density: float | None = None
    targets: tuple[str, ...] | None = None
    shira_epochs: int = 30
    shira_lr: float = 1e-2

    def __post_init__(self) -> None:
        if self.model not in MODEL_DEFAULTS:
            raise ConfigError(f"unknown demo model {self.model!r}; known: {sorted(MODEL_DEFAULTS)}")
        for k, v in MODEL_DEFAULTS[self.model].items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)

    @property
    def name(self) -> str:
        """The exported model's name: ``digits-vit`` or ``digits-cnn``."""
        return f"digits-{self.model}"

    def key(self) -> str:
        fields = asdict(self)
        if self.model == "vit":  # the key the ViT had before the CNN existed, so its caches stay valid
            del fields["model"]
        blob = json.dumps({"v": PIPELINE_VERSION, **fields}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class DemoArtifacts:
    model: Path
    info: ModelInfo
    adapters: dict[str, Path] = field(default_factory=dict)
    lowbit_model: Path | None = None  # the encoder with an empty 1-bit bottleneck branch (slots)
    lowbit_adapters: dict[str, Path] = field(default_factory=dict)


def prepare_demo(
    cache: Path, cfg: DemoConfig = DemoConfig(), progress: bool = True, backend: str | None = None
) -> DemoArtifacts:
    """Artifacts for ``backend``: the ONNX model, or with ``"tflite"`` its ``.tflite`` twin and the adapters
    rebased on it (any other ``backend``, ``None`` or ``"auto"``, gets the ONNX artifacts).

    A cached ``.tflite`` twin is exported again when it lacks the ONNX file's source fingerprint (needs
    litert-torch; without it, a warning says its adapters stay apart).

    The CNN trains on one torch thread: it is too small to gain from more, and on a busy
    2-core machine torch's default threads made its build 9 minutes instead of 40 s.
    """
    import torch

    if cfg.model == "vit":  # the ViT's artifacts as they always were
        return _prepare(cache, cfg, progress, backend)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _prepare(cache, cfg, progress, backend)
    finally:
        torch.set_num_threads(threads)


def _prepare(cache: Path, cfg: DemoConfig, progress: bool, backend: str | None) -> DemoArtifacts:
    import torch

    from exporters import shira
    from lab import digits_model as dm
    from lab.datasets import load_domains

    torch.manual_seed(cfg.seed)
    root = Path(cache) / (f"digits-{cfg.key()}" if cfg.model == "vit" else f"{cfg.name}-{cfg.key()}")
    make_levels(root, 0o755)  # each missing level without group/other write, whatever the umask (002 too)
    (root / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    domains = load_domains(cfg.domains, seed=cfg.seed)

    ckpt = root / "encoder.safetensors"
    if ckpt.exists():
        model = dm.load_checkpoint(ckpt)
        log.info("reusing pretrained encoder %s", ckpt)
    else:
        _say(progress, f"pretraining the digits {cfg.model} on clean digits ({cfg.pretrain_epochs} epochs)")
        model = dm.pretrain(
            domains["clean"], arch=cfg.model, epochs=cfg.pretrain_epochs, seed=cfg.seed, progress=progress
        )
        tmp = ckpt.with_suffix(".tmp")
        dm.save_checkpoint(model, tmp)
        tmp.replace(ckpt)

    onnx_path = root / "encoder.onnx"
    info = _onnx_export(root, model, cfg, (torch.as_tensor(domains["clean"].x_test[:4]),), progress)

    adapters: dict[str, Path] = {}
    targets = shira.select_targets(model, list(cfg.targets))
    for name in cfg.domains:
        path = root / f"shira-{name}.safetensors"
        d = domains[name]
        if not path.exists():
            _say(progress, f"training a SHiRA adapter for '{name}' ({cfg.mask} mask, density {cfg.density:.0%})")
            masks = shira.make_masks(
                model, targets, density=cfg.density, kind=cfg.mask, calib=(d.x_train, d.y_train), seed=cfg.seed
            )
            trained = shira.train_shira(
                model,
                masks,
                d.x_train,
                d.y_train,
                epochs=cfg.shira_epochs,
                lr=cfg.shira_lr,
                seed=cfg.seed,
                progress=progress,
            )
            merged = shira.merge_shira(model, trained)
            acc = {"base": dm.evaluate(model, d.x_test, d.y_test), "adapter": dm.evaluate(merged, d.x_test, d.y_test)}
            shira.shira_adapter(
                trained, info, name, {"mask": cfg.mask, "density": cfg.density, "domain": name, "host_acc": acc}
            ).save(path)
        adapters[name] = path
    if backend == "tflite":
        return _tflite_artifacts(root, model, domains["clean"].x_test[:1], info, adapters, progress)
    if (root / "encoder.tflite").exists():  # a twin kept up to date once it exists; the .onnx runs either way
        try:
            _tflite_artifacts(root, model, domains["clean"].x_test[:1], info, adapters, progress)
        except (EdgeError, OSError) as e:
            log.warning("%s not brought up to date (%s): its adapters stay apart from the .onnx's", root, e)
    if cfg.model != "vit":
        return DemoArtifacts(onnx_path, info, adapters)
    lowbit_model, lowbit_adapters = _lowbit_artifacts(root, model, domains, cfg, progress)
    return DemoArtifacts(onnx_path, info, adapters, lowbit_model, lowbit_adapters)


def _onnx_export(root: Path, model, cfg: DemoConfig, example: tuple, progress: bool) -> ModelInfo:
    """``root/encoder.onnx`` for ``model`` (the cached torch weights): exported and validated once, and exported
    again when the cached file lacks the source fingerprint its ``.tflite`` twin needs to take its adapters.

    The adapters beside it were trained on these weights for the file's fingerprint, so a re-export is kept only
    when it stores the same tensors (same fingerprint), then replaces the file atomically; one that stores other
    tensors (another exporter version) is dropped with a warning, and the cached file, which its adapters fit,
    stays. A file exported from other weights than the cached ones raises :class:`ConfigError`: its adapters and
    its weights disagree, and only training again (moving the folder away) rebuilds it.
    """
    import os

    from exporters.onnx import export_onnx, load_model_info
    from exporters.validate import with_source

    path = root / "encoder.onnx"

    def export(to: Path) -> ModelInfo:
        extra = {"task": "digits", "labels": list(range(10)), "input": "pixels [B,1,8,8] float32 in [0,1]"}
        if cfg.model == "cnn":
            extra["taps"] = _cnn_taps(model, example, root / "encoder.taps.onnx")
        names = {"input_names": ["pixels"], "output_names": ["logits", "features"]}
        return export_onnx(model, example, to, **names, name=cfg.name, extra=extra, progress=progress)

    if not path.exists():
        _say(progress, "exporting the encoder to ONNX and validating it against torch")
        return export(path)
    info = load_model_info(path)
    source, kept = with_source(model, None)["source_fingerprint"], info.extra.get("source_fingerprint")
    if kept == source:
        return info
    if kept is not None:
        raise ConfigError(
            f"{path} was exported from other weights ({kept}) than {root / 'encoder.safetensors'} ({source}), and "
            f"the adapters beside it were trained on those: move {root} away to build the demo again"
        )
    _say(progress, f"exporting {path} again: it predates source fingerprints (its .tflite twin refused its adapters)")
    staged = root / f".encoder.reexport.{os.getpid()}.onnx"  # one per process: two demos on one cache
    try:
        again = export(staged)
        if again.fingerprint != info.fingerprint:
            log.warning(
                "exporting %s again stores other tensors (%s) than the cached file (%s), whose adapters sit beside "
                "it: the cached file is kept, and its .tflite twin keeps its adapters apart",
                path, again.fingerprint, info.fingerprint,
            )  # fmt: skip
            return info
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    log.info("re-exported %s with source fingerprint %s (%s unchanged)", path, source, info.fingerprint)
    return again


def _cnn_taps(model, example: tuple, scratch: Path) -> list[str]:
    """The CNN's declared feature taps: after each stage (``stages``), the last one where its own pool reads it.

    The last stage's map is what the model's global average pool reads, so the pool's output
    is the same feature already pooled: the tapped model then pools one map instead of two,
    which is a sixth of the detection cost on a model whose whole run takes ~12 us. Tensor
    names are the exporter's, so they come from an unvalidated export of the same module.
    """
    import onnx

    from edge.route.taps import resolve_taps
    from exporters.onnx import export_onnx

    export_onnx(
        model, example, scratch, input_names=["pixels"], output_names=["logits", "features"], name="scratch",
        validate=False, progress=False,
    )  # fmt: skip
    proto = onnx.load(str(scratch))
    scratch.unlink()
    pools = {n.input[0]: n.output[0] for n in proto.graph.node if n.op_type in ("ReduceMean", "GlobalAveragePool")}
    stages = resolve_taps(proto, "stages")
    return [*stages[:-1], pools.get(stages[-1], stages[-1])]


def _lowbit_artifacts(root: Path, model, domains: dict, cfg: DemoConfig, progress: bool):
    """The ViT with an empty 1-bit bottleneck branch (slots), and one 1-bit adapter per domain."""
    from exporters import lowbit
    from lab import lowbit_demo

    lcfg = lowbit.LowbitConfig(method="adapter", bits=1, dim=LOWBIT_DIM, seed=cfg.seed)
    path, info = lowbit_demo.slot_model(root / "lowbit", model, lcfg, domains["clean"].x_test[:4], progress=progress)
    adapters = {}
    for name in cfg.domains:
        stem = root / "lowbit" / f"{lowbit_demo.adapter_stem(lcfg, name)}.safetensors"
        if not stem.exists():
            _say(progress, f"training a 1-bit bottleneck adapter for '{name}' (width {LOWBIT_DIM})")
        adapters[name], _ = lowbit_demo.train_domain(
            root / "lowbit", model, lcfg, domains[name], info, progress=progress
        )
    return path, adapters


def _tflite_artifacts(root: Path, model, example: np.ndarray, info: ModelInfo, adapters: dict, progress: bool):
    """Export the encoder to ``.tflite`` (fixed batch 1) and give each adapter the TFLite file's fingerprint.

    The adapters' indices and values are unchanged: only ``base_fingerprint`` differs, because
    each exported file hashes its own stored tensors. A cached file without ``info``'s source fingerprint (from
    before twins, or from other weights) is exported again (atomically) when litert-torch is installed, and the
    rebased adapters follow the file's fingerprint; without litert-torch a warning says what stays apart.
    """
    import dataclasses
    import importlib.util

    import torch

    from edge.format.adapter import load_adapter
    from exporters.tflite import export_tflite, load_model_info

    path = root / "encoder.tflite"
    source = info.extra.get("source_fingerprint")
    tinfo = load_model_info(path) if path.exists() else None
    if tinfo is not None and tinfo.extra.get("source_fingerprint") != source:
        if importlib.util.find_spec("litert_torch") is None:
            log.warning(
                "%s lacks the source fingerprint of %s (%s): Runtime(backend='auto') keeps their adapters apart; "
                "run the demo once where litert-torch is installed (make demo-tflite) to export it again",
                path, root / "encoder.onnx", source,
            )  # fmt: skip
        else:
            _say(progress, f"exporting {path} again: it predates source fingerprints (or other weights)")
            tinfo = None
    if tinfo is None:
        _say(progress, "exporting the encoder to TFLite (litert-torch) and validating it on LiteRT")
        tinfo = export_tflite(
            model,
            (torch.as_tensor(example),),
            path,
            input_names=["pixels"],
            output_names=["logits", "features"],
            name=info.name,
            extra=dict(info.extra),
            dynamic_batch=False,
        )
    out = {}
    for name, onnx_adapter in adapters.items():
        out[name] = root / f"shira-{name}.tflite.safetensors"
        if not out[name].exists() or load_adapter(out[name]).base_fingerprint != tinfo.fingerprint:
            a = load_adapter(onnx_adapter)
            dataclasses.replace(a, base_fingerprint=tinfo.fingerprint).save(out[name])
    return DemoArtifacts(path, tinfo, out)


def _say(progress: bool, msg: str) -> None:
    log.info(msg)
    if progress:
        import sys

        print(f"[edge] {msg}", file=sys.stderr, flush=True)


def host_shira_reference(checkpoint: Path, domains: Mapping[str, object], cfg, threads: int | None):
    """A function ``(domain, x, y) -> test accuracy`` of a host SHiRA fine-tune (torch; host side only)."""
    import torch

    from exporters import shira
    from lab import digits_model as dm

    if threads:
        torch.set_num_threads(threads)
    model = dm.load_checkpoint(checkpoint)
    targets = shira.select_targets(model, list(cfg.targets))
    demo_steps = cfg.shira_epochs * math.ceil(len(domains["clean"].x_train) / 64)

    def run(name: str, x: np.ndarray, y: np.ndarray) -> float:
        torch.manual_seed(cfg.seed)
        masks = shira.make_masks(model, targets, density=cfg.density, kind=cfg.mask, calib=(x, y), seed=cfg.seed)
        epochs = max(1, round(demo_steps / math.ceil(len(x) / 64)))
        trained = shira.train_shira(model, masks, x, y, epochs=epochs, lr=cfg.shira_lr, seed=cfg.seed, progress=False)
        d = domains[name]
        return dm.evaluate(shira.merge_shira(model, trained), d.x_test, d.y_test)

    return run
