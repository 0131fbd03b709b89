"""``edge demo --stream``: detection, growth and routing on a drifting stream of digits.

The stream visits D0 -> D1 -> D2 -> D1 -> D3 (default: clean -> rotate -> noise ->
rotate -> invert) in batches. The device starts with the base model (serving clean
digits) and pre-trained adapters for the *known* shifts (rotate, noise, blur); D3 has
no adapter, so the router must notice it (persistent OOD), fall back to the base model,
buffer its inputs, and grow a new adaptor: architecture picked under the budget by the
zero-shot proxy, trained on the device by default (numpy, :mod:`edge.learn.device_trainer`;
``grow_on="host"`` trains every block with torch instead), registered with its own
prototypes, then routed to. Labels travel with the stream: they feed prototype updates
and the growth buffer, never routing or predictions.

**Growth does not pause the stream** (``background``, default): training runs in a
child process at low priority (:class:`edge.learn.growth.GrowthJob`) and the router's refit
for the new domain on a shadow runtime in a thread (:meth:`Reconfigurator.add_grown_background`);
the stream is served meanwhile (novel inputs by the base model) and pauses only to
load the adapter and install the new detectors. ``background=False`` trains and refits
in line, pausing the stream for seconds, as a reference. The batch latencies during
growth are reported next to the steady ones. By default the stream arrives as fast as it
is served (the novel segment then ends before the adaptor is ready); ``rate`` paces it
like a sensor (inputs per second), e.g. 40, so the grown adaptor takes over mid-segment.

Any exported encoder with feature taps and a linear classifier works (``edge demo --stream
--model cnn`` runs the demo's CNN): the taps are ``StreamConfig.taps``, any tap set of
:mod:`edge.route.tapsets` (default ``auto``: declared, else after each transformer block's
attention, else after each CNN stage); ``edge demo --stream`` taps what ``edge bench ood``
serves on the ViT (:data:`lab.bench_ood.VIT_TAPS`, the normalised embedding alone) and ``auto``
on the CNN. On the ViT's default stream (load 10-13, one run each; ``auto`` -> ``attn-in:1``):
the novel invert segment voted OOD 99.4 -> 100 %, growth started at input 1872 -> 1856, the
grown domain routed 98.9 -> 100 % of its held-out inputs (accuracy 56.0 -> 56.9 %), every seen
domain afterwards routed 93.5 -> 93.7 % as served, rejected 2.3 -> 2.9 %, stream accuracy
61.9 -> 61.6 %. ``mlp-in:1`` failed it: invert voted OOD 53 %, a switch to ``blur`` on it, the
grown domain routed 72 %, every domain afterwards 89.4 % (:mod:`edge.route.tapsets`). Growth searches
``space``: by default the device trainer's name-based ``DEVICE_SPACE`` on a model with the
digits ViT's ``blocks.{i}.mlp.fc2`` names, else :data:`~edge.learn.tail.TAIL_SPACE` (the tail
found from the graph; on the CNN its pre-head and classifier).

Accuracy is reported per segment and overall next to two references over the same
inputs: the base model only, and an oracle that always applies the right pre-trained
adapter (for D3, one trained offline on its full training split). At the end every
seen domain's held-out test inputs (minus those used for growth) are routed again,
unlabelled. Routing is reported as it serves (:class:`lab.stream_report.Votes`): the share of a known
domain's inputs voted to it with the OOD threshold applied, and the share voted OOD.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge.errors import ConfigError
from edge.machine import load_average
from lab.stream_report import Votes, format_row, format_stream

__all__ = ["StreamConfig", "cli", "format_stream", "run_stream", "stream_taps"]

_Votes, _row = Votes, format_row  # their names before lab.stream_report (tests/lab/test_bench_ood.py uses them)


@dataclass(frozen=True)
class StreamConfig:
    """The drifting stream and the growth budget of ``edge demo --stream``."""

    sequence: tuple[str, ...] = ("clean", "rotate", "noise", "rotate", "invert")
    known: tuple[str, ...] = ("rotate", "noise", "blur")  # adapters loaded at start; clean = base model
    segment: int = 400  # inputs per segment; the last (novel) segment takes all its test inputs
    batch: int = 16
    seed: int = 0
    grow_epochs: int = 60  # host trainer epochs (the device trainer has its own defaults)
    memory_mb: float = 0.25  # the grown adapter's resident memory budget
    latency_ms: float = 5.0  # first inference after switching to it
    background: bool = True  # grow in a child process while the stream is served (False: pause the stream)
    grow_on: str = "device"  # "device": numpy trainer (edge.learn.device_trainer), "host": torch via the checkpoint
    rate: float | None = None  # inputs per second the stream arrives at (a sensor's pace); None: as fast as served
    taps: str = "auto"  # tap set (edge.route.tapsets; NAME:K its first K taps); edge demo --stream: the bench's

    def __post_init__(self) -> None:
        from edge.route.tapsets import tap_set

        tap_set(self.taps)  # an unknown set or a bad count fails here, naming the known ones
        if self.rate is not None and not self.rate > 0:
            raise ConfigError(f"rate must be > 0 inputs per second, got {self.rate}")
        if self.grow_on not in ("device", "host"):
            raise ConfigError(f"grow_on must be 'device' or 'host', got {self.grow_on!r}")


def run_stream(
    model: Path,
    adapters: dict[str, Path],
    checkpoint: Path,
    domains: dict,
    cfg: StreamConfig = StreamConfig(),
    *,
    backend: str = "onnxruntime",
    strategy: str = "auto",
    threads: int | None = None,
    budget=None,
    router_config=None,
    space=None,
    progress: bool = True,
) -> dict:
    """Run the stream (``checkpoint`` is only read when ``cfg.grow_on == "host"``); returns a JSON-able dict.

    ``space``: the growth search space (default: the device trainer's, see the module doc;
    with ``grow_on="host"``, :data:`~edge.learn.space.SEARCH_SPACE`).
    """
    from edge.format.adapter import load_adapter
    from edge.learn.growth import GrowthJob, grow
    from edge.learn.space import SEARCH_SPACE, Budget, last_fc2, measure_device
    from edge.route.router import Reconfigurator, RouterConfig
    from edge.route.taps import Head, tap_model
    from edge.runtime import Runtime
    from exporters.host_trainer import HostTrainer
    from lab.digits_model import load_checkpoint

    if backend != "onnxruntime":
        raise ConfigError(
            f"feature taps edit ONNX graphs; backend {backend!r} is not supported here, use --backend onnxruntime"
        )
    missing = [d for d in {*cfg.sequence, *cfg.known} if d not in domains]
    if missing or cfg.sequence[0] != "clean":
        raise ConfigError(f"stream domains {missing} are not loaded, or the stream does not start at 'clean'")
    novel = [d for d in cfg.sequence if d != "clean" and d not in cfg.known]
    if not novel:
        raise ConfigError(f"the stream {cfg.sequence} has no domain outside the known {cfg.known}: nothing to grow")
    head = Head(domains=len(cfg.known) + 1 + len(novel) + 2, classes=int(domains["clean"].y_train.max()) + 1)
    name = ".tapped-head.onnx" if cfg.taps == "auto" else f".tapped-{cfg.taps.replace(':', '-')}-stream-head.onnx"
    tapped = tap_model(model, model.with_name(model.stem + name), cfg.taps, head=head)
    rt = Runtime(tapped.path, backend=backend, strategy=strategy, threads=threads)
    loaded = {k: load_adapter(adapters[k]) for k in cfg.known}
    for k, a in loaded.items():
        rt.load_adapter(a, name=k)
    # the router refits on a shadow runtime, so the serving one keeps its weights while it does
    shadow = Runtime(tapped.path, backend=backend, strategy="bound", threads=1) if cfg.background else None
    for k, a in loaded.items() if shadow is not None else ():
        shadow.load_adapter(a, name=k)
    router = Reconfigurator(rt, tapped, router_config or RouterConfig(seed=cfg.seed))
    router.add_domain("clean", None, domains["clean"].x_train, domains["clean"].y_train)
    for k in cfg.known:
        router.add_domain(k, k, domains[k].x_train, domains[k].y_train)
    router.fit()
    device = measure_device(rt, domains["clean"].x_test, {k: a.nnz for k, a in loaded.items()})
    budget = budget or Budget(cfg.memory_mb, cfg.latency_ms)
    if cfg.grow_on == "device":
        from edge.learn.device_trainer import DEVICE_SPACE, TAIL_SPACE, DeviceTrainer

        trainer = DeviceTrainer(model, rt.info, seed=cfg.seed)
        space = space or (DEVICE_SPACE if last_fc2(list(rt.info.tensors)) else TAIL_SPACE)
    else:  # "host" (StreamConfig checks the choice)
        trainer = HostTrainer(checkpoint, rt.info, load=load_checkpoint, epochs=cfg.grow_epochs, seed=cfg.seed)
        space = space or SEARCH_SPACE
    workdir = model.parent / "grown"  # the grown adapters' files (GrowthJob writes them there)
    refs = _References(model, adapters, backend, threads)

    rng = np.random.default_rng(cfg.seed)
    segments, timeline, growth, used = [], [], [], {}
    known_as: dict[str, str] = {}  # a grown domain's truth -> its name in the router
    lat = {"steady": [], "growing": []}  # seconds per batch, outside and during background growth
    job, refit, pending = None, None, None
    pos = 0

    def trained(at: int) -> None:
        """The adapter is trained: load it, and refit the router (in the background when growing there)."""
        nonlocal refit
        res = job.result() if job is not None else pending["result"]  # waits only when the stream has ended
        t0 = time.perf_counter()
        new = pending["name"]
        rt.load_adapter(res.adapter, name=new)
        pending.update(result=res, trained_at=at)
        if shadow is not None:
            shadow.load_adapter(res.adapter, name=new)
            refit = router.add_grown_background(new, new, pending["x"], pending["y"], shadow=shadow)
        else:
            router.add_grown(new, new, pending["x"], pending["y"])
        pending["stall_s"] = time.perf_counter() - t0

    def register(at: int, si: int, name: str) -> None:
        """Use the refitted router: route to the new domain."""
        nonlocal job, refit, pending
        if refit is not None:
            refit.result()  # waits only when the stream has ended
        t0 = time.perf_counter()
        if refit is not None:
            router.commit(refit)
        router.take_buffer()  # novel inputs collected meanwhile: the new domain has its own data now
        stall = pending["stall_s"] + time.perf_counter() - t0
        res, background = pending["result"], job is not None
        wall = time.perf_counter() - job.started if background else res.train_s
        growth.append(
            {
                "name": pending["name"],
                "truth": pending["truth"],
                "started_at": pending["at"],
                "trained_at": pending["trained_at"],
                "at": at,
                "background": background,
                "wall_s": round(wall, 2),
                "refit_s": round(refit.seconds, 3) if refit is not None else None,
                "stall_ms": round(1e3 * (stall + (0.0 if background else res.train_s)), 1),
                "batches_while_growing": pending["batches"],
                **res.as_dict(),
            }
        )
        timeline.append({"at": at, "segment": si, "truth": name, "event": f"grow:{pending['name']}"})
        known_as[pending["truth"]] = pending["name"]
        job, refit, pending = None, None, None

    t_start = time.perf_counter()
    for si, name in enumerate(cfg.sequence):
        d = domains[name]
        order = rng.permutation(len(d.x_test))
        if name not in novel:
            order = order[: cfg.segment]
        x, y = d.x_test[order], d.y_test[order]
        served, correct = [], []
        ood, votes = 0, Votes()
        for s in range(0, len(x), cfg.batch):
            xb, yb = x[s : s + cfg.batch], y[s : s + cfg.batch]
            if cfg.rate is not None:  # wait for the batch's last input to arrive
                time.sleep(max(0.0, t_start + (pos + s + len(xb)) / cfg.rate - time.perf_counter()))
            t0 = time.perf_counter()
            step = router.process(xb, yb)
            lat["growing" if pending else "steady"].append(time.perf_counter() - t0)
            served += [step.served_by] * len(xb)
            correct += list(step.logits.argmax(1) == yb)
            ood += int(step.ood.sum())
            votes.add(step, known_as.get(name, name))
            at = pos + s + len(xb)
            if step.event:
                timeline.append({"at": at, "segment": si, "truth": name, "event": step.event})
            if pending is not None:
                pending["batches"] += 1
                if "result" not in pending and job.done():
                    trained(at)
                elif refit is not None and refit.done():
                    register(at, si, name)
            elif router.growth_ready:
                bx, by = router.take_buffer()
                new = f"new-{len(growth) + 1}"
                pending = {"name": new, "x": bx, "y": by, "truth": name, "at": at, "batches": 0}
                used[name] = used.get(name, set()) | {bytes(v) for v in bx}
                timeline.append({"at": at, "segment": si, "truth": name, "event": f"grow-start:{new}"})
                how = {"trainer": trainer, "budget": budget, "name": new, "device": device, "space": space}
                if cfg.background:
                    _say(progress, f"growing adaptor {new} from {len(bx)} novel inputs in the background")
                    job = GrowthJob(rt, bx, by, workdir=workdir, **how)
                else:
                    _say(progress, f"growing adaptor {new} from {len(bx)} novel inputs (stream paused)")
                    pending["result"] = grow(rt, bx, by, **how)
                    trained(at)
                    register(at, si, name)
        base_acc, oracle_acc = refs.accuracy(x, y, name)
        segments.append(
            {
                "domain": name,
                "inputs": len(x),
                "acc": float(np.mean(correct)),
                "base_acc": base_acc,
                "oracle_acc": oracle_acc,
                "ood_share": ood / len(x),
                "served_by": {k: v / len(x) for k, v in Counter(served).items()},
                **votes.as_dict(),
            }
        )
        pos += len(x)

    if pending is not None:  # the stream ended while growing: wait for it, then evaluate with it
        _say(progress, f"the stream ended while {pending['name']} grows; waiting for it")
        t0 = time.perf_counter()
        if "result" not in pending:
            trained(pos)
        register(pos, len(cfg.sequence) - 1, cfg.sequence[-1])
        growth[-1]["waited_after_stream_s"] = round(time.perf_counter() - t0, 2)
    final = _final_eval(router, refs, domains, cfg, used, known_as)
    total = sum(s["inputs"] for s in segments)
    st = router.stats
    result = {
        "model": rt.info.name,
        "config": asdict(cfg),
        "budget": {k: (None if v == float("inf") else v) for k, v in asdict(budget).items()},
        "router": asdict(router.config),
        "taps": list(tapped.tensors),
        "tap_set": cfg.taps,
        "device": device,
        "segments": segments,
        "overall": {
            **{k: sum(s[k] * s["inputs"] for s in segments) / total for k in ("acc", "base_acc", "oracle_acc")},
            **Votes.pooled(segments),
        },
        "timeline": timeline,
        "growth": growth,
        "final": final,
        "final_routing": Votes.pooled(final),
        "switches": st["switches"],
        "batch_ms": {
            k: {
                "batches": len(v),
                "p50": 1e3 * float(np.median(v)),
                "p95": 1e3 * float(np.percentile(v, 95)),
                "max": 1e3 * float(np.max(v)),
            }
            for k, v in lat.items()
            if v
        },
        "scoring": router.scoring,
        "detect_pct": 100.0 * (st["detect_s"] - st["learn_s"] - st["write_s"]) / max(st["infer_s"], 1e-12),
        "learn_pct": 100.0 * st["learn_s"] / max(st["infer_s"], 1e-12),
        "write_pct": 100.0 * st["write_s"] / max(st["infer_s"], 1e-12),
        "domains_known_at_end": router.domains,
        "load_avg": load_average(),
    }
    rt.close()
    refs.close()
    if shadow is not None:
        shadow.close()
    return result


class _References:
    """Base-only and oracle predictions on the untapped model (oracle: every domain's pre-trained adapter)."""

    def __init__(self, model: Path, adapters: dict[str, Path], backend: str, threads: int | None) -> None:
        from edge.runtime import Runtime

        self.rt = Runtime(model, backend=backend, threads=threads)
        for k, p in adapters.items():
            self.rt.load_adapter(p, name=k)

    def accuracy(self, x: np.ndarray, y: np.ndarray, domain: str) -> tuple[float, float]:
        accs = []
        for state in (None, domain if domain in self.rt.adapters else None):
            self.rt.switch(state)
            accs.append(float((self.rt.run({self.rt.info.inputs[0]: x})["logits"].argmax(1) == y).mean()))
        return accs[0], accs[1]

    def close(self) -> None:
        self.rt.close()


def _final_eval(router, refs, domains, cfg: StreamConfig, used: dict, known_as: dict) -> list[dict]:
    """Route every seen domain's test inputs (minus growth data) again, unlabelled, domain after domain."""
    rows = []
    for name in dict.fromkeys(cfg.sequence):
        d = domains[name]
        keep = np.array([bytes(v) not in used.get(name, set()) for v in d.x_test])
        x, y = d.x_test[keep], d.y_test[keep]
        served, correct, votes = [], [], Votes()
        for s in range(0, len(x), cfg.batch):
            step = router.process(x[s : s + cfg.batch])
            votes.add(step, known_as.get(name, name))
            served += [step.served_by] * len(step.logits)
            correct += list(step.logits.argmax(1) == y[s : s + cfg.batch])
        base_acc, oracle_acc = refs.accuracy(x, y, name)
        top, n = Counter(served).most_common(1)[0]
        rows.append(
            {
                "domain": name,
                "inputs": len(x),
                "acc": float(np.mean(correct)),
                "base_acc": base_acc,
                "oracle_acc": oracle_acc,
                "served_mostly_by": top,
                "served_share": n / len(x),
                **votes.as_dict(),
            }
        )
    return rows


def _say(progress: bool, msg: str) -> None:
    if progress:
        import sys

        print(f"[edge] {msg}", file=sys.stderr, flush=True)


def stream_taps(family: str) -> str:
    """The tap set ``edge demo --stream`` serves on a demo encoder family: what ``edge bench ood`` serves on the
    ViT (:data:`lab.bench_ood.VIT_TAPS`, module doc); ``auto`` on the CNN (its stream is measured with two taps)."""
    from lab.bench_ood import VIT_TAPS

    return VIT_TAPS if family == "vit" else "auto"


def cli(args) -> int:
    """``edge demo --stream`` (host + device: the demo's artifacts are built or reused, growth trains on the host)."""
    from edge.commands import host_needed
    from edge.format.io import write_json
    from lab.datasets import load_domains

    host_needed("edge demo --stream")
    from lab.pipeline import DemoConfig, prepare_demo

    demo = DemoConfig(model=getattr(args, "model", "vit"), seed=args.seed)
    if demo.model != "vit" and getattr(args, "grow_on", "device") == "host":
        raise ConfigError(
            f"--grow-on host searches the ViT's attention and MLP layer sets, which model {demo.model!r} does not "
            "have; grow on the device (the default), which finds the trainable tail of any model from its graph"
        )
    art = prepare_demo(args.cache, demo, progress=not args.quiet)
    cfg = StreamConfig(
        seed=args.seed,
        background=not getattr(args, "grow_blocking", False),
        grow_on=getattr(args, "grow_on", "device"),
        rate=getattr(args, "rate", None),
        taps=stream_taps(demo.model),
    )
    domains = load_domains(demo.domains, seed=demo.seed)
    budget = None
    if getattr(args, "grow_device", None):
        from edge.devices import load_profile
        from edge.learn.space import Budget

        budget = Budget.of(load_profile(args.grow_device))
    result = run_stream(
        art.model,
        art.adapters,
        art.model.parent / "encoder.safetensors",
        domains,
        cfg,
        backend=args.backend,
        strategy=args.strategy,
        threads=args.threads,
        budget=budget,
        progress=not args.quiet,
    )
    print(format_stream(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
