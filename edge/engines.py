"""Which engine runs a model fastest here: its files for each backend, compared by measurement.

One exported model may sit beside itself for several backends, ``encoder.onnx`` and
``encoder.tflite`` (same folder, same stem, the suffixes of :data:`runtimes.TABLE`)::

    found, skipped = find_engines("encoder.onnx", profile)    # what can run here, and why not the rest
    figures = compare_engines(found, feeds, profile=profile)  # p50/p99 each, ratios paired within rounds
    choice = choose_engine("encoder.onnx", device="x86-dev")  # the fastest, and why

Engines are the backends the device profile lists, in its order (without a profile: the model's
own backend, then every other one installed). A file is one engine only if its metadata names the
same model with the same inputs and outputs, and its outputs agree with the first engine's within
the profile's tolerances on the feeds measured; anything left out is named with the reason. Timing
runs each engine at its full-speed steady state (strategy ``rebuild``: the session a ``hybrid``
runtime serves once settled), in interleaved rounds, with the load average recorded. Under a device profile's
memory budget, an engine whose predicted footprint does not fit is left out before it is built, and one that fits
only a lighter strategy is measured at it (:mod:`edge.engine_budget`). An engine with ``dims``
(:attr:`EngineFile.dims`, :mod:`edge.dims`) is predicted, built and fed at those sizes. The choice
is the fastest by paired p50 ratio, except that an engine earlier in the profile's order wins
when within ``margin`` of it. Device side only: numpy and the backends.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edge.engine_choice import MARGIN, EngineChoice
from edge.engine_feeds import cast_feeds as _cast_feeds
from edge.engine_feeds import feeds_for, generated_feeds
from edge.errors import BackendUnavailableError, ConfigError
from edge.format.feeds import check_feeds
from edge.machine import load_average

__all__ = [
    "MARGIN",
    "EngineChoice",
    "EngineFile",
    "choose_engine",
    "compare_engines",
    "decide",
    "engine_report",
    "feeds_for",
    "find_engines",
    "format_engines",
    "generated_feeds",
    "runtime_version",
    "twins_of",
    "unmeasured",
]

log = logging.getLogger("edge.engines")


@dataclass(frozen=True)
class EngineFile:
    """One backend and the model file it runs."""

    backend: str
    path: Path
    fingerprint: str | None = field(default=None, compare=False)  # the file's own: adapters name it
    source: str | None = field(default=None, compare=False)  # ModelInfo.source_fingerprint: twins share it
    strategy: str = field(default="rebuild", compare=False)  # what it is measured at (edge.engine_budget.fit_budget)
    dims: tuple[tuple[str, int], ...] = field(default=(), compare=False)  # named dims fixed (edge.engine_dims)


def find_engines(model: str | os.PathLike, profile=None) -> tuple[list[EngineFile], dict[str, str]]:
    """The files of ``model`` that a backend can run here, in preference order, and why each other backend can't.

    ``model`` is one of the files; its siblings are the same path with another backend's suffix.
    Raises :class:`ConfigError` if ``model`` does not exist or has no known suffix.
    """
    from edge.devices import backend_status, resolve_providers
    from runtimes import TABLE, backend_for_path, model_files, read_model_info

    model = Path(model)
    if not model.is_file():
        raise ConfigError(f"model file {model} does not exist")
    own = backend_for_path(model)
    order = [b.backend for b in profile.backends] if profile is not None else [own, *(b for b in TABLE if b != own)]
    info = read_model_info(model, own)
    files = {**model_files(model), own: model}
    found, skipped = [], {}
    for backend in order:
        path = files.get(backend)
        if path is None:
            skipped[backend] = f"no {' or '.join(model.stem + s for s in TABLE[backend][1])} beside {model.name}"
            continue
        status = backend_status(backend)
        if status != "installed":
            skipped[backend] = status
            continue
        if profile is not None:
            try:
                resolve_providers(profile, backend, quiet=True)  # the runtime logs its fallback once
            except (BackendUnavailableError, ConfigError) as e:
                skipped[backend] = str(e)
                continue
        other = info
        if path != model:
            other = read_model_info(path, backend)
            differs = [k for k in ("name", "inputs", "outputs") if getattr(other, k) != getattr(info, k)]
            if differs:
                verb = "differs" if len(differs) == 1 else "differ"
                skipped[backend] = f"{path.name} is another model than {model.name} (its {', '.join(differs)} {verb})"
                continue
        found.append(EngineFile(backend, path, other.fingerprint, other.source_fingerprint))
    if profile is not None:
        for backend in TABLE:
            if backend not in order:
                skipped.setdefault(backend, f"device profile {profile.name!r} does not list it")
    return found, skipped


def compare_engines(
    engines: Sequence[EngineFile],
    feeds: Mapping[str, np.ndarray],
    *,
    profile=None,
    threads: int | None = None,
    rounds: int = 5,
    runs: int = 10,
    warmup: int = 5,
) -> dict:
    """Latency of each engine on ``feeds`` (interleaved rounds) and its outputs against the first engine's.

    Returns a JSON-able dict: ``reference`` (the first engine), ``rounds``, ``runs_per_round``,
    ``load_avg`` before and after, and per backend ``path``, ``providers``, ``p50_ms``, ``p99_ms``,
    ``ratio`` (median over rounds of its round p50 over the reference's, paired), ``round_p50_ms``, ``max_abs_diff``
    and ``agrees`` (within the profile's tolerances, or atol 1e-4, rtol 1e-3).
    """
    if not engines:
        raise ConfigError("no engine to compare")
    if min(rounds, runs) < 1 or warmup < 0:
        raise ConfigError(f"rounds and runs must be at least 1 and warmup 0 or more; got {rounds}, {runs}, {warmup}")
    atol, rtol = (profile.tolerances.atol, profile.tolerances.rtol) if profile is not None else (1e-4, 1e-3)
    load_before = load_average()
    opened: dict[str, tuple[object, dict]] = {}
    try:
        for e in engines:
            backend, specs = _open(e, profile, threads)
            opened[e.backend] = (backend, {})  # closed below even if its feeds are refused
            opened[e.backend] = (backend, check_feeds(_cast_feeds(feeds, specs, e), specs))
        outputs = {b: be.run(f) for b, (be, f) in opened.items()}
        for be, f in opened.values():
            for _ in range(warmup):
                be.run(f)
        times: dict[str, list[list[float]]] = {b: [] for b in opened}
        names = list(opened)
        for r in range(rounds):
            for b in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
                be, f = opened[b]
                times[b].append(_timed(be, f, runs))
        providers = {b: list(be.providers) for b, (be, _) in opened.items()}
    finally:
        for be, _ in opened.values():
            be.close()
    ref = engines[0].backend
    ref_p50 = np.median(np.asarray(times[ref]), axis=1)
    result = {
        "reference": ref,
        "rounds": rounds,
        "runs_per_round": runs,
        "warmup": warmup,
        "threads": threads if threads is not None else (profile.threads if profile is not None else None),
        "load_avg": {"before": load_before, "after": load_average()},
        "atol": atol,
        "rtol": rtol,
        "engines": {},
    }
    for e in engines:
        t = np.asarray(times[e.backend])
        diff, agrees = _agreement(outputs[ref], outputs[e.backend], atol, rtol)
        result["engines"][e.backend] = {
            "path": str(e.path),
            "providers": providers[e.backend],
            "p50_ms": float(np.median(t)),
            "p99_ms": float(np.percentile(t, 99)),
            "ratio": float(np.median(np.median(t, axis=1) / ref_p50)),
            "round_p50_ms": [float(x) for x in np.median(t, axis=1)],  # for other pairings (edge bench engines)
            "strategy": e.strategy,  # what it was measured at
            "max_abs_diff": diff,
            "agrees": agrees,
        }
    return result


def choose_engine(
    model: str | os.PathLike,
    *,
    device=None,
    threads: int | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
    margin: float = MARGIN,
    rounds: int = 5,
    runs: int = 10,
) -> EngineChoice:
    """The engine that runs ``model`` fastest here among those :func:`find_engines` finds, and why.

    ``device`` is a profile (name, path or DeviceProfile) or None; ``feeds`` default to inputs made from
    an ``.onnx`` file's metadata. Raises :class:`BackendUnavailableError` when no engine can run it.
    """
    from edge.devices import load_profile
    from edge.engine_budget import fit_budget

    profile = load_profile(device) if device is not None else None
    found, skipped = find_engines(model, profile)
    found = fit_budget(found, skipped, profile)  # before any is built: the measuring must fit the budget too
    only = unmeasured(model, found, skipped)
    if only is not None:
        return only
    if feeds is None:
        feeds = generated_feeds(found)
    figures = compare_engines(found, feeds, profile=profile, threads=threads, rounds=rounds, runs=runs)
    choice = decide(found, figures, skipped, margin)
    log.info("engine for %s: %s", Path(model).name, choice.reason)
    return choice


def unmeasured(model: str | os.PathLike, found: Sequence[EngineFile], skipped: Mapping[str, str]):
    """The choice when there is nothing to measure: the one engine ``found``, or None when there are several;
    raises :class:`BackendUnavailableError` naming why each was ``skipped`` when there is none."""
    if not found:
        why = "; ".join(f"{b}: {s}" for b, s in skipped.items())
        raise BackendUnavailableError(f"no engine here can run {Path(model).name}: {why}")
    if len(found) > 1:
        return None
    e = found[0]
    return EngineChoice(e.backend, e.path, f"{e.backend}: the only engine that can run it here", None, skipped)


def decide(
    found: Sequence[EngineFile], figures: dict, skipped: Mapping[str, str] | None = None, margin: float = MARGIN
) -> EngineChoice:
    """The choice :func:`compare_engines`' figures make among ``found`` (in preference order), and why."""
    engines, skipped = figures["engines"], dict(skipped or {})
    for b, f in engines.items():
        if not f["agrees"]:
            skipped[b] = (
                f"its outputs differ from {figures['reference']}'s by up to {f['max_abs_diff']:.3g} "
                f"(atol {figures['atol']:g}, rtol {figures['rtol']:g})"
            )
            log.warning("engine %s left out: %s", b, skipped[b])
    ok = [e for e in found if e.backend in engines and engines[e.backend]["agrees"]]
    if not ok:
        raise BackendUnavailableError(f"no engine agrees with {figures['reference']}: {skipped}")
    fastest = min(ok, key=lambda e: engines[e.backend]["ratio"])
    best = engines[fastest.backend]["ratio"]
    chosen = next(e for e in ok if engines[e.backend]["ratio"] <= best * (1 + margin))
    load = figures["load_avg"]["before"]
    rel = {e.backend: engines[e.backend]["ratio"] / best for e in ok}  # paired p50, relative to the fastest
    shown = ", ".join(f"{e.backend} p50 {engines[e.backend]['p50_ms']:.3g} ms ({rel[e.backend]:.3f}x)" for e in ok)
    why = "the fastest"
    if chosen != fastest:
        why = f"within {margin:.0%} of the fastest ({fastest.backend}) and listed before it"
    reason = (
        f"{chosen.backend}: {why}; {shown} relative to the fastest, paired over {figures['rounds']} rounds of "
        f"{figures['runs_per_round']} runs" + (f", load average {load[0]:.2f}" if load else "")
    )
    return EngineChoice(chosen.backend, chosen.path, reason, figures, skipped, twins_of(found, chosen))


def twins_of(found: Sequence[EngineFile], chosen: EngineFile) -> tuple[str, ...]:
    """The fingerprints of the files in ``found`` exported from the same weights as ``chosen`` (the same
    :attr:`~edge.format.modelinfo.ModelInfo.source_fingerprint`, float files only), other than its own: adapters
    made for any of them fit ``chosen``, since adapters index the source layout every file maps."""
    if chosen.source is None:
        return ()
    same = {e.fingerprint for e in found if e.source == chosen.source and e.fingerprint}
    return tuple(sorted(same - {chosen.fingerprint}))


def engine_report(
    model, profile, feeds, threads: int | None = None, rounds: int = 5, runs: int = 10, choice=None, dims=None
) -> dict | None:
    """For ``edge profile``: the engines found for ``model``, compared when more than one can run it, and the
    choice ``backend="auto"`` makes here (``choice``, when that was already made). None when no other backend
    is listed or installed, or ``rounds`` or ``runs`` is 0 (no comparison asked for). ``dims``: the caller's, over
    the profile's, applied as auto applies them (:func:`edge.engine_cache.with_dims`: built and fed at those sizes;
    an engine that takes none skipped, with why)."""
    if choice is None:
        if not rounds or not runs:
            return None
        from edge.dims_apply import with_dims
        from edge.engine_budget import fit_budget

        found, skipped = find_engines(model, profile)
        found = with_dims(found, skipped, getattr(profile, "dims", None), dims)
        found = fit_budget(found, skipped, profile)  # before any is built to be compared
        if len(found) < 2:
            return {"comparison": None, "skipped": skipped, "choice": None} if skipped else None
        figures = compare_engines(found, feeds, profile=profile, threads=threads, rounds=rounds, runs=runs)
        choice = decide(found, figures, skipped)
    return {
        "comparison": choice.comparison,
        "skipped": dict(choice.skipped),
        "choice": {"backend": choice.backend, "path": str(choice.path), "reason": choice.reason},
    }


def runtime_version(backend: str) -> str:
    """The installed version of the library behind ``backend`` (``onnxruntime 1.32.0``)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "tflite": ("ai-edge-litert", "tflite-runtime")}.get(
        backend, (backend,)
    ):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return backend


def format_engines(report: dict) -> list[str]:
    """Markdown lines for :func:`engine_report`'s result: one row per engine, what was left out, the choice."""
    figures, lines = report["comparison"], []
    if figures is not None:
        load = figures["load_avg"]["before"]
        lines += [
            f"Engines on the same inputs, {figures['rounds']} interleaved rounds of {figures['runs_per_round']} runs "
            f"each at full speed; ratio = median over rounds of p50 / {figures['reference']}'s p50"
            + (f"; load average {load[0]:.2f}" if load else "")
            + ":",
            "",
            "| engine | file | providers | p50 (ms) | p99 (ms) | ratio | outputs |",
            "|---|---|---|---|---|---|---|",
        ]
        for b, f in figures["engines"].items():
            agree = "agree" if f["agrees"] else f"**differ** ({f['max_abs_diff']:.3g})"
            at = f" (at {f['strategy']})" if f.get("strategy", "rebuild") != "rebuild" else ""  # the budget's
            lines.append(
                f"| {b}{at} | {Path(f['path']).name} | {', '.join(f['providers'])} | {f['p50_ms']:.3g} "
                f"| {f['p99_ms']:.3g} | {f['ratio']:.3f} | {agree} |"
            )
        lines.append("")
    lines += [f"- {b} not compared: {why}" for b, why in report["skipped"].items()]
    if report["choice"] is not None:
        lines.append(f'- `backend="auto"` here: {report["choice"]["reason"]}')
    return lines


# -- helpers ---------------------------------------------------------------------------------------------------------
def _open(engine: EngineFile, profile, threads: int | None):
    """The engine's backend at the strategy it is measured at (full speed, rebuild, unless the memory budget admits
    only a lighter one), as the profile configures it, and its input specs."""
    from edge.engine_feeds import file_specs
    from edge.format.feeds import names_only
    from runtimes import BackendOptions, get_backend

    options = BackendOptions(threads=threads, strategy=engine.strategy)
    if profile is not None:
        options = replace(
            profile.backend_options(engine.backend), strategy=engine.strategy, threads=threads or profile.threads
        )
    options = replace(options, dims=dict(engine.dims) or None)  # every session measured with the sizes fixed
    specs, data = file_specs(engine.backend, engine.path)
    if engine.dims:
        from edge.dims import fix_specs

        specs = fix_specs(specs or {}, dict(engine.dims), engine.path.name)
    backend = get_backend(engine.backend)(data, options)
    return backend, specs or names_only(backend.info.inputs or tuple(backend.input_names))


def _timed(backend, feeds, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        backend.run(feeds)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _agreement(want: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], atol: float, rtol: float):
    worst, ok = 0.0, True
    for k, w in want.items():
        g = got.get(k)
        if g is None or np.shape(g) != np.shape(w):
            return float("inf"), False
        w64, g64 = np.asarray(w, np.float64), np.asarray(g, np.float64)
        both_nan = np.isnan(w64) & np.isnan(g64)
        diff = np.where(both_nan, 0.0, np.abs(g64 - w64))
        diff = np.where(np.isnan(diff), np.inf, diff)
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
        ok = ok and bool(np.all(diff <= atol + rtol * np.abs(np.nan_to_num(w64))))
    return worst, ok
