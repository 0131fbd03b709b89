"""Device profiles: what a target board runs, with which options, within which budgets.

A profile is one YAML file (``devices/NAME.yaml``) loaded into frozen dataclasses::

    profile = load_profile("jetson-orin-nano")          # by name, from the search path
    options = profile.backend_options("onnxruntime")    # runtimes.base.BackendOptions for this machine
    providers, warning = resolve_providers(profile, "onnxruntime", ["CPUExecutionProvider"])

Search path, first match wins: the ``--devices-dir`` folders (``search=``), then those in
``$EDGE_DEVICES`` (``os.pathsep``-separated), then the profiles shipped with the package. A user adds a
profile by dropping ``NAME.yaml`` into such a folder; its ``name`` must equal ``NAME``.

Validation names what is wrong and what is allowed: unknown keys, missing fields,
unknown backends, unknown providers (per backend) and, where the runtime documents
them, unknown provider options. Option names are the runtimes' own (onnxruntime's
provider options, LiteRT's delegate options); values are passed on as strings.

Fallback policy when a profile's provider is missing on this machine:
``error`` raises :class:`~edge.errors.BackendUnavailableError`; ``cpu`` drops the missing
providers (keeping the available ones, in order, with the backend's CPU provider last),
logs a warning, and the caller records the providers that actually ran.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from edge.errors import BackendUnavailableError, ConfigError, FormatError
from edge.registry import Registry

__all__ = [
    "ARCHITECTURES",
    "CPU_PROVIDER",
    "FALLBACKS",
    "KNOWN_PROVIDERS",
    "PROBES",
    "BackendPreference",
    "Budgets",
    "DeviceProfile",
    "ProviderSpec",
    "Tolerances",
    "available_providers",
    "backend_status",
    "list_profiles",
    "load_profile",
    "packaged_dir",
    "resolve_providers",
    "search_path",
    "this_machine",
]

log = logging.getLogger("edge.devices")

ENV_VAR = "EDGE_DEVICES"
ARCHITECTURES = ("aarch64", "x86_64", "armv7l", "riscv64")
FALLBACKS = ("error", "cpu")

_CUDA_OPTIONS = (
    "device_id gpu_mem_limit arena_extend_strategy cudnn_conv_algo_search do_copy_in_default_stream "
    "cudnn_conv_use_max_workspace cudnn_conv1d_pad_to_nc1d enable_cuda_graph enable_skip_layer_norm_strict_mode "
    "use_tf32 prefer_nhwc use_ep_level_unified_stream tunable_op_enable tunable_op_tuning_enable "
    "tunable_op_max_tuning_duration_ms sdpa_kernel fuse_conv_bias"
)
_TRT_OPTIONS = (
    "device_id trt_max_workspace_size trt_max_partition_iterations trt_min_subgraph_size trt_fp16_enable "
    "trt_bf16_enable trt_int8_enable trt_int8_calibration_table_name trt_int8_use_native_calibration_table "
    "trt_dla_enable trt_dla_core trt_dump_subgraphs trt_engine_cache_enable trt_engine_cache_path "
    "trt_engine_cache_prefix trt_engine_decryption_enable trt_engine_decryption_lib_path "
    "trt_force_sequential_engine_build trt_context_memory_sharing_enable trt_layer_norm_fp32_fallback "
    "trt_timing_cache_enable trt_timing_cache_path trt_force_timing_cache trt_detailed_build_log "
    "trt_build_heuristics_enable trt_sparsity_enable trt_builder_optimization_level trt_auxiliary_streams "
    "trt_tactic_sources trt_extra_plugin_lib_paths trt_profile_min_shapes trt_profile_max_shapes "
    "trt_profile_opt_shapes trt_cuda_graph_enable trt_dump_ep_context_model trt_ep_context_file_path "
    "trt_ep_context_embed_mode trt_weight_stripped_engine_enable trt_onnx_model_folder_path "
    "trt_engine_hw_compatible trt_op_types_to_exclude"
)
_QNN_OPTIONS = (
    "backend_type backend_path profiling_level profiling_file_path rpc_control_latency vtcm_mb "
    "htp_performance_mode qnn_saver_path qnn_context_priority htp_graph_finalization_optimization_mode "
    "soc_model htp_arch device_id enable_htp_fp16_precision enable_htp_weight_sharing "
    "offload_graph_io_quantization op_packages enable_htp_spill_fill_buffer"
)

#: backend -> provider/delegate name -> documented option names (None: passed through unchecked).
KNOWN_PROVIDERS: Mapping[str, Mapping[str, frozenset[str] | None]] = MappingProxyType(
    {
        "onnxruntime": MappingProxyType(
            {
                "CPUExecutionProvider": frozenset({"use_arena"}),
                "CUDAExecutionProvider": frozenset(_CUDA_OPTIONS.split()),
                "TensorrtExecutionProvider": frozenset(_TRT_OPTIONS.split()),
                "QNNExecutionProvider": frozenset(_QNN_OPTIONS.split()),
                "XnnpackExecutionProvider": frozenset({"intra_op_num_threads"}),
                "ACLExecutionProvider": None,
                "NnapiExecutionProvider": None,
                "CoreMLExecutionProvider": None,
                "OpenVINOExecutionProvider": None,
                "ROCMExecutionProvider": None,
                "MIGraphXExecutionProvider": None,
                "DmlExecutionProvider": None,
                "VitisAIExecutionProvider": None,
                "WebGpuExecutionProvider": None,
                "AzureExecutionProvider": None,
            }
        ),
        # LiteRT (ai-edge-litert), backend "tflite": XNNPACK, built-in kernels ("CPU"), and external delegates
        # loaded with load_delegate(library, options); "library" is load_delegate's own argument.
        "tflite": MappingProxyType(
            {
                "XNNPACK": frozenset(),
                "CPU": frozenset(),
                "EDGETPU": frozenset({"library", "device"}),
                "GPU": None,
                "NNAPI": frozenset(
                    {
                        "library",
                        "execution_preference",
                        "accelerator_name",
                        "cache_dir",
                        "model_token",
                        "disallow_nnapi_cpu",
                        "allow_fp16",
                        "max_number_delegated_partitions",
                    }
                ),
                "HEXAGON": None,
            }
        ),
    }
)

#: The provider each backend falls back to under ``fallback: cpu``.
CPU_PROVIDER: Mapping[str, str] = MappingProxyType({"onnxruntime": "CPUExecutionProvider", "tflite": "CPU"})


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


@dataclass(frozen=True)
class Budgets:
    """What one model may cost on the device; ``edge profile`` reports each as within or over."""

    memory_mb: float  # peak resident memory of the process
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

    def preference(self, backend: str) -> BackendPreference | None:
        """This profile's entry for ``backend``, or None if it does not list it."""
        return next((b for b in self.backends if b.backend == backend), None)

    def backend_options(self, backend: str, available: Sequence[str] | None = None):
        """:class:`runtimes.base.BackendOptions` for ``backend`` on this machine, fallback policy applied.

        ``available`` lists the providers present here (default: probed). Provider options
        go in ``extra["provider_options"]`` (one dict per provider, aligned with
        ``providers``); ``extra["fallback_warning"]`` holds the warning if one was logged.
        """
        from runtimes.base import BackendOptions

        specs, warning = resolve_providers(self, backend, available)
        pref = self.preference(backend)
        extra = {
            "provider_options": tuple(dict(s.options) for s in specs),
            "device": self.name,
            "fallback_warning": warning,
        }
        return BackendOptions(
            threads=self.threads,
            strategy=pref.strategy if pref else "auto",
            providers=tuple(s.name for s in specs),
            extra=extra,
        )


# -- fallback policy ---------------------------------------------------------------------------
def resolve_providers(
    profile: DeviceProfile, backend: str, available: Sequence[str] | None = None
) -> tuple[tuple[ProviderSpec, ...], str | None]:
    """The providers to use for ``backend`` here, and the warning to log (None if all are present).

    ``available`` defaults to what :func:`available_providers` finds on this machine.
    Raises :class:`BackendUnavailableError` when the backend is not installed, or when a
    provider is missing and the profile says ``fallback: error``.
    """
    if available is None:
        status = backend_status(backend)
        if status != "installed":
            raise BackendUnavailableError(
                f"device profile {profile.name!r} wants backend {backend!r}, which cannot run here: {status}"
            )
        available = PROBES.get(backend)()
    available = list(available)
    cpu = CPU_PROVIDER.get(backend)
    pref = profile.preference(backend)
    if pref is None:
        listed = ", ".join(b.backend for b in profile.backends)
        if profile.fallback == "cpu" and cpu in available:
            warning = f"device profile {profile.name!r} lists no {backend} entry (it lists {listed}); running on {cpu}"
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
    log.warning("%s", warning)
    return chosen, warning


# -- what this machine has ---------------------------------------------------------------------
#: backend -> probe returning the providers available here, or None if the backend is not installed.
PROBES: Registry[Callable[[], list[str] | None]] = Registry("backend probe")


@PROBES.register("onnxruntime")
def _probe_onnxruntime() -> list[str] | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return list(ort.get_available_providers())


@PROBES.register("tflite")
def _probe_tflite() -> list[str] | None:
    """What the tflite backend accepts here; an external delegate counts only if its library is found."""
    from ctypes.util import find_library

    if not any(_has_module(m) for m in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")):
        return None
    from runtimes.litert import DELEGATES

    libs = {"EDGETPU": "edgetpu", "GPU": "tensorflowlite_gpu_delegate", "HEXAGON": "hexagon_interface"}
    found = [d for d in DELEGATES if d not in libs or find_library(libs[d])]
    if "NNAPI" in found and not Path("/system/lib64/libneuralnetworks.so").exists():  # Android only
        found.remove("NNAPI")
    return found


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_providers(backend: str) -> list[str] | None:
    """Providers or delegates of ``backend`` usable here; None if the backend cannot run here at all."""
    return None if backend_status(backend) != "installed" else PROBES.get(backend)()


def backend_status(backend: str) -> str:
    """``installed``, or why ``backend`` cannot run on this machine (what is missing, how to get it)."""
    from runtimes import backend_names

    if backend not in backend_names():
        return f"no {backend} backend in this build of edge (runtimes/{backend}.py)"
    if backend not in PROBES or PROBES.get(backend)() is None:
        return f"not installed: {_install_hint(backend)}"
    return "installed"


def _install_hint(backend: str) -> str:
    hints = {
        "onnxruntime": "pip install onnxruntime (or the vendor's onnxruntime build with its execution providers)",
        "tflite": "pip install ai-edge-litert",
    }
    return hints.get(backend, f"install the {backend} backend")


# -- finding and loading -----------------------------------------------------------------------
def packaged_dir() -> Path | None:
    """The profiles shipped with the package: ``edge/devices_data`` when installed, ``devices/`` in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "devices_data", here.parent / "devices"):
        if cand.is_dir() and any(cand.glob("*.yaml")):
            return cand
    return None


def search_path(extra: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Folders searched for profiles, first match wins: ``extra``, then ``$EDGE_DEVICES``, then the packaged ones."""
    dirs = [Path(d) for d in extra]
    dirs += [Path(d) for d in os.environ.get(ENV_VAR, "").split(os.pathsep) if d]
    packaged = packaged_dir()
    if packaged is not None:
        dirs.append(packaged)
    return dirs


def list_profiles(search: Sequence[str | os.PathLike] | None = None) -> list[DeviceProfile]:
    """Every profile on the search path (sorted by name; a name found twice: the first folder wins)."""
    seen: dict[str, Path] = {}
    for d in search_path(search or ()):
        if not d.is_dir():
            raise ConfigError(f"device profile folder {d} does not exist (from --devices-dir or ${ENV_VAR})")
        for f in sorted(d.glob("*.yaml")):
            seen.setdefault(f.stem, f)
    return [_load_file(seen[n]) for n in sorted(seen)]


def load_profile(
    name_or_path: str | os.PathLike | DeviceProfile, search: Sequence[str | os.PathLike] | None = None
) -> DeviceProfile:
    """A profile by name (looked up on :func:`search_path`) or by path to a YAML file."""
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    text = str(name_or_path)
    p = Path(text)
    if p.suffix in (".yaml", ".yml") or os.sep in text:
        if not p.is_file():
            raise ConfigError(f"device profile file {p} does not exist")
        return _load_file(p)
    dirs = search_path(search or ())
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"device profile folder {d} does not exist (from --devices-dir or ${ENV_VAR})")
        f = d / f"{text}.yaml"
        if f.is_file():
            return _load_file(f)
    known = sorted({f.stem for d in dirs for f in d.glob("*.yaml")})
    raise ConfigError(
        f"unknown device profile {text!r}; known: {', '.join(known) or 'none'} "
        f"(searched {', '.join(map(str, dirs)) or 'nothing'}; add NAME.yaml to a folder in ${ENV_VAR} "
        "or --devices-dir)"
    )


def _load_file(path: Path) -> DeviceProfile:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise FormatError(f"cannot read device profile {path}: {e}") from e
    from edge._device_yaml import from_dict

    try:
        profile = from_dict(data, source=path)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    if profile.name != path.stem:
        raise ConfigError(f"{path}: name {profile.name!r} differs from the file name; rename one so they match")
    return profile


def this_machine() -> str:
    """``platform.machine()`` in the profiles' spelling (``arm64`` -> ``aarch64``, ``AMD64`` -> ``x86_64``)."""
    m = platform.machine()
    return {"arm64": "aarch64", "AMD64": "x86_64", "amd64": "x86_64"}.get(m, m)
