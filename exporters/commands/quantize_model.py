"""The model handed to ``edge quantize``, checked: first from its graph alone, then whole.

:func:`read_graph` reads an ``.onnx`` file's graph without its weights (:func:`runtimes.onnx_file.parse_graph`
walks the file's protobuf fields and skips the tensors' bytes), so what the graph refuses (a model quantized already,
by ``edge quantize`` or by another tool: :mod:`exporters.quantize_graph`; :func:`refuse`: integer inputs with no
samples to compare on) is refused before the weights are read: on BERT-base (436 MB) the refusal of its token-id
inputs took 56 s and 1.76 GB when it came after reading and checking the whole model. :func:`read_model` then
parses the bytes the quantizer gets, once, and the same refusals run on them again (the file may have changed in
between).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["read_graph", "read_model", "refuse"]


def read_graph(src: Path):
    """(ModelInfo, input specs) of an ``.onnx`` file from its graph alone: the weights are skipped, not read
    (:func:`runtimes.onnx_file.parse_graph` walks the file's fields); FormatError for a damaged file, ConfigError
    for a model quantized already."""
    from edge.format.feeds import onnx_input_specs
    from edge.format.modelinfo import onnx_info
    from exporters.quantize_graph import refuse_quantized_input
    from runtimes.base import model_buffer
    from runtimes.onnx_file import parse_graph

    with model_buffer(src) as (buf, _):
        proto = parse_graph(buf)[0]
    info = onnx_info(proto)
    refuse_quantized_input(proto.graph, info, src.name)  # its nodes say so: before its weights are read or copied
    return info, onnx_input_specs(proto, info.inputs)


def refuse(src: Path, info, specs, args) -> None:
    """What the model's metadata and declared inputs refuse: a quantized model, integer inputs with no samples."""
    from edge.errors import ConfigError
    from exporters.quantize_graph import refuse_twin

    refuse_twin(info, src.name)  # .tflite too (an .onnx graph's quantized ops are refused where it is read)
    ints = [n for n, spec in specs.items() if spec.dtype is not None and spec.dtype.kind != "f"]
    if ints and args.calib is None:
        raise ConfigError(
            f"{src.name} takes integer inputs {ints} (token ids), on which the result is compared with the float "
            "model: no such input can be made up; pass --calib SAMPLES.npz with real ones (one array per input)"
        )


def read_model(data: bytes, fmt: str, src: Path):
    """(ModelInfo, input specs) of a model's bytes; FormatError for a damaged file or one without our metadata
    (ConfigError: an input or output declaring no shape, which onnx.checker refuses)."""
    from edge.errors import ConfigError, FormatError
    from edge.format.feeds import onnx_input_specs, tflite_input_specs

    if fmt == "tflite":
        from edge.format.tflite import tflite_info

        return tflite_info(data), tflite_input_specs(data)
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from edge.format.modelinfo import onnx_info

    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise FormatError(f"{src} is not a readable ONNX model: {e}") from e
    info = onnx_info(proto)
    from exporters.quantize_graph import refuse_quantized_input

    refuse_quantized_input(proto.graph, info, src.name)
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise FormatError(
            f"{src.name} keeps {external[:3]} in external data files; quantize takes one self-contained file, "
            "as exporters.export_onnx writes"
        )
    free = [
        v.name
        for v in (*proto.graph.input, *proto.graph.output)
        if v.type.HasField("tensor_type") and not v.type.tensor_type.HasField("shape")  # (skl2onnx's maps: no tensor)
    ]
    if free:  # edge.Runtime runs such a file (its feeds' dtype checked); onnx's checker, so the quantizer, refuses it
        raise ConfigError(
            f"{src.name}: input/output {free[0][:80]!r} declares no shape (not even its rank), which onnx's checker "
            "refuses (edge quantize checks its output with it); give the original its shapes (symbolic dims are "
            "fine: model.graph.input[i].CopyFrom(onnx.helper.make_tensor_value_info(name, elem_type, ['batch', ...])), "
            "outputs likewise) "
            "and import it again (same weights, same fingerprint: its adapters still load)"
        )
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as e:  # ValueError: e.g. a name that is not UTF-8
        old = (
            "; an IR 3 file lists every weight as an input: import the original again (`edge import-onnx` writes IR 4; "
            "same fingerprint, its adapters still load)"
        )
        why = (str(e).splitlines() or [""])[0] + (old if "initializer but not in graph input" in str(e) else "")
        raise FormatError(f"{src.name} is not a valid ONNX model: {why}") from e
    for t in proto.graph.initializer:  # onnxruntime's quantizer asserts on a NaN/Inf weight; say so first
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            if not np.isfinite(numpy_helper.to_array(t)).all():
                raise FormatError(f"{src.name}: weight {t.name[:80]!r} holds NaN or Inf; export a finite model")
    return info, onnx_input_specs(proto, info.inputs)  # from the proto: parsing the bytes again took BERT-base 2 s
