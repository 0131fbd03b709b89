"""Validation of a parsed device profile (YAML is only storage) into :class:`edge.devices.DeviceProfile`.

Every check names what was given and what is allowed: unknown keys, missing fields,
unknown architecture, fallback, backend, provider (per backend) and, where the runtime
documents them, provider options (each backend's ``PROVIDERS``, :mod:`runtimes`).
``dims`` (optional) maps a model's named input dimensions to the sizes every session fixes them at
(``dims: {batch: 1, sequence: 128}``, :mod:`edge.dims`): whole numbers from 1 to 2**31-1, checked here. They apply
to every model loaded on the device, each by the names it declares: a name a model lacks, or a backend that takes no
dims (a .tflite), is skipped for that model (logged once at INFO; ``Runtime.dims`` shows what applies), whereas an
explicit ``dims=`` (``--dim``) naming a dimension the model lacks is refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from edge.devices.profile import (
    ARCHITECTURES,
    FALLBACKS,
    BackendPreference,
    Budgets,
    DeviceProfile,
    FleetSource,
    ProviderSpec,
    Tolerances,
)
from edge.dims import check_dims
from edge.errors import ConfigError
from edge.format.names import check_name, split_reference
from edge.machine import check_threads
from runtimes import backend_names, get_backend

__all__ = ["from_dict"]

_TOP = {
    "name": True,
    "description": False,
    "architecture": True,
    "backends": True,
    "threads": True,
    "budgets": True,
    "tolerances": True,
    "fallback": True,
    "trusted_keys": False,
    "registry": False,
    "channel": False,
    "tuf_root": False,
    "registry_insecure": False,
    "dims": False,
}


def from_dict(data: object, source: Path | None = None) -> DeviceProfile:
    """Validate a parsed profile (a dict as YAML gives it) into a :class:`DeviceProfile`."""
    d = _fields(data, _TOP, "profile")
    arch = _choice(d["architecture"], ARCHITECTURES, "architecture")
    fallback = _choice(d["fallback"], FALLBACKS, "fallback")
    threads = d["threads"]
    check_threads(threads)
    backends = d["backends"]
    if not isinstance(backends, list) or not backends:
        raise ConfigError(f"backends must be a non-empty list of backend entries, got {backends!r}")
    prefs = tuple(_backend(b, i) for i, b in enumerate(backends))
    dup = sorted({p.backend for p in prefs if sum(q.backend == p.backend for q in prefs) > 1})
    if dup:
        raise ConfigError(f"backend(s) {dup} listed more than once; list each backend once")
    budgets = Budgets(
        **{k: _positive(v, f"budgets.{k}") for k, v in _fields(d["budgets"], _BUDGETS, "budgets").items()}
    )
    tols = Tolerances(
        **{
            k: _positive(v, f"tolerances.{k}", zero=True)
            for k, v in _fields(d["tolerances"], _TOLS, "tolerances").items()
        }
    )
    keys = d.get("trusted_keys") or []
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise ConfigError(
            f"trusted_keys must be a list of Ed25519 public keys (64 hex digits or .pub paths), got {keys!r}"
        )
    if source is not None:  # relative .pub paths are relative to the profile's folder
        keys = [str(source.parent / k) if (source.parent / k).is_file() else k for k in keys]
    if keys:
        from edge.format.signing import load_public_key

        for k in keys:  # fail at profile load, not at the first adapter
            load_public_key(k)
    name = d["name"]
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name must be a non-empty string, got {name!r}")
    return DeviceProfile(
        fleet=_fleet(d, source),
        name=name,
        architecture=arch,
        backends=prefs,
        threads=threads,
        budgets=budgets,
        tolerances=tols,
        fallback=fallback,
        description=_text(d.get("description"), "description"),
        source=source,
        trusted_keys=tuple(keys),
        dims=MappingProxyType(check_dims(d.get("dims"), "dims (named input dimension -> size)")),
    )


def _fleet(d: dict, source: Path | None) -> FleetSource | None:
    """``registry``, ``channel``, ``tuf_root``, ``registry_insecure``: where ``edge sync`` pulls from."""
    keys = ("registry", "channel", "tuf_root", "registry_insecure")
    if all(d.get(k) is None for k in keys):
        return None
    registry, tuf_root = d.get("registry"), d.get("tuf_root")
    if not isinstance(registry, str) or not registry or not isinstance(tuf_root, str) or not tuf_root:
        raise ConfigError(
            "registry (HOST[:PORT]/REPOSITORY) and tuf_root (the root.json the device trusts) go together; "
            f"got registry={registry!r}, tuf_root={tuf_root!r}"
        )
    split_reference(registry)  # checked here, not at the first sync
    channel = d.get("channel") if d.get("channel") is not None else "stable"
    check_name("channel", _text(channel, "channel"))  # 2024 unquoted is a number to YAML
    insecure = d.get("registry_insecure") if d.get("registry_insecure") is not None else False
    if not isinstance(insecure, bool):
        raise ConfigError(f"registry_insecure must be true or false, got {insecure!r}")
    root = Path(tuf_root)
    if source is not None and not root.is_absolute():  # relative to the profile's folder, like trusted_keys
        root = source.parent / root
    return FleetSource(registry=registry, tuf_root=root, channel=channel, insecure=insecure)


_EXP_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")  # PyYAML (YAML 1.1) reads 1e3 and 1.0e3 as text
_WITH_UNIT = re.compile(r"^\s*[-+]?[\d.]+\s*[A-Za-z]+\s*$")
_BUDGETS = {k: True for k in ("memory_mb", "load_ms", "latency_p95_ms", "switch_p95_ms")}
_TOLS = {"atol": True, "rtol": True}
_BACKEND = {"backend": True, "providers": True, "strategy": False, "precision": False}
PRECISIONS = ("any", "fp32", "int8")
_PROVIDER = {"name": True, "options": False}


def _backend(data: object, i: int) -> BackendPreference:
    d = _fields(data, _BACKEND, f"backends[{i}]")
    backend = _choice(d["backend"], tuple(backend_names()), f"backends[{i}].backend")
    known = get_backend(backend).PROVIDERS
    raw = d["providers"]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"backends[{i}].providers must be a non-empty list, got {raw!r}")
    specs = []
    for j, p in enumerate(raw):
        where = f"backends[{i}].providers[{j}]"
        p = {"name": p} if isinstance(p, str) else p
        pd = _fields(p, _PROVIDER, where)
        name = _choice(pd["name"], tuple(known), f"{where}.name ({backend} provider)")
        options = pd.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{where}.options must be a mapping of option name to value, got {options!r}")
        allowed = known[name]
        unknown = sorted(set(options) - allowed) if allowed is not None else []
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for {name}; allowed: {', '.join(sorted(allowed)) or 'none'} "
                f"(the {backend} documentation's names)"
            )
        specs.append(
            ProviderSpec(
                name, MappingProxyType({str(k): _option_value(v, f"{where}.options.{k}") for k, v in options.items()})
            )
        )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"backends[{i}].providers lists a provider twice: {names}")
    strategy = d.get("strategy", "auto")
    if not isinstance(strategy, str) or not strategy:
        raise ConfigError(f"backends[{i}].strategy must be a strategy name such as 'auto', got {strategy!r}")
    _choice(strategy, ("auto", *get_backend(backend).STRATEGIES), f"backends[{i}].strategy ({backend} strategy)")
    precision = _choice(d.get("precision", "any"), PRECISIONS, f"backends[{i}].precision")
    return BackendPreference(backend, tuple(specs), strategy, precision)


def _fields(data: object, spec: Mapping[str, bool], where: str) -> dict:
    """Check a mapping's keys against ``spec`` (key -> required); returns it as a dict."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(spec)}, got {type(data).__name__}")
    unknown = [k for k in data if k not in spec]
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; known keys: {', '.join(spec)}")
    missing = [k for k, required in spec.items() if required and k not in data]
    if missing:
        raise ConfigError(
            f"missing field(s) {missing} in {where}; required: {', '.join(k for k, r in spec.items() if r)}"
        )
    return dict(data)


def _choice(value: object, allowed: Sequence[str], what: str) -> str:
    if isinstance(value, bool) or value not in allowed:
        hint = " (YAML reads an unquoted no/off/yes/on as a boolean)" if isinstance(value, bool) else ""
        raise ConfigError(f"unknown {what} {value!r}{hint}; allowed: {', '.join(allowed)}")
    return str(value)


def _text(value: object, what: str) -> str:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{what} must be text (quote it), got {type(value).__name__} {str(value)[:80]!r}")
    return value or ""


def _positive(value: object, what: str, zero: bool = False) -> float:
    try:  # an integer of 400 digits is finite, but not as a float
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:
        finite = False
    if not finite or not (value >= 0 if zero else value > 0):
        hint = ""
        if isinstance(value, str) and _EXP_TEXT.match(value.strip()):  # only 1.0e+3 (dot, signed exponent) is a float
            hint = f" (YAML reads {value} as text: write it with a dot and a signed exponent, e.g. 1.0e+3)"
        elif isinstance(value, str) and _WITH_UNIT.match(value):  # 512MB, 0.5 GiB, 3 s
            hint = f" (write the number alone, in the unit the key's name gives: {what.rsplit('_', 1)[-1]})"
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:20]}... ({len(repr(value))} characters)"
        raise ConfigError(f"{what} must be a {'non-negative' if zero else 'positive'} number, got {shown}{hint}")
    return float(value)


def _option_value(value: object, what: str) -> str:
    """Provider options are strings in both runtimes; YAML booleans become "1"/"0"."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ConfigError(f"{what} must be a string, number or boolean, got {value!r}")
