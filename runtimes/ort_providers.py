"""onnxruntime's execution providers and the provider options each accepts (``OrtBackend.PROVIDERS``).

The option names are those of onnxruntime's documentation for each provider; ``None`` means the
provider's options are not checked here. Device profiles (``devices/*.yaml``) are validated against
this table (:mod:`edge.devices.schema`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

from edge.errors import BackendUnavailableError

__all__ = ["ORT_PROVIDERS", "check_registered"]

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

#: provider name -> the option names it accepts (None: not checked)
ORT_PROVIDERS = MappingProxyType(
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


def check_registered(session, asked: Sequence[str]) -> None:
    """Refuse a session that does not run on every provider ``asked``: onnxruntime's Python wrapper, when a provider
    fails to start (a CUDA driver, a QNN backend library), prints "EP Error" on stdout and retries on its fallback
    providers (CPU), so the session serves with no error raised. The profile's ``fallback`` policy has already
    dropped the providers missing here; one that is here but does not start is this error, not a quiet CPU run."""
    ran = list(session.get_providers())
    if lost := [p for p in asked if p not in ran]:
        raise BackendUnavailableError(
            f"onnxruntime could not start {lost} and fell back to {ran} (its 'EP Error' message says why): fix "
            "that provider's installation, or leave it out (providers=, or the device profile)"
        )
