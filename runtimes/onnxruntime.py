"""onnxruntime backend with fused-mode weight writes.

onnxruntime prepacks constant MatMul weights at session start, so an in-place edit
of an initializer is never seen (shared ANCHORS.md section 2). Strategies:

``rebuild``
    Weights live in numpy arrays handed to the session as external initializers
    (``SessionOptions.add_external_initializers``); every write rebuilds the session.
    Full speed at inference, a switch costs a session build.
``bound``
    The writable tensors are graph inputs bound once through IOBinding to the same
    numpy arrays (zero copy). A write is a numpy scatter; no prepacking, so inference
    is slower (MLAS packs B on every call).
``hybrid`` (default)
    A write scatters into the arrays and flips inference to the ``bound`` session at
    once; a background thread builds a prepacked session from the same arrays and
    swaps it in when done, unless another write came meanwhile (then it builds
    again). Fast switch, full steady-state speed; the window in between runs at
    ``bound`` speed.

Memory: the writable tensors live once, in one contiguous float32 arena (so a switch
is two numpy scatters whatever the tensor count), plus onnxruntime's prepacked copy
(and transiently a second one while a rebuild runs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np

from edge.errors import BackendUnavailableError, ConfigError, FormatError
from edge.format.modelinfo import ModelInfo, fingerprint, onnx_info
from runtimes.base import BACKENDS, ArenaBackend, BackendOptions

__all__ = ["OrtBackend"]

log = logging.getLogger("edge.runtimes.onnxruntime")

_EXTERNAL_LOCATION = "edge-live-weights.bin"  # never read: data comes from memory


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


@BACKENDS.register("onnxruntime")
class OrtBackend(ArenaBackend):
    name = "onnxruntime"
    STRATEGIES = ("hybrid", "bound", "rebuild")
    DEFAULT_STRATEGY = "hybrid"
    REBUILD_FAILED = "background session rebuild failed; staying on the bound session"
    PROVIDERS = MappingProxyType(
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
    )
    CPU_PROVIDER = "CPUExecutionProvider"
    INSTALL_HINT = "pip install onnxruntime (or the vendor's onnxruntime build with its execution providers)"

    @classmethod
    def available_providers(cls) -> list[str] | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        return list(ort.get_available_providers())

    @classmethod
    def read_info(cls, path: Path) -> ModelInfo:
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except OSError as e:
            raise FormatError(f"cannot read model file {path}: {e}") from e
        except Exception as e:  # protobuf's DecodeError and friends
            raise FormatError(f"{path} is not a readable ONNX file: {e}") from e
        return onnx_info(proto)

    def __init__(self, model: bytes, options: BackendOptions) -> None:
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailableError(f"the onnxruntime backend needs onnx and onnxruntime: {e}") from e
        self._ort = ort
        strategy = self.DEFAULT_STRATEGY if options.strategy == "auto" else options.strategy
        if strategy not in self.STRATEGIES:
            raise ConfigError(
                f"unknown onnxruntime strategy {options.strategy!r}; allowed: auto, {', '.join(self.STRATEGIES)}"
            )
        self._strategy = strategy
        self._providers = self._check_providers(options.providers)
        popts = options.provider_options
        self._provider_options = [dict(o) for o in popts] if popts and len(popts) == len(self._providers) else None
        self._threads = options.threads

        try:
            proto = onnx.load_model_from_string(model)
        except Exception as e:  # protobuf raises DecodeError and friends
            raise FormatError(f"not a readable ONNX model: {e}") from e
        self.info = onnx_info(proto)
        writable = sorted({t.initializer for t in self.info.tensors.values()})
        self._arena, self._offset, self._live = self._take_writable(proto, writable)
        self._slots = {t.initializer for t in self.info.tensors.values() if t.slot}
        if options.verify:
            _verify_fingerprint(proto, self.info, self._live)
        self._output_names = [o.name for o in proto.graph.output]
        self._bound_bytes = self._bound_model(proto)
        self._static_bytes = self._static_model(proto)
        del proto
        self._slot_feeds = {k: self._live[k] for k in self._slots}

        self._init_rebuilds(options)
        self._bound = None
        self._binding = None

        if strategy in ("bound", "hybrid"):
            self._make_bound()
        if strategy in ("rebuild", "hybrid"):
            self._static = self._build_fresh()
            self._static_gen = 0
        if strategy == "hybrid":
            self._start_rebuilds("edge-ort-rebuild")

    # -- contract ---------------------------------------------------------------------------
    @property
    def strategy(self) -> str:
        return self._strategy

    @property
    def providers(self) -> list[str]:
        sess = self._static or self._bound
        return list(sess.get_providers())

    @property
    def input_names(self) -> list[str]:
        sess = self._static or self._bound
        return [i.name for i in sess.get_inputs() if i.name not in self._live]

    def read(self, tensor: str) -> np.ndarray:
        view = self._live[tensor].view()
        view.flags.writeable = False
        return view

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            if self._static is not None and self._static_gen == self._generation:
                run_feeds = {**feeds, **self._slot_feeds} if self._slot_feeds else feeds
                outs = self._static.run(self._output_names, run_feeds)
                return dict(zip(self._output_names, outs))
            b = self._binding
            for k, v in feeds.items():
                b.bind_cpu_input(k, np.ascontiguousarray(v))
            for name in self._output_names:
                b.bind_output(name, "cpu")
            self._bound.run_with_iobinding(b)
            return dict(zip(self._output_names, b.copy_outputs_to_cpu()))

    def _release(self) -> None:
        self._bound = self._binding = None

    # -- sessions ---------------------------------------------------------------------------
    def _session_options(self):
        so = self._ort.SessionOptions()
        if self._threads:
            so.intra_op_num_threads = int(self._threads)
        so.log_severity_level = 3
        return so

    def _make_bound(self) -> None:
        ort = self._ort
        self._bound = ort.InferenceSession(
            self._bound_bytes,
            self._session_options(),
            providers=self._providers,
            provider_options=self._provider_options,
        )
        self._binding = self._bound.io_binding()
        self._bound_values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self._live.items()}
        for k, v in self._bound_values.items():
            self._binding.bind_ortvalue_input(k, v)

    def _build_fresh(self):
        ort = self._ort
        t0 = time.perf_counter()
        so = self._session_options()
        names = [k for k in self._live if k not in self._slots]
        values = [ort.OrtValue.ortvalue_from_numpy(self._live[k]) for k in names]
        so.add_external_initializers(names, values)
        sess = ort.InferenceSession(
            self._static_bytes, so, providers=self._providers, provider_options=self._provider_options
        )
        sess._edge_keepalive = values  # onnxruntime may reference these buffers
        self.last_build_ms = (time.perf_counter() - t0) * 1e3
        return sess

    # -- model surgery ----------------------------------------------------------------------
    @staticmethod
    def _take_writable(proto, writable: Sequence[str]):
        """Copy the writable initializers into one float32 arena; return it, offsets and per-tensor views."""
        from onnx import numpy_helper

        inits = {t.name: t for t in proto.graph.initializer}
        missing = [w for w in writable if w not in inits]
        if missing:
            raise FormatError(f"model has no initializer(s) {missing[:5]} named in its metadata")
        arrays = {name: numpy_helper.to_array(inits[name]) for name in writable}
        bad = {k: str(a.dtype) for k, a in arrays.items() if a.dtype != np.float32}
        if bad:
            raise FormatError(f"writable tensors must be float32; got {bad}")
        arena = np.empty(sum(a.size for a in arrays.values()), np.float32)
        offset, live, at = {}, {}, 0
        for name, a in arrays.items():
            view = arena[at : at + a.size]
            view[:] = a.reshape(-1)
            offset[name] = at
            live[name] = view.reshape(a.shape)
            at += a.size
        return arena, offset, live

    def _bound_model(self, proto) -> bytes:
        import onnx

        m = onnx.ModelProto()
        m.CopyFrom(proto)
        self._inputs_from_initializers(m, set(self._live))
        return m.SerializeToString()

    def _inputs_from_initializers(self, m, names: set[str]) -> None:
        """Turn the initializers ``names`` into graph inputs of the same shape and dtype."""
        from onnx import helper

        keep = [t for t in m.graph.initializer if t.name not in names]
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)
        for name in sorted(names):
            arr = self._live[name]
            elem = helper.np_dtype_to_tensor_dtype(arr.dtype)
            m.graph.input.append(helper.make_tensor_value_info(name, elem, list(arr.shape)))

    def _static_model(self, proto) -> bytes:
        import onnx
        from onnx.external_data_helper import set_external_data

        m = onnx.ModelProto()
        m.CopyFrom(proto)
        self._inputs_from_initializers(m, self._slots)
        for t in m.graph.initializer:
            if t.name in self._live:
                set_external_data(t, location=_EXTERNAL_LOCATION)
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                for f in ("float_data", "int32_data", "int64_data", "double_data"):
                    t.ClearField(f)
        return m.SerializeToString()

    def _check_providers(self, asked: Sequence[str]) -> list[str]:
        available = self._ort.get_available_providers()
        asked = list(asked) or ["CPUExecutionProvider"]
        missing = [p for p in asked if p not in available]
        if missing:
            raise BackendUnavailableError(
                f"onnxruntime execution provider(s) {missing} are not available here; available: {available}. "
                "Install the onnxruntime build that has them, or ask for CPUExecutionProvider"
            )
        return asked


def _verify_fingerprint(proto, info: ModelInfo, live: Mapping[str, np.ndarray]) -> None:
    from onnx import numpy_helper

    heads = {t.initializer for t in info.tensors.values() if t.head}  # runtime-owned (edge.route.taps): not weights
    tensors = {k: v for k, v in live.items() if k not in heads}
    for t in proto.graph.initializer:
        if t.name not in tensors and t.name not in heads:
            tensors[t.name] = numpy_helper.to_array(t)
    got = fingerprint(tensors)
    if got != info.fingerprint:
        raise FormatError(
            f"model {info.name!r}: weights fingerprint {got} differs from the exported {info.fingerprint}; "
            "the file was modified after export (re-export it)"
        )
