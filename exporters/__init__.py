"""Host side: export a trained torch or Hugging Face model for the device, and train adapters for it.

Public face (imported on first use; everything here needs torch)::

    from exporters import export_onnx, make_masks, select_targets, shira_adapter, train_shira
    info = export_onnx(model, (example,), "encoder.onnx", input_names=["x"], output_names=["logits"], name="enc")
    masks = make_masks(model, select_targets(model), density=0.02)  # kind="wm", the measured best
    trained = train_shira(model, masks, loader, epochs=5)       # or numpy (x, y); loss=fn(output, target)
    shira_adapter(trained, info, "site-a", model=model).save("site-a.safetensors")

=========================  ===========================================================
``export_onnx``            torch -> ONNX with this project's metadata (:mod:`exporters.onnx`)
``export_tflite``          torch -> .tflite via litert-torch (:mod:`exporters.tflite`)
``export_hf_encoder``      a Hugging Face encoder, pooled as its architecture defines (:mod:`exporters.hf`)
``make_masks``             SHiRA masks (rand, wm, grad, snip, ...) (:mod:`exporters.shira`)
``train_shira``            SHiRA deltas with the base frozen (:mod:`exporters.shira`)
``merge_shira``            the reference merge in torch (:mod:`exporters.shira`)
``shira_adapter``          trained deltas + model info -> ``edge.Adapter`` (:mod:`exporters.shira`)
``select_targets``         module names -> adaptable parameters (:mod:`exporters.shira`)
``attach``                 low-bit bottleneck/LoRA branches on any model (:mod:`exporters.lowbit`)
``train_lowbit``           train them with the quantizer in the loop (:mod:`exporters.lowbit`)
``export_with_slots``      export with the branches as switchable slots (:mod:`exporters.lowbit`)
``lowbit_adapter``         the trained branches -> ``edge.Adapter`` (:mod:`exporters.lowbit`)
``HostTrainer``            the torch trainer that growth can use (:mod:`exporters.host_trainer`)
``quantize_onnx``          int8 model (onnxruntime dynamic / static QDQ), adapter-ready (:mod:`exporters.quantize`)
``quantized_base``         the integers, scales and zero points a quantized model holds (:mod:`exporters.qshira`)
``train_shira_int``        integer SHiRA, trained with the base's grid in the loop (:mod:`exporters.qshira`)
``activation_grid``        a static model's activation grids, for train_shira_int (:mod:`exporters.qshira`)
``int_shira_adapter``      its output -> an integer ``edge.Adapter`` (:mod:`exporters.qshira`)
``quantize_tflite``        int8 .tflite (AI Edge Quantizer), adapter-ready (:mod:`exporters.tflite_quant`)
``tflite_quantized_base``  what an int8 .tflite holds, for ``train_shira_int`` (:mod:`exporters.tflite_quant`)
=========================  ===========================================================
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "export_onnx": "exporters.onnx",
    "export_tflite": "exporters.tflite",
    "export_hf_encoder": "exporters.hf",
    "make_masks": "exporters.shira",
    "train_shira": "exporters.shira",
    "merge_shira": "exporters.shira",
    "shira_adapter": "exporters.shira",
    "select_targets": "exporters.shira",
    "attach": "exporters.lowbit",
    "train_lowbit": "exporters.lowbit",
    "export_with_slots": "exporters.lowbit",
    "lowbit_adapter": "exporters.lowbit",
    "HostTrainer": "exporters.host_trainer",
    "quantize_onnx": "exporters.quantize",
    "quantized_base": "exporters.qshira",
    "train_shira_int": "exporters.qshira",
    "activation_grid": "exporters.qshira",
    "int_shira_adapter": "exporters.qshira",
    "quantize_tflite": "exporters.tflite_quant",
    "tflite_quantized_base": "exporters.tflite_quant",
    "tflite_activation_grid": "exporters.tflite_quant",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'exporters' has no attribute {name!r}")
