"""Profile a model on the machine this runs on, under a device profile's options and budgets.

    result = profile_model("encoder.onnx", "rpi5", adapters=["shira-rotate.safetensors"])
    print(format_markdown(result))
    plot(result, "profile.png")                 # False (and no file) without matplotlib

Measures model load time, first-inference time, inference latency (p50/p95/p99 over
``runs`` timed runs after ``warmup``), per adapter the switch time, the first run after
a switch and the time until the backend settles, peak resident memory, file sizes and
the providers that actually ran, and checks each against the profile's budgets. The model's files
for the profile's other backends (``M.onnx`` beside ``M.tflite``) are compared too (:mod:`edge.engines`).
Device side only: numpy, the backend, and matplotlib only if a plot is asked for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.engine_feeds import cast_feeds
from edge.engines import runtime_version
from edge.errors import AdapterMismatchError, ConfigError
from edge.format.adapter import adapter_header, max_adapter_bytes
from edge.format.feeds import generate_inputs
from edge.format.samples import read_npz
from edge.machine import load_average, machine, peak_rss_mb, status_mb
from edge.profile_report import format_markdown, plot
from edge.progress import bar

__all__ = [
    "PROFILE_FORMAT",
    "PROFILE_VERSION",
    "ProfileConfig",
    "format_markdown",
    "generate_inputs",
    "plot",
    "profile_model",
]

PROFILE_FORMAT = "edge.profiling"
PROFILE_VERSION = 1


@dataclass(frozen=True)
class ProfileConfig:
    """How much to measure."""

    runs: int = 200  # timed inference runs
    warmup: int = 20  # untimed runs before them
    switches: int = 20  # timed switches per adapter
    batch: int = 1  # size given to symbolic dimensions of generated inputs
    seed: int = 0  # generated inputs
    progress: bool = True  # progress bar on stderr (tqdm, if installed)
    engine_rounds: int = 5  # engines found beside the model: interleaved rounds of `engine_runs` runs each
    engine_runs: int = 10  # (0: no engine comparison)
    clip: bool = False  # an int8 base: clip adapter entries past the integer range (counted) instead of refusing


def profile_model(
    model: str | os.PathLike,
    device,
    *,
    adapters: Sequence[str | os.PathLike] = (),
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    backend: str | None = None,
    config: ProfileConfig = ProfileConfig(),
    devices_dir: Sequence[str | os.PathLike] = (),
    dims: Mapping[str, int] | None = None,
) -> dict:
    """Measure ``model`` under ``device`` (profile name, YAML path or DeviceProfile); returns a JSON-able dict.

    ``backend="auto"``: what ``Runtime(model, device=device)`` runs, the engine :func:`~edge.engine_cache.cached_engine`
    chose (measured before the timed load on generated inputs, kept for the device; ``inputs`` and
    ``config.engine_rounds`` do not change it) with its twins' adapters; an adapter that fits neither raises before
    any timing. A backend named (default: the file's suffix) runs alone and the engines beside it are compared
    (``result["engines"]``, ``engine_report``). ``dims``: named input dimensions fixed to sizes, as
    ``Runtime(dims=...)`` takes them (over the profile's); generated inputs take those sizes.
    """
    from edge.devices import check_fits, load_profile
    from edge.engine_cache import cached_engine
    from edge.engines import EngineFile, engine_report
    from edge.format.paths import not_a
    from edge.runtime import Runtime

    model = Path(model)
    if not model.is_file():
        raise ConfigError(
            f"model file {model} {not_a(model, 'a regular file')}; give an exported .onnx or .tflite file"
        )
    adapters = [Path(a) for a in adapters]
    for a in adapters:
        if not a.is_file():
            raise ConfigError(f"adapter file {a} {not_a(a, 'a regular file')}; give adapter .safetensors files")
    profile = load_profile(device, search=devices_dir)
    check_fits(model, profile)  # as Runtime(model, device=...) does: a file over the memory budget is never read
    chosen = None
    if backend == "auto":  # measured here before the timed load; Runtime below reads the choice back as a device does
        cached_engine(model, device=profile, dims=dims)  # the key Runtime's choice has (the profile's dims in it)
    else:
        backend = backend or _backend_for(model)  # Runtime applies the profile's fallback policy to it

    rss_before = status_mb("VmRSS")
    t0 = time.perf_counter()
    rt = Runtime(
        model, backend=backend, device=profile, dims=dims
    )  # options, fallback, keys, budget: as on the device itself
    load_ms = _ms(t0)
    asked, read = model, [None] * len(adapters)  # read: each adapter's one read, when auto checked it first
    if backend == "auto":  # the engine Runtime chose, and its file: adapters for its twins load on it
        chosen, model, backend = rt.engine_choice, rt.engine_choice.path, rt.engine_choice.backend
    try:
        options = profile.backend_options(backend, quiet=True)  # what the report says ran (Runtime logged it)
        # inputs from the engine that runs (its specs, read at load, carry the dims' sizes), not the file asked for
        own = getattr(rt.backend, "input_specs", None) or None
        _check_batch(config, inputs, rt.dims)
        feeds, input_source = _feeds(model, rt.info.inputs, inputs, config, own)
        if chosen and inputs is not None:  # given for the file asked: in the dtypes the chosen one takes
            feeds = cast_feeds(feeds, own or {}, EngineFile(backend, model))  # e.g. int32 ids for LiteRT
        fits = rt.info.fits
        # an adapter is read through the runtime's signature policy (unsigned: refused before a byte is parsed),
        # once: auto checks that each fits the chosen file, and that read is what is loaded
        read = [_read(rt, a) for a in adapters] if chosen else read
        if chosen and (stray := [str(a) for a, r in zip(adapters, read) if r[1].get("base_fingerprint") not in fits]):
            hint = f"--backend {_backend_for(asked)} profiles {asked.name} itself"
            raise AdapterMismatchError(f"adapter(s) {stray} do not fit {model.name}, chosen by auto: {hint}")
        t0 = time.perf_counter()
        reference = rt.run(feeds)
        first_ms = _ms(t0)

        total = config.warmup + config.runs + len(adapters) * config.switches
        with bar(
            total=total, desc=f"profile {model.name} ({profile.name})", unit="call", disable=not config.progress
        ) as pb:
            for _ in range(config.warmup):
                rt.run(feeds)
                pb.update()
            latency = []
            for _ in range(config.runs):
                t0 = time.perf_counter()
                rt.run(feeds)
                latency.append(_ms(t0))
                pb.update()
            per_adapter, switch_all = [], []
            for i, path in enumerate(adapters):
                figures, switches = _profile_adapter(rt, path, feeds, config, pb, read[i])
                read[i] = None  # its bytes are loaded: not kept for the rest of the run
                per_adapter.append(figures)
                switch_all += switches
            held_bytes = rt.adapter_bytes  # once, all held: per adapter it walked every adapter held (n^2)
            for figures in per_adapter:
                figures["held_bytes"] = held_bytes[figures["name"]]  # positions, values, base values, writes
        peak = max(peak_rss_mb(), rss_before or 0.0)  # the kernel's counters lag: never under a level seen
        held = rt.footprint  # the model's predicted footprint and the adapters held together, against the budget
        providers = list(rt.providers)
        strategy = rt.strategy
        fingerprint = rt.info.fingerprint
    finally:
        rt.close()

    accuracy = _check_against_cpu(model, backend, providers, profile, feeds, reference, rt.dims)
    engines = engine_report(  # the engines beside it, under the dims auto applies (edge.engine_cache.with_dims)
        model, profile, feeds, options.threads, config.engine_rounds, config.engine_runs, chosen, dims=dims
    )
    result = {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "model": {"path": str(model), "name": model.stem, "bytes": model.stat().st_size, "fingerprint": fingerprint},
        "device": {
            "name": profile.name,
            "description": profile.description,
            "architecture": profile.architecture,
            "source": str(profile.source),
            "fallback": profile.fallback,
            "fallback_warning": options.fallback_warning,
        },
        "machine": machine(),
        "load_avg": load_average(),
        "backend": backend,
        "runtime": runtime_version(backend),
        "strategy": strategy,
        "dims": dict(rt.dims),  # named input dimensions fixed to sizes (edge.dims; the profile's and --dim)
        "threads": options.threads,
        "providers_requested": list(options.providers),
        "providers": providers,
        "inputs": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype), "source": input_source} for k, v in feeds.items()
        },
        "load_ms": load_ms,
        "first_inference_ms": first_ms,
        "latency_ms": _stats(latency, config.warmup),
        "adapters": per_adapter,
        "switch_p95_ms": _pct(switch_all, 95) if switch_all else None,
        "memory": {
            "rss_before_load_mb": rss_before,
            "peak_rss_mb": peak,
            "predicted_mb": held["predicted_mb"],  # the model under its strategy (None: the backend predicts none)
            "adapters_mb": held["adapters_mb"],  # every adapter profiled, held at once (shared arrays once)
            "room_mb": held["room_mb"],  # what the memory budget has left for more adapters
        },
        "accuracy": accuracy,
        "engines": engines,  # with backend="auto": its choice["reason"] says why this backend ran
    }
    result["budgets"] = _budgets(profile.budgets, result)
    return result


def _read(rt, path: Path):
    """``path`` read once through ``rt``'s signature policy, bounded by the largest adapter of its model: the file
    (:class:`~edge.format.signing.ReadFile`, which ``rt.load_adapter`` takes without reading it again, its kept
    signature checked again in memory), its metadata and the read's time (ms). An unsigned or wrongly signed file is
    a SignatureError before any byte of it is parsed."""
    t0 = time.perf_counter()
    held = rt.policy.read_file(path, max_adapter_bytes(rt.info))
    return held, adapter_header(held.data, str(path)), _ms(t0)


def _check_batch(config: ProfileConfig, inputs, dims: Mapping[str, int]) -> None:
    """``--batch`` sizes the named dimensions generated inputs leave free; one ``dims`` fixes (``--dim batch=M``, or
    the profile's) wins, so a ``--batch`` that contradicts it is refused rather than ignored."""
    fixed = dims.get("batch")
    if inputs is None and config.batch != 1 and fixed is not None and fixed != config.batch:
        raise ConfigError(
            f"--batch {config.batch} contradicts dims batch={fixed} (--dim or the device profile's dims), which every "
            f"session runs at: drop --batch, or give --dim batch={config.batch}"
        )


def _profile_adapter(rt, path: Path, feeds, config: ProfileConfig, pb, read=None) -> tuple[dict, list[float]]:
    """Load one adapter (kept loaded: the device holds every adapter it serves, and its memory budget counts
    them), then ``switches`` times: switch to it, run once, wait until settled, switch back. Its name and its load
    come from one read of the file (:func:`_read`; ``read``: the one auto's fit check made, not read again).

    Returns its figures and the raw switch times (for the percentile over all adapters).
    """
    t0 = time.perf_counter()  # the load's time: the read and the signature check included, as before
    held, head, read_ms = read or _read(rt, path)
    t0 -= read_ms / 1e3 if read else 0.0  # a read made earlier counts in the load's time too
    own = str(head.get("name", path.stem))  # adapters stay loaded, as on the device: a name taken gets a suffix
    name, n, taken = own, 1, set(rt.adapters)
    while name in taken:  # never the name of one held: loading under it would replace that adapter
        n += 1
        name = f"{own}#{n}"
    name = rt.load_adapter(held, name, clip=config.clip)  # under a memory budget: refused past it (ConfigError)
    load_ms = _ms(t0)
    switch, first_run, settle, back = [], [], [], []
    for _ in range(config.switches):
        t0 = time.perf_counter()
        rt.switch(name)
        switch.append(_ms(t0))
        clipped = rt.clipped  # entries of an int8 base clipped to its range (load_adapter(clip=True))
        t0 = time.perf_counter()
        rt.run(feeds)
        first_run.append(_ms(t0))
        t0 = time.perf_counter()
        rt.wait_settled(60)
        settle.append(_ms(t0))
        t0 = time.perf_counter()
        rt.switch(None)
        back.append(_ms(t0))
        rt.wait_settled(60)
        pb.update()
    figures = {
        "name": name,
        "path": str(path),
        "bytes": len(held.data),  # the bytes read and loaded
        "held_bytes": None,  # filled in once every adapter is held (what an adapter shares counts with the first)
        "load_ms": load_ms,
        "clipped": clipped,
        "switch_ms": _stats(switch),
        "first_run_after_switch_ms": _stats(first_run),
        "settle_ms": _stats(settle),
        "switch_back_ms": _stats(back),
    }
    return figures, switch


# -- inputs -------------------------------------------------------------------------------------
def _backend_for(model: Path) -> str:
    from runtimes import backend_for_path

    try:
        return backend_for_path(model)
    except ConfigError as e:
        raise ConfigError(f"{e}; pass --backend") from None


def _feeds(model: Path, names: Sequence[str], inputs, config: ProfileConfig, specs=None) -> tuple[dict, str]:
    if inputs is None:
        return generate_inputs(model, names, batch=config.batch, seed=config.seed, specs=specs), "generated"
    if isinstance(inputs, Mapping):
        feeds, source = {k: np.asarray(v) for k, v in inputs.items()}, "given"
    else:
        feeds, source = read_npz(inputs), str(inputs)
    missing = [n for n in names if n not in feeds]
    extra = [n for n in feeds if n not in names]
    if missing or extra:
        raise ConfigError(
            f"inputs {source}: missing {missing}, unknown {extra}; the model takes {list(names)} "
            "(save one array per input with np.savez)"
        )
    return feeds, source


# -- checks ------------------------------------------------------------------------------------
def _check_against_cpu(model, backend, providers, profile, feeds, outputs, dims=None) -> dict | None:
    """Outputs of the providers that ran vs the same model on the backend's CPU provider (skipped if CPU ran)."""
    from edge.runtime import Runtime
    from runtimes import get_backend

    cpu = get_backend(backend).CPU_PROVIDER
    if cpu is None or providers == [cpu]:
        return None
    with Runtime(model, backend=backend, providers=[cpu], dims=dims) as ref:
        expected = ref.run(feeds)
    checks = {k: profile.tolerances.check(outputs[k], expected[k]) for k in expected}
    return {
        "reference": cpu,
        "atol": profile.tolerances.atol,
        "rtol": profile.tolerances.rtol,
        "max_abs_diff": {k: d for k, (d, _) in checks.items()},
        "ok": all(ok for _, ok in checks.values()),
    }


def _budgets(budgets, result: dict) -> dict:
    measured = {
        "memory_mb": result["memory"]["peak_rss_mb"],
        "load_ms": result["load_ms"],
        "latency_p95_ms": result["latency_ms"]["p95"],
        "switch_p95_ms": result["switch_p95_ms"],
    }
    out = {}
    for key, value in measured.items():
        limit = getattr(budgets, key)
        out[key] = {"budget": limit, "measured": value, "ok": None if value is None else bool(value <= limit)}
    return out


# -- numbers ------------------------------------------------------------------------------------
def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _pct(xs, q: float) -> float:
    return float(np.percentile(np.asarray(xs, np.float64), q))


def _stats(xs: Sequence[float], warmup: int | None = None) -> dict:
    a = np.asarray(xs, np.float64)
    out = {
        "n": int(a.size),
        "p50": _pct(a, 50),
        "p95": _pct(a, 95),
        "p99": _pct(a, 99),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
        "samples": [round(float(x), 5) for x in a],
    }
    if warmup is not None:
        out["warmup"] = warmup
    return out
