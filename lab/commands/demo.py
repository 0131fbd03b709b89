"""``edge demo``: the main job on the embedded digits default."""

from __future__ import annotations

from edge.commands import host_needed, output_path, runtime_flags


def register(sub) -> None:
    d = sub.add_parser("demo", help="train, export and switch adapters on the embedded digits default")
    runtime_flags(d)
    d.add_argument("--strategy", default="auto", help="weight-update strategy (default: the backend's best)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--model",
        choices=["vit", "cnn"],
        default="vit",
        help="the demo encoder: a tiny ViT (default) or a small CNN, both trained on the digits domains",
    )
    d.add_argument("--json", type=output_path, help="write the results as JSON here")
    d.add_argument(
        "--stream",
        action="store_true",
        help="drifting stream: OOD detection, routing and growing a new adaptor (on onnxruntime, the default here: "
        "its feature taps and detector head are edits of the ONNX graph)",
    )
    d.add_argument("--grow-device", help="with --stream: device profile whose budgets the grown adaptor must fit")
    d.add_argument(
        "--grow-on",
        choices=["device", "host"],
        default="device",
        help="with --stream: train the new adaptor with the numpy device trainer (default) or torch on the host",
    )
    d.add_argument(
        "--rate",
        type=float,
        help="with --stream: inputs per second the stream arrives at, like a sensor (default: as fast as served)",
    )
    d.add_argument(
        "--grow-blocking",
        action="store_true",
        help="with --stream: pause the stream while growing (default: grow in a child process, keep serving)",
    )
    d.set_defaults(func=run)


def run(args) -> int:
    if args.stream:
        from lab.stream import cli

        if args.backend is None:  # taps edit the ONNX graph: the stream runs where that graph runs (--backend says so)
            args.backend = "onnxruntime"
        return cli(args)
    from edge.format.io import write_json
    from lab.datasets import load_domains
    from lab.demo import evaluate_demo, format_table

    host_needed("edge demo")
    from lab.pipeline import DemoConfig, prepare_demo

    cfg = DemoConfig(model=args.model, seed=args.seed)
    art = prepare_demo(args.cache, cfg, progress=not args.quiet, backend=args.backend)
    domains = load_domains(cfg.domains, seed=cfg.seed)
    result = evaluate_demo(
        art.model,
        art.adapters,
        domains,
        backend=args.backend,
        strategy=args.strategy,
        threads=args.threads,
        lowbit_model=art.lowbit_model,
        lowbit_adapters=art.lowbit_adapters,
    )
    result["artifacts"] = {"model": str(art.model), "adapters": {k: str(v) for k, v in art.adapters.items()}}
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
