"""``edge train``: train one adapter for a demo domain on the host (SHiRA, bottleneck or LoRA, 1 to 32 bits)."""

from __future__ import annotations

from pathlib import Path

from edge.commands import host_needed, output_path, runtime_flags

BITS = (1, 2, 4, 8, 32)


def register(sub) -> None:
    t = sub.add_parser("train", help="train an adapter (shira, adapter, lora; 1-32 bits) for a demo domain (host)")
    t.add_argument("--method", default="adapter", choices=["shira", "adapter", "lora"], help="default: adapter")
    t.add_argument("--bits", type=int, choices=BITS, help="storage precision (default 1; shira: 32)")
    t.add_argument("--scheme", default="gq", choices=["gq", "sign"], help="1-8 bit codec (default gq)")
    t.add_argument("--domain", required=True, help="target domain of the demo (rotate, noise, invert, blur)")
    t.add_argument("--dim", type=int, default=32, help="bottleneck width or LoRA rank (default 32)")
    t.add_argument("--layers", type=int, nargs="+", help="block indices to adapt (default: all)")
    t.add_argument("--targets", nargs="+", default=["q", "v"], help="LoRA: attention linears (default q v)")
    t.add_argument("--scale", type=float, default=1.0, help="bottleneck output scale s, or LoRA alpha / r")
    t.add_argument("--head", action="store_true", help="also train a delta on the classifier head, same precision")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--lr", type=_learning_rate, default=2e-2, help="learning rate, finite and > 0 (default 0.02)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=output_path, help="adapter file to write (default: in the cache)")
    t.add_argument("--json", type=output_path, help="write the report as JSON here")
    runtime_flags(t)
    t.set_defaults(func=run)


def _learning_rate(text: str) -> float:
    """``--lr``: a finite float > 0 (argparse turns the error into exit 2 and one line, before any training)."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0 (e.g. 0.02)")
    return value


def run(args) -> int:
    import json
    import shutil

    from edge.errors import ConfigError

    host_needed("edge train")
    from lab.datasets import load_domains
    from lab.pipeline import DemoConfig, prepare_demo

    demo = DemoConfig()  # the demo's pretrained encoder; --seed only seeds the adapter
    if args.domain not in demo.domains:
        raise ConfigError(f"unknown domain {args.domain!r}; the demo's target domains are {list(demo.domains)}")
    if args.bits is None:
        args.bits = 32 if args.method == "shira" else 1
    if args.method == "shira" and args.bits != 32:
        raise ConfigError(
            "SHiRA adapters are stored as float32 values at sparse indices: use --bits 32 "
            "(low-bit storage is for the dense methods: --method adapter or lora)"
        )
    cfg = None if args.method == "shira" else _lowbit_config(args)
    art = prepare_demo(args.cache, demo, progress=not args.quiet)
    domains = load_domains(demo.domains, seed=demo.seed)
    d = domains[args.domain]
    base = _encoder(art.model.parent)
    if args.method == "shira":
        model_path, path, adapter = _train_shira(base, art, demo, d, args)
    else:
        from lab import lowbit_demo

        root = art.model.parent / "lowbit"
        root.mkdir(exist_ok=True)
        model_path, info = lowbit_demo.slot_model(root, base, cfg, domains["clean"].x_test[:4], progress=not args.quiet)
        path, adapter = lowbit_demo.train_domain(root, base, cfg, d, info, progress=not args.quiet)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, args.out)
        path = args.out
    report = {
        "method": adapter.method,
        "domain": args.domain,
        "bits": args.bits,
        "adapter": str(path),
        "bytes": path.stat().st_size,
        "model": str(model_path),
        "host_acc": adapter.info.get("host_acc"),
        "device_acc": _device_acc(model_path, path, d, args),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        from edge.format.io import write_json

        write_json(args.json, report)
    return 0


def _lowbit_config(args):
    from exporters.lowbit import LowbitConfig

    cfg = LowbitConfig(
        method=args.method,
        bits=args.bits,
        scheme=args.scheme,
        dim=args.dim,
        layers=tuple(args.layers) if args.layers else None,
        targets=tuple(args.targets),
        scale=args.scale,
        head=args.head,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
    )
    cfg.check()
    return cfg


def _encoder(root: Path):
    from lab.digits_model import load_checkpoint

    return load_checkpoint(root / "encoder.safetensors")


def _train_shira(base, art, demo, d, args):
    from exporters import shira
    from lab.digits_model import evaluate

    targets = shira.select_targets(base, list(demo.targets))
    masks = shira.make_masks(
        base, targets, density=demo.density, kind=demo.mask, calib=(d.x_train, d.y_train), seed=args.seed
    )
    trained = shira.train_shira(
        base, masks, d.x_train, d.y_train, epochs=args.epochs, lr=demo.shira_lr, seed=args.seed, progress=not args.quiet
    )
    acc = evaluate(shira.merge_shira(base, trained), d.x_test, d.y_test)
    meta = {"mask": demo.mask, "density": demo.density, "domain": d.name, "host_acc": acc}
    adapter = shira.shira_adapter(trained, art.info, d.name, meta, model=base)
    root = art.model.parent / "lowbit"
    root.mkdir(exist_ok=True)
    path = adapter.save(root / f"shira-{d.name}-e{args.epochs}-s{args.seed}.safetensors")
    return art.model, path, adapter


def _device_acc(model_path: Path, adapter_path: Path, d, args) -> float:
    """Accuracy of the adapter file on the exported model, on the device runtime."""
    from edge.runtime import Runtime

    with Runtime(model_path, backend=args.backend, threads=args.threads) as rt:
        rt.load_adapter(adapter_path, name="trained")
        rt.switch("trained")
        rt.wait_settled()
        logits = rt.run({"pixels": d.x_test})["logits"]
    return float((logits.argmax(-1) == d.y_test).mean())
