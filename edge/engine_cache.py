"""``backend="auto"`` measured once: the engine choice kept per model files, machine and libraries.

:func:`edge.engines.choose_engine` times every engine that can run a model (a few seconds on a
22 M-parameter encoder). :func:`cached_engine` makes that choice once and keeps it in a small JSON
file (``$EDGE_ENGINE_CACHE``, else ``$EDGE_CACHE/engines``, else ``~/.cache/edge/engines``), written
atomically. The file's key is everything the choice depends on: each candidate file (backend,
resolved path, size, modification time, inode: a rewritten file is another), the machine
(architecture, CPU model, cores), each backend's library version, the thread count, the device
profile (name and backend order), the margin, with a memory budget the budget and the strategy asked
(which engines fit it, and at what each is measured: :mod:`edge.engine_budget`), and the named dimensions fixed
(``dims``, :mod:`edge.dims`: measured at those sizes; a .tflite, which takes none, skipped). Any change measures
again. A
file that cannot be read, fails its checks or names an engine not among the candidates is measured again, with a
warning; a choice that cannot be stored is still used, with a warning and the reason in
:attr:`EngineChoice.reason`. The choice steers which file runs, so a cache folder others can write (another
owner, group- or world-writable, or such a parent: :mod:`edge.cache_trust`), or one that cannot be made or
checked, is neither read nor written: warned once per process, every load measures; a choice file that is a link,
another user's (root's is read) or writable by others is measured again. The folder is resolved once (links,
``..``) and only the resolved path is used; it is made 0700 when missing; it is this user's own, not shared.

With ``strategy`` other than ``auto``, only the engines whose backend offers it are candidates (the
others are listed in ``skipped``). One candidate is chosen without measuring. Each file has its own
fingerprint (``M.onnx`` and ``M.tflite`` store the weights differently) and an adapter names the one
it was made for; files exported from the same torch weights are twins (the same
``source_fingerprint``), and adapters made for any twin fit the chosen file (:attr:`EngineChoice.twins`).
When they do not, the reason says so.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from edge.cache_trust import entry_problem, trusted_cache, warn_once
from edge.engine_choice import MARGIN, EngineChoice
from edge.errors import ConfigError, EdgeError

__all__ = ["FORMAT", "VERSION", "cache_folder", "cached_engine", "choice_key", "explicit_engine"]

log = logging.getLogger("edge.engines")

#: the measuring side (:mod:`edge.engines`), imported on the first choice that needs it, not by a plain load
#: (:func:`explicit_engine`); read here through :func:`_m` on every call, so a test may replace one as this module's
#: own name (``monkeypatch.setattr(engine_cache, "decide", ...)``) or as edge.engines' (nothing copied to go stale)
_MEASURING = (
    "compare_engines",
    "decide",
    "find_engines",
    "generated_feeds",
    "runtime_version",
    "twins_of",
    "unmeasured",
)


def _m(name: str):
    """The measuring function ``name``: one set on this module (a test's replacement), else edge.engines' as of now
    (an edge.engines function found here is one a test's undo put back: edge.engines' current one wins)."""
    own = globals().get(name)
    if own is not None and getattr(own, "__module__", None) not in ("edge.engines", "edge.engine_feeds"):
        return own
    from edge import engines

    return getattr(engines, name)


def __getattr__(name: str):
    if name in _MEASURING:
        from edge import engines

        return getattr(engines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


FORMAT, VERSION = "edge.engine-choice", 3  # 2: twins; 3: threads=None runs a tiny model on 1 thread (measured anew)
_MAX_BYTES = 1 << 20  # a choice file is a few KB


def explicit_engine(backend: str, model: str | os.PathLike, given: bool = True) -> EngineChoice:
    """The choice when the caller names the backend (``given``) or the file's suffix does: nothing measured.

    A named backend that does not read files of ``model``'s suffix (another backend's) is a :class:`ConfigError`
    naming both and the file to pass, not the backend's parse error on bytes it cannot read."""
    from runtimes import TABLE

    path, owner = Path(model), {s: name for name, (_, suffixes) in reversed(TABLE.items()) for s in suffixes}
    own = TABLE[backend][1] if backend in TABLE else None  # the suffixes the named backend reads
    runs = owner.get(path.suffix.lower())
    if given and own and runs and path.suffix.lower() not in own:  # another backend's file (two may share one)
        twin = path.with_suffix(own[0])
        fix = f"pass {twin.name} (beside it)" if twin.is_file() else f"export a {twin.suffix} file for it"
        raise ConfigError(
            f"{path.name} is a {path.suffix} file, which backend {runs!r} runs, not {backend!r}: {fix}, "
            f"or give backend={runs!r} (--backend {runs}) or 'auto'"
        )
    how = f"backend={backend!r} given" if given else f"the engine of {Path(model).suffix} files (no device profile)"
    return EngineChoice(backend, Path(model), f"{backend}: {how}, not measured")


def cache_folder() -> Path:
    """Where choices are kept: ``$EDGE_ENGINE_CACHE``, else ``$EDGE_CACHE/engines``, else ``~/.cache/edge/engines``."""
    if os.environ.get("EDGE_ENGINE_CACHE"):
        return Path(os.environ["EDGE_ENGINE_CACHE"])
    return Path(os.environ.get("EDGE_CACHE") or Path.home() / ".cache" / "edge") / "engines"


def choice_key(found, profile=None, threads: int | None = None, margin: float = MARGIN) -> dict:
    """What the choice among ``found`` (:class:`EngineFile` list) depends on, as a JSON-able dict."""
    from edge.machine import machine

    m = machine()
    files = []
    for e in found:  # the file's identity, not its bytes: reading a 90 MB .tflite again would cost more than the key
        st = e.path.stat()
        files.append([e.backend, str(e.path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev])
    return {
        "files": files,
        "machine": [m["arch"], m["cpu"], m["cores"]],
        "libraries": sorted({_m("runtime_version")(e.backend) for e in found}),
        "threads": threads,
        "profile": None if profile is None else [profile.name, [b.backend for b in profile.backends]],
        "margin": margin,
    }


def cached_engine(
    model: str | os.PathLike,
    *,
    device=None,
    threads: int | None = None,
    strategy: str = "auto",
    margin: float = MARGIN,
    rounds: int = 5,
    runs: int = 10,
    folder: str | os.PathLike | None = None,
    enforce_memory_budget: bool = True,
    dims: Mapping[str, int] | None = None,
) -> EngineChoice:
    """The engine ``backend="auto"`` runs ``model`` on: measured the first time, read from the cache after.

    ``device`` is a profile (name, path or DeviceProfile) or None. Raises :class:`BackendUnavailableError`
    when no engine here can run it (with ``strategy``). Under the profile's ``budgets.memory_mb`` (unless
    ``enforce_memory_budget`` is False) an engine whose predicted footprint does not fit is left out before it is
    built (:func:`edge.engine_budget.fit_budget`; a :class:`ConfigError` when none fits). ``dims`` (the caller's,
    :mod:`edge.dims`; over the profile's ``dims`` that apply: :func:`~edge.dims_apply.with_dims`) are part of the
    key: every candidate is predicted, built and timed with those sizes fixed, on inputs of those sizes; an engine
    that takes no dims (a .tflite) is then skipped, with why."""
    from edge.devices import DeviceProfile, load_profile
    from edge.engine_budget import fit_budget
    from runtimes import get_backend

    profile = device if device is None or isinstance(device, DeviceProfile) else load_profile(device)
    found, skipped = _m("find_engines")(model, profile)
    from edge.dims_apply import with_dims  # here: a plain load (explicit_engine) needs none of it

    found = with_dims(found, skipped, getattr(profile, "dims", None), dims)  # edge.dims_apply
    if strategy != "auto":
        for e in list(found):
            offered = get_backend(e.backend).STRATEGIES
            if strategy not in offered:
                found.remove(e)
                skipped[e.backend] = f"strategy {strategy!r} asked; {e.backend} offers {', '.join(offered)}"
    only = _m("unmeasured")(model, found, skipped)
    if only is not None:  # one engine: the backend's own check weighs it against the budget
        return only
    key = choice_key(found, profile, threads, margin)
    if profile is not None and enforce_memory_budget:  # which engines fit, and at what they are measured
        key["budget"] = [profile.budgets.memory_mb, strategy]
    fixed = {k: v for e in found for k, v in e.dims}  # what applies (the profile's: the names the files declare)
    if fixed:  # other sizes, another choice (without: the key of a load without dims, its kept choice still read)
        key["dims"] = dict(sorted(fixed.items()))  # as it reads back from the JSON
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    measure = {"threads": threads, "rounds": rounds, "runs": runs}
    given = Path(folder) if folder is not None else cache_folder()
    try:  # a folder others can write is neither read nor written (warned once per process): its choice steers
        root = trusted_cache(given, what="engine cache", env="EDGE_ENGINE_CACHE", log=log)  # resolved: used alone
    except OSError as e:  # cannot be made or checked (read-only, a loop, too long): not used either
        root = None
        warn_once(str(given), log, "the engine cache %s is not used (%s); every load measures", given, e)
    trusted = root is not None
    path = (root or given) / f"{Path(model).stem[:64]}-{digest}.json"
    kept = _read(path, key, found, skipped) if trusted else None
    if kept is not None:
        return kept
    fits = fit_budget(found, skipped, profile, strategy, enforce_memory_budget)  # before any is built to be measured
    choice = _m("unmeasured")(model, fits, skipped)  # one fits: kept too, so the next load predicts nothing again
    figures = None if choice else _m("compare_engines")(fits, _m("generated_feeds")(fits), profile=profile, **measure)
    choice = choice or _m("decide")(fits, figures, skipped, margin)
    chosen = next(e for e in found if e.backend == choice.backend)  # twins among all files: their adapters fit
    choice = replace(choice, twins=_m("twins_of")(found, chosen))
    choice = replace(choice, reason=choice.reason + _adapters_note(choice, Path(model), found))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    record = {
        "format": FORMAT,
        "version": VERSION,
        "key": key,
        "backend": choice.backend,
        "path": str(choice.path.resolve()),
        "reason": choice.reason,
        "measured": stamp,
        "comparison": figures,
        "skipped": dict(choice.skipped),
    }
    from edge.format.io import atomic_write_bytes

    done = "measured" if figures else "chosen"
    if not trusted:  # said once, by trusted_cache
        note = f"{done} {stamp}, not kept (the engine cache {given} is not used: see the warning)"
    else:
        try:  # 0644 whatever mode the file it replaces had (one others could write is not read back)
            atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode(), mode=0o644, parents=False)
            note = f"{done} {stamp}, kept in {path}"
        except OSError as e:
            log.warning("engine choice for %s not kept (%s); the next load measures again", Path(model).name, e)
            note = f"{done} {stamp}, not kept ({e})"
    return replace(choice, reason=f"{choice.reason} [{note}]")


def _adapters_note(choice: EngineChoice, asked: Path, found) -> str:
    """Whether adapters made for the asked file fit the chosen one (they name the fingerprint of their file)."""
    if choice.path.resolve() == asked.resolve():
        return ""
    ours = next((e.fingerprint for e in found if e.path.resolve() == asked.resolve()), None)
    theirs = next((e.fingerprint for e in found if e.path == choice.path), None)
    if ours is None or theirs is None or ours == theirs:
        return ""
    if ours in choice.twins:
        return f"; adapters for {asked.name} fit {choice.path.name} too (both exported from the same weights)"
    return f"; adapters for {asked.name} ({ours}) do not apply to {choice.path.name} ({theirs})"


def _read(path: Path, key: dict, found, skipped) -> EngineChoice | None:
    """The choice kept in ``path`` if it is for ``key`` and names a candidate; None (logged why) otherwise."""
    from edge.format.io import load_json, read_bounded

    if not os.path.lexists(path):
        return None
    try:
        why = entry_problem(path)  # a link is not followed, nor a file another user wrote or could rewrite
        if why:
            raise ValueError(why)
        rec = load_json(read_bounded(path, _MAX_BYTES, what="engine choice"), source=str(path))
        ok = isinstance(rec, dict) and rec.get("format") == FORMAT and rec.get("version") == VERSION
        if not ok or rec.get("key") != key:
            raise ValueError("another format, version or key")
        chosen = next((e for e in found if e.backend == rec["backend"] and str(e.path.resolve()) == rec["path"]), None)
        if chosen is None or not isinstance(rec.get("reason"), str):
            raise ValueError(f"it names {rec.get('backend')!r}, not a candidate now")
        reason = f"{rec['reason']} [measured {rec.get('measured')}, read from {path}]"
        comparison = rec.get("comparison") if isinstance(rec.get("comparison"), dict) else None
        kept = rec.get("skipped") if isinstance(rec.get("skipped"), dict) else {}  # e.g. left out for the budget
        skipped = {**{k: v for k, v in kept.items() if isinstance(k, str) and isinstance(v, str)}, **skipped}
        return EngineChoice(chosen.backend, chosen.path, reason, comparison, skipped, _m("twins_of")(found, chosen))
    except (OSError, ValueError, KeyError, TypeError, EdgeError) as e:
        log.warning("engine choice in %s not used (%s); measuring again", path, e)
        return None
