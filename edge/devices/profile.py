"""The device profile as frozen dataclasses, and the fallback policy that picks providers on this machine."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from edge.errors import BackendUnavailableError, ConfigError

__all__ = [
    "ARCHITECTURES",
    "FALLBACKS",
    "BackendPreference",
    "Budgets",
    "DeviceProfile",
    "FleetSource",
    "ProviderSpec",
    "Tolerances",
    "available_providers",
    "backend_status",
    "resolve_providers",
]

log = logging.getLogger("edge.devices")

ARCHITECTURES = ("aarch64", "x86_64", "armv7l", "riscv64")
FALLBACKS = ("error", "cpu")


# -- the profile ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProviderSpec:
    """One execution provider (onnxruntime) or delegate (LiteRT) with its options, as strings."""

    name: str
    options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class BackendPreference:
    """A backend the device runs, with its providers in order of preference."""

    backend: str
    providers: tuple[ProviderSpec, ...]
    strategy: str = "auto"  # checked by the backend when it opens a model
    precision: str = "any"  # "fp32" or "int8": the model precision the device runs (an NPU: int8 only)


@dataclass(frozen=True)
class Budgets:
    """What one model may cost on the device; ``edge profile`` reports each as within or over."""

    # what the runtime may hold: the model's predicted footprint under its strategy plus the adapters held (loads,
    # strategies and adapters past it are refused); the process's own memory (Python, libraries, the app) is not
    # counted. ``edge profile`` also sets the process's measured peak against it
    memory_mb: float
    load_ms: float  # model load until the first run is possible
    latency_p95_ms: float  # one inference, batch as profiled
    switch_p95_ms: float  # one adapter switch


@dataclass(frozen=True)
class Tolerances:
    """How far the device's outputs may be from the fp32 reference: ``|a - b| <= atol + rtol * |b|``."""

    atol: float
    rtol: float

    def check(self, actual, expected) -> tuple[float, bool]:
        """Max absolute difference and whether every element is within tolerance."""
        import numpy as np

        a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
        if a.shape != b.shape:
            return float("inf"), False
        diff = np.abs(a - b)
        return (float(diff.max()) if diff.size else 0.0), bool(np.all(diff <= self.atol + self.rtol * np.abs(b)))


@dataclass(frozen=True)
class FleetSource:
    """The registry channel a device syncs its adapters from (``edge sync``), and the TUF root it trusts."""

    registry: str  # HOST[:PORT]/REPOSITORY
    tuf_root: Path  # root.json, resolved against the profile's folder
    channel: str = "stable"
    insecure: bool = False  # plain HTTP (loopback and lab networks only)


@dataclass(frozen=True)
class DeviceProfile:
    """A target device: architecture, backends in order of preference, threads, budgets, tolerances."""

    name: str
    architecture: str
    backends: tuple[BackendPreference, ...]
    threads: int | None  # None: the backend's default (all cores)
    budgets: Budgets
    tolerances: Tolerances
    fallback: str  # "error" or "cpu"
    description: str = ""
    source: Path | None = None  # the file it was read from
    trusted_keys: tuple[str, ...] = ()  # when set, only adapters signed by these Ed25519 keys load
    fleet: FleetSource | None = None  # where `edge sync --device NAME` pulls adapters from
    #: named input dimensions fixed to sizes in every session (edge.dims), of the names a model declares, on a backend
    #: that takes dims (others skipped, logged; Runtime.dims shows what applies); Runtime(dims=...) wins per name
    dims: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def preference(self, backend: str) -> BackendPreference | None:
        """This profile's entry for ``backend``, or None if it does not list it."""
        return next((b for b in self.backends if b.backend == backend), None)

    def backend_options(self, backend: str, available: Sequence[str] | None = None, *, quiet: bool = False, model=None):
        """:class:`runtimes.base.BackendOptions` for ``backend`` on this machine, fallback policy applied.

        ``available`` lists the providers present here (default: probed). Provider options
        go in ``provider_options`` (one dict per provider, aligned with ``providers``);
        ``fallback_warning`` holds the warning if one was logged (``quiet``: returned, not logged).
        ``dims``: the profile's, for a backend that takes dims (else None); with ``model`` (its file) only the
        names it declares, as ``Runtime(model, device=...)`` applies them (:func:`edge.dims.applying`).
        """
        from runtimes import TABLE, get_backend
        from runtimes.base import BackendOptions

        dims = None
        if self.dims and backend in TABLE and getattr(get_backend(backend), "TAKES_DIMS", False):
            from edge.dims_apply import applying

            dims = dict(self.dims) if model is None else applying(backend, model, self.dims, None)

        specs, warning = resolve_providers(self, backend, available, quiet=quiet)
        pref = self.preference(backend)
        return BackendOptions(
            threads=self.threads,
            strategy=pref.strategy if pref else "auto",
            precision=pref.precision if pref else "any",
            providers=tuple(s.name for s in specs),
            provider_options=tuple(dict(s.options) for s in specs),
            device=self.name,
            fallback_warning=warning,
            dims=dims or None,
        )


# -- fallback policy ---------------------------------------------------------------------------
def resolve_providers(
    profile: DeviceProfile, backend: str, available: Sequence[str] | None = None, *, quiet: bool = False
) -> tuple[tuple[ProviderSpec, ...], str | None]:
    """The providers to use for ``backend`` here, and the warning to log (None if all are present).

    ``available`` defaults to what :func:`available_providers` finds on this machine. ``quiet``: return the
    warning without logging it (a caller that only asks whether the backend can run; the runtime logs it once).
    Raises :class:`BackendUnavailableError` when the backend is not installed, or when a
    provider is missing and the profile says ``fallback: error``.
    """
    if available is None:
        status = backend_status(backend)
        if status != "installed":
            raise BackendUnavailableError(
                f"device profile {profile.name!r} wants backend {backend!r}, which cannot run here: {status}"
            )
        available = available_providers(backend)
    available = list(available)
    from runtimes import get_backend

    cpu = get_backend(backend).CPU_PROVIDER
    pref = profile.preference(backend)
    if pref is None:
        listed = ", ".join(b.backend for b in profile.backends)
        if profile.fallback == "cpu" and cpu in available:
            warning = f"device profile {profile.name!r} lists no {backend} entry (it lists {listed}); running on {cpu}"
            if not quiet:
                log.warning("%s", warning)
            return (ProviderSpec(cpu),), warning
        raise ConfigError(
            f"device profile {profile.name!r} lists backends [{listed}], not {backend!r}; "
            f"pick a profile that lists {backend}, add a {backend} entry to {profile.source or 'the profile'}, "
            "or set 'fallback: cpu'"
        )
    missing = [s.name for s in pref.providers if s.name not in available]
    if not missing:
        return pref.providers, None
    if profile.fallback == "error":
        raise BackendUnavailableError(
            f"device profile {profile.name!r}: {backend} provider(s) {missing} are not available here; "
            f"available: {available}. Install the {backend} build that has them, use a profile for this "
            f"machine (see `edge devices`), or set 'fallback: cpu' in {profile.source or 'the profile'}"
        )
    kept = tuple(s for s in pref.providers if s.name in available and s.name != cpu)
    cpu_spec = next((s for s in pref.providers if s.name == cpu), ProviderSpec(cpu))
    if cpu not in available:
        raise BackendUnavailableError(
            f"device profile {profile.name!r}: {missing} missing and no {cpu} to fall back to; available: {available}"
        )
    chosen = (*kept, cpu_spec)
    warning = (
        f"device profile {profile.name!r}: {backend} provider(s) {missing} not available here "
        f"(fallback: cpu); running on {[s.name for s in chosen]}"
    )
    if not quiet:
        log.warning("%s", warning)
    return chosen, warning


# -- what this machine has ---------------------------------------------------------------------
def available_providers(backend: str) -> list[str] | None:
    """Providers or delegates of ``backend`` usable here; None if the backend cannot run here at all."""
    from runtimes import get_backend

    return get_backend(backend).available_providers()


def backend_status(backend: str) -> str:
    """``installed``, or why ``backend`` cannot run on this machine (what is missing, how to get it)."""
    from runtimes import TABLE, get_backend

    if backend not in TABLE:
        return f"no {backend} backend in this build of edge (known: {', '.join(sorted(TABLE))})"
    cls = get_backend(backend)
    if cls.available_providers() is None:
        return f"not installed: {cls.INSTALL_HINT}"
    return "installed"
