"""``edge export HF_DIR --out M.onnx [--format onnx|tflite]``: a Hugging Face encoder to a validated edge model.

Like ``optimum-cli export onnx``: reads a local model folder (no download), pools it the way the
architecture defines its embedding (:func:`exporters.hf.export_hf_encoder`), checks the file against
torch and writes it with this project's metadata, ready for adapters. Host side: needs torch.
``--quantize dynamic|static`` also writes its int8 twin (``M-int8.onnx`` unless ``--quantize-out``),
as ``edge quantize`` would (:mod:`exporters.commands.quantize`, whose flags it takes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from exporters.commands import quantize

FORMATS = {"onnx": ".onnx", "tflite": ".tflite"}


def register(sub) -> None:
    from edge.commands import output_path

    p = sub.add_parser(
        "export",
        help="export a Hugging Face encoder folder to an adapter-ready .onnx or .tflite embedder (host, torch)",
        description="Export a local Hugging Face (or sentence-transformers) encoder as a pooled embedder, "
        "validated against torch. Text: BERT family, RoBERTa/XLM-R, DistilBERT, MPNet, ALBERT, ELECTRA. "
        "Vision: ViT, DeiT, Swin, Dinov2, ConvNeXt, ResNet, MobileViT, EfficientNet, MobileNetV2, RegNet. "
        "Audio, with --pooling: wav2vec2, HuBERT, WavLM, Data2Vec-audio, Whisper's encoder, AST.",
    )
    p.add_argument("model_dir", type=Path, help="local model folder (config.json + model.safetensors)")
    p.add_argument("--out", type=output_path, required=True, help="model file to write (.onnx or .tflite)")
    p.add_argument("--format", choices=sorted(FORMATS), help="file format (default: from --out's suffix, else onnx)")
    p.add_argument("--seq-len", type=int, help="text: sequence length (default 128)")
    p.add_argument("--dynamic-seq", action="store_true", help="text: any sequence length (onnx only)")
    p.add_argument("--image-size", type=int, help="vision: image side (default: the config's image_size, else 224)")
    p.add_argument(
        "--audio-length", type=int, help="audio: samples of a waveform encoder's input (default 16000: 1 s at 16 kHz)"
    )
    p.add_argument(
        "--pooling",
        choices=["mean", "cls", "pooler", "none"],
        help="default: sentence-transformers' setting, else the architecture's own",
    )
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalise the embedding (default: as sentence-transformers does)",
    )
    p.add_argument(
        "--attention",
        choices=["fused", "decomposed"],
        help="onnx: one ai.onnx Attention node a layer (opset 23, onnxruntime >= 1.23) or the decomposed ops "
        "(default: fused for text encoders that support it)",
    )
    p.add_argument("--lora-slots", nargs="+", default=(), help="module-name suffixes given zero LoRA branches")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA slots (default 8)")
    p.add_argument("--name", help="model name in the metadata (default: the folder's name)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--quantize",
        choices=quantize.MODES,
        help="also write the int8 twin (see `edge quantize`; static needs --calib with the model's inputs)",
    )
    p.add_argument("--quantize-out", type=output_path, help="the int8 twin's file (default: OUT's name with -int8)")
    quantize.add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from edge.commands import host_needed
    from edge.errors import ConfigError

    fmt = args.format or ("tflite" if args.out.suffix.lower() == ".tflite" else "onnx")
    if args.out.suffix.lower() != FORMATS[fmt]:
        raise ConfigError(f"--out {args.out.name} does not end in {FORMATS[fmt]}, the suffix of --format {fmt}")
    if fmt == "tflite" and args.dynamic_seq:
        raise ConfigError("--dynamic-seq needs --format onnx: TFLite models have fixed shapes (give --seq-len)")
    from edge.format.paths import require_folder

    require_folder(args.model_dir, "model folder", "give a local Hugging Face model folder (config.json + weights)")
    if not (args.model_dir / "config.json").is_file():
        raise ConfigError(f"{args.model_dir} has no config.json; give a local Hugging Face model folder")
    quant = _quantize_request(args, fmt)
    host_needed("edge export")
    from exporters.quiet import quiet_host

    with quiet_host(args.quiet):  # transformers' progress bar, torch's exporter logs and warnings: not when quiet
        summary = _export(args, fmt, quant)
    print(json.dumps(summary, indent=1))
    return 0


def _export(args, fmt: str, quant) -> dict:
    """Export (and quantize when asked); the summary printed."""
    from exporters.hf import export_hf_encoder

    kwargs = {} if fmt == "tflite" else {"progress": not args.quiet}
    info = export_hf_encoder(
        args.model_dir,
        args.out,
        pooling=args.pooling,
        normalize=args.normalize,
        seq_len=args.seq_len,
        dynamic_seq=args.dynamic_seq,
        image_size=args.image_size,
        audio_length=args.audio_length,
        lora_slots=args.lora_slots,
        lora_rank=args.lora_rank,
        name=args.name,
        file_format=fmt,
        attention=args.attention,
        **kwargs,
    )
    summary = {
        "out": str(args.out),
        "format": fmt,
        "name": info.name,
        "fingerprint": info.fingerprint,
        "inputs": list(info.inputs),
        "outputs": list(info.outputs),
        "targets": len(info.tensors),
        "bytes": args.out.stat().st_size,
        **{
            k: info.extra.get(k)
            for k in (
                "model_type",
                "modality",
                "pooling",
                "normalize",
                "seq_len",
                "image_size",
                "audio_shape",
                "attention",
            )
        },
    }
    if quant is not None:
        summary["quantized"] = quantize.quantize_model(args.out, quant.out, quant)
    return summary


def _quantize_request(args, fmt: str) -> argparse.Namespace | None:
    """The ``edge quantize`` request ``--quantize`` makes, checked before the export runs (None: not asked)."""
    from edge.errors import ConfigError

    if args.quantize is None:
        flags = argparse.ArgumentParser()
        quantize.add_arguments(flags)
        unset = {**vars(flags.parse_args([])), "quantize_out": None}
        used = ["--" + k.replace("_", "-") for k, v in unset.items() if getattr(args, k) != v]
        if used:
            raise ConfigError(f"{', '.join(used)} go with --quantize dynamic|static, which was not given")
        return None
    out = args.quantize_out or args.out.with_name(f"{args.out.stem}-int8{FORMATS[fmt]}")
    request = argparse.Namespace(**{**vars(args), "mode": args.quantize, "out": out})
    quantize.check_request(args.out.with_suffix(FORMATS[fmt]), out, request)
    return request
