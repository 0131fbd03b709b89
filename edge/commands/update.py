"""``edge update``: learn from labelled samples on the device (numpy only) and save the state crash-safely."""

from __future__ import annotations

import contextlib
from pathlib import Path

from edge.commands import output_path, runtime_flags
from edge.commands.devices import devices_dir_flag


def register(sub) -> None:
    u = sub.add_parser("update", help="on-device update from labelled samples (no torch); resumable state")
    u.add_argument("--model", required=True, type=Path, help="exported model (.onnx) with a 'features' output")
    u.add_argument("--data", required=True, type=Path, help=".npz with 'x' and 'y', or a folder of them (in order)")
    u.add_argument("--method", default="slda", help="ncm, slda (default), ranpac or shira-head")
    u.add_argument("--state", type=output_path, help="state file: resumed if it exists, then saved (default: none)")
    u.add_argument("--memory-mb", type=float, help="memory budget of the update (default: device profile, or 64)")
    u.add_argument(
        "--device",
        help="device profile whose budget applies (see `edge devices`); its memory_mb also bounds the samples "
        "loaded (budgets only: the engine follows --backend)",
    )
    devices_dir_flag(u)
    u.add_argument("--domain", help="where the samples come from; ncm/slda/ranpac keep per-domain prototypes")
    u.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="method option")
    u.add_argument(
        "--taps",
        help="learn over these feature taps instead of the model's 'features' output (for a model exported with "
        "logits only): a tap set (auto, stages, attn, ...; NAME:K) or comma-separated tensor names; the tapped copy "
        "is the same model (same fingerprint: states and adapters apply to the file given); it is kept in the tap "
        "cache ($EDGE_TAP_CACHE, else ~/.cache/edge/taps; at most $EDGE_TAP_CACHE_MB megabytes, default 2048, 0: "
        "none), so a later run over the same model bytes and taps neither taps again nor imports onnx",
    )
    u.add_argument(
        "--tap-layout",
        action="append",
        default=[],
        metavar="TENSOR=LAYOUT",
        help="with --taps: a tap's layout where the graph does not tell it: channels-first (a conv's map, pooled "
        "over the axes after the channels) or channels-last (a token sequence [B, T, C], pooled over T); repeatable",
    )
    u.add_argument("--adapter-out", type=output_path, help="shira-head: also write the learned adapter file here")
    u.add_argument("--eval", type=Path, help=".npz with 'x' and 'y' to report accuracy on after the update")
    u.add_argument("--json", type=output_path, help="write the report as JSON here")
    runtime_flags(u, cache=False)
    u.set_defaults(func=run)


def run(args) -> int:
    from edge.runtime import Runtime

    budget, source = _budget(args)
    limit, limit_from = _samples_limit(args, budget)
    options = dict(_option(o) for o in args.option)
    with contextlib.ExitStack() as stack:
        rt = Runtime(_tapped(args, stack, options), backend=args.backend, threads=args.threads)
        return _run(args, rt, budget, source, limit, limit_from, options)


def _run(args, rt, budget, source, limit, limit_from, options) -> int:
    import json

    import numpy as np

    from edge.format.samples import load_samples
    from edge.format.state import state_lock
    from edge.learn.update import limit_blas_threads

    with limit_blas_threads(args.threads) as blas, rt:
        specs = getattr(rt.backend, "input_specs", None)  # the model's inputs: samples are checked on their headers
        chunks = load_samples(args.data, rt.info.inputs, max_array_bytes=limit, limit_from=limit_from, specs=specs)
        evals = None
        if args.eval is not None:  # held beside the samples: it takes from the same limit
            left = limit - sum(_nbytes(x) + np.asarray(y).nbytes for _, x, y in chunks)
            evals = load_samples(args.eval, rt.info.inputs, max_array_bytes=left, limit_from=limit_from, specs=specs)
        if evals is not None and len(evals) != 1:
            from edge.errors import ConfigError

            raise ConfigError(f"--eval takes one .npz file, got a folder of {len(evals)}")
        with state_lock(args.state):  # another `edge update --state` of the same file waits here: nothing is lost
            result, up = _learn(args, rt, chunks, budget, options)
            result.update({"budget_mb": budget, "budget_from": source, "blas_threads": blas})
            result.update({"samples_limit_bytes": limit, "samples_limit_from": limit_from})
            if evals is not None:
                ((_, x, y),) = evals
                result["eval_acc"] = float((up.predict(x) == np.asarray(y)).mean())
            if args.state is not None:
                result["state"] = str(up.save(args.state))
        if args.adapter_out is not None:
            result["adapter"] = str(up.to_adapter(args.adapter_out.stem).save(args.adapter_out))
    print(json.dumps(result, indent=1))
    if args.json:
        from edge.format.io import write_json

        write_json(args.json, result)
    return 0


def _tapped(args, stack, options) -> Path:
    """The model to run: ``--model``, or with ``--taps`` its tapped copy, kept between runs (a later run with the
    same model bytes and tap arguments taps nothing and imports no onnx: :mod:`edge.route.tapcache`)."""
    from edge.errors import ConfigError

    if not args.taps:
        if args.tap_layout:
            raise ConfigError("--tap-layout says the layout of a tap: it needs --taps (the taps to learn over)")
        return args.model
    from edge.route.tapcache import tapped_copy

    if args.model.suffix.lower() != ".onnx":  # it was read as ONNX: 'Wire format was corrupt'
        raise ConfigError(
            f"--taps adds feature outputs to an ONNX graph; {args.model} is not a .onnx file: pass its .onnx twin "
            "(edge update --model M.onnx --taps ...), or a model with a 'features' output (-o feature_output=NAME)"
        )
    layout: dict[str, str] = {}
    for tensor, value in map(_tap_layout, args.tap_layout):
        if layout.setdefault(tensor, value) != value:  # never the last one silently
            raise ConfigError(
                f"--tap-layout gives tap {tensor!r} two layouts ({layout[tensor]} and {value}); give it one"
            )
    path, features = tapped_copy(
        args.model, args.taps, layout, lambda src, dst: _tap(src, dst, args.taps, layout), stack
    )
    options.setdefault("feature_output", features)
    return path


def _tap(src: Path, dst: Path, taps: str, layout: dict[str, str]) -> str:
    """Write the tapped copy of ``src`` at ``dst`` (imports onnx); returns its feature output."""
    from edge.errors import ConfigError
    from edge.route.taps import tap_model
    from edge.route.tapsets import TAP_SETS

    spec = taps if taps.partition(":")[0] in TAP_SETS.names() else [t for t in taps.split(",") if t]
    try:
        return tap_model(src, dst, spec, layout=layout or None).features
    except ConfigError as e:  # tap_model speaks Python (layout={...}); say the flag too
        if "pass layout={" not in str(e):
            raise
        raise ConfigError(f"{e}; on the command line: --tap-layout TENSOR=channels-first|channels-last") from e


def _tap_layout(text: str) -> tuple[str, str]:
    """``--tap-layout TENSOR=LAYOUT``: split at the last '=' (a tensor name may hold one); tap_model checks both."""
    from edge.errors import ConfigError

    tensor, sep, value = text.rpartition("=")
    if not (sep and tensor and value):
        raise ConfigError(
            f"--tap-layout {text!r} must look like TENSOR=channels-first or TENSOR=channels-last (TENSOR one of the "
            "taps)"
        )
    return tensor, value


def _learn(args, rt, chunks, budget, options):
    """Resume the state (or start the method), learn every chunk; returns the report and the updater."""
    from edge.errors import ConfigError
    from edge.learn.update import Updater

    if args.state is not None and args.state.exists():
        up = Updater.load(args.state, rt, memory_mb=budget)
        if up.method_name != args.method:
            raise ConfigError(
                f"state {args.state} holds a {up.method_name!r} update, not {args.method!r}; "
                f"pass --method {up.method_name} or another --state"
            )
    else:
        try:
            up = Updater(rt, args.method, memory_mb=budget, **options)
        except ConfigError as e:  # shira-head over tap-set features: its head reads none of them
            if (
                args.method != "shira-head"
                or not args.taps
                or not (hint := _head_input(args.model, args.taps, options))
            ):
                raise
            raise ConfigError(f"{e}; {hint}") from e
    reports = [{"data": name, **up.partial_fit(x, y, domain=args.domain).as_dict()} for name, x, y in chunks]
    result = {
        "model": str(args.model),
        "method": up.method_name,
        "updates": reports,
        "classes": list(up.classes),
        "domains": list(up.domains),
        "samples_seen": up.samples_seen,
    }
    return result, up


def _head_input(model: Path, taps: str, options) -> str | None:
    """What to pass for a shira-head update over taps: the tensor the head reads (``--taps NAME``), and the head.

    The head is ``-o head=NAME``, else the target whose MatMul/Gemm/Conv makes the logits output (through Add,
    Identity, Reshape, Flatten, Squeeze); None when the graph shows neither, ``taps`` is that tensor, or the
    weight is no head's (a 3x3 filter).
    """
    from edge.convert.onnx_source import read_onnx
    from edge.format.modelinfo import onnx_info

    proto = read_onnx(model)  # bounded as tap_model read it: the file may have been swapped since (a FIFO)
    graph, info = proto.graph, onnx_info(proto)
    owner = {t.initializer: k for k, t in info.tensors.items()}
    producer = {o: n for n in graph.node for o in n.output}
    head, outs = options.get("head"), [o.name for o in graph.output]
    logits = options.get("logit_output", "logits" if "logits" in outs else outs[0] if len(outs) == 1 else "")
    if head in info.tensors:
        init = info.tensors[head].initializer
        node = next((n for n in graph.node if n.op_type in _HEAD_OPS and n.input[1:2] == [init]), None)
    else:
        value = logits
        while (node := producer.get(value)) is not None and node.op_type in _PASS:
            value = next((i for i in node.input if i in producer and producer[i].op_type != "Constant"), "")
        if node is None or node.op_type not in _HEAD_OPS or len(node.input) < 2 or node.input[1] not in owner:
            return None
        head = owner[node.input[1]]
    shape = tuple(info.tensors[head].shape)
    if node is None or taps == node.input[0] or not (len(shape) == 2 or shape[2:] == (1, 1)):  # not a head's
        return None  # tapped already, or a weight no head has (a 3x3 filter): the refusal is about something else
    named = f" -o logit_output={logits}" if logits not in ("logits", "") else ""
    return (
        f"shira-head learns over the features its head reads: pass --taps {node.input[0]} -o head={head}{named} "
        f"({node.op_type} {node.name or node.output[0]!r} reads {node.input[0]!r} with {head!r})"
    )


_HEAD_OPS = ("MatMul", "Gemm", "Conv")
_PASS = ("Add", "Identity", "Reshape", "Flatten", "Squeeze")


def _budget(args) -> tuple[float, str]:
    """The update's memory budget: the flag, else the device profile's, else the default."""
    from edge.learn.update import DEFAULT_MEMORY_MB

    if args.memory_mb is not None:
        return args.memory_mb, "--memory-mb"
    if args.device:
        from edge.devices import load_profile

        budgets = load_profile(args.device, search=getattr(args, "devices_dir", ())).budgets
        own = getattr(budgets, "update_mb", None)
        if own:
            return float(own), f"device {args.device}: budgets.update_mb"
        return min(DEFAULT_MEMORY_MB, float(budgets.memory_mb)), f"device {args.device}: default within memory_mb"
    return DEFAULT_MEMORY_MB, "default"


def _samples_limit(args, budget: float) -> tuple[int, str]:
    """Bytes the loaded samples (and --eval) may take: a share of the device's memory_mb, else the hard cap."""
    from edge.format.samples import MAX_ARRAY_BYTES, sample_limit

    if not args.device:
        return MAX_ARRAY_BYTES, f"the hard cap of {MAX_ARRAY_BYTES} bytes (no --device given)"
    from edge.devices import load_profile

    memory_mb = float(load_profile(args.device, search=getattr(args, "devices_dir", ())).budgets.memory_mb)
    return sample_limit(memory_mb, budget, source=f"device {args.device}")


def _nbytes(x) -> int:
    return sum(v.nbytes for v in x.values()) if isinstance(x, dict) else x.nbytes


def _option(text: str) -> tuple[str, object]:
    from edge.errors import ConfigError

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"method option {text!r} must look like KEY=VALUE (e.g. -o features=256)")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value
