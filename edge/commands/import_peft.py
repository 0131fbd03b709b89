"""``edge import-peft PATH --base MODEL.onnx --out ADAPTER.safetensors``: convert a Hugging Face PEFT adapter."""

from __future__ import annotations

import json
from pathlib import Path

from edge.commands import output_path, refuse_overwriting


def register(sub) -> None:
    p = sub.add_parser(
        "import-peft",
        help="convert a PEFT adapter folder (SHiRA or LoRA, adapter_model.safetensors) for an exported model",
    )
    p.add_argument("path", type=Path, help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument(
        "--base", type=Path, required=True, help="the exported model (.onnx or .tflite) the adapter will run on"
    )
    p.add_argument("--out", type=output_path, required=True, help="adapter file to write (.safetensors)")
    p.add_argument(
        "--lora-as",
        default="auto",
        choices=["auto", "merged", "branch"],
        help="LoRA: merged into the weights as a dense delta, or a branch in the model's LoRA slots "
        "(auto: branch when the model has slots for every module)",
    )
    p.add_argument("--name", help="adapter name (default: the folder name)")
    p.add_argument(
        "--key", type=Path, help="sign the written adapter with this Ed25519 private key (PEM, from `edge keygen`)"
    )
    p.add_argument(
        "--device",
        help="device profile the adapter is for: with trusted_keys in it, the output must be signed (--key) by one",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from edge.convert.peft import import_peft
    from edge.format.signing import SignaturePolicy, sign_file

    policy = SignaturePolicy(None)
    if args.device:
        from edge.devices import load_profile

        policy = SignaturePolicy.resolve(None, load_profile(args.device))
    if policy.required and args.key is None:
        from edge.errors import SignatureError

        raise SignatureError(
            f"device {args.device} accepts only adapters signed by its trusted keys; pass --key PEM to sign the output"
        )
    refuse_overwriting(
        args.out, args.base, args.key, *(args.path / n for n in ("adapter_model.safetensors", "adapter_config.json"))
    )
    adapter = import_peft(args.path, args.base, lora_as=args.lora_as, name=args.name)
    adapter.save(args.out)
    signature = sign_file(args.out, args.key) if args.key is not None else None
    if policy.required:
        policy.read(args.out, 1 << 31)  # the output passes the device's policy, or this raises SignatureError
    summary = {
        "out": str(args.out),
        "name": adapter.name,
        "method": adapter.method,
        "base_fingerprint": adapter.base_fingerprint,
        "targets": len(adapter.shapes),
        "nnz": adapter.nnz,
        "bytes": args.out.stat().st_size,
        "signature": str(signature) if signature else None,
        "info": adapter.info,
    }
    print(json.dumps(summary, indent=1))
    return 0
