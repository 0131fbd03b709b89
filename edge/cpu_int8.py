"""Whether onnxruntime's U8S8 integer kernels can saturate on this CPU, and the warning a model at risk gets.

onnxruntime multiplies uint8 activations by int8 weights (U8S8: its dynamic ``MatMulInteger`` and
``DynamicQuantizeMatMul``, and static QDQ models, whose int8 activations its CPU provider rewrites to uint8) on
x86 with ``vpmaddubsw`` unless the CPU has VNNI: that instruction adds two u8*s8 products in a saturating 16-bit
lane, and two products of a 255 activation and a weight beyond +-64 exceed 32767. onnxruntime's own words
(``session.x64quantprecision`` in ``onnxruntime_session_options_config_keys.h``): "x64 SSE4.1/AVX2/AVX512(with no
VNNI) has overflow problem with quantizied matrix multiplication with U8S8"; its quantizer's ``reduce_range``:
"quantize weights with 7-bits. It may improve the accuracy for some models running on non-VNNI machine". 7-bit
weights (|w| <= 64) cannot overflow the pair sum (2 * 255 * 64 < 32767), and uint8 weights run on the U8U8 kernel.

The device that runs an int8 model is often not the host that quantized it, so the model's metadata
(``quantization.weight_type``, ``quantization.reduce_range``, written by ``exporters.quantize_onnx``) is checked
against this CPU's flags when it is loaded: :func:`warn_u8s8_saturation`. Only x86 is at risk: the pair-saturating
instruction is x86's (ARM's dot-product flags ``asimddp``/``i8mm`` only make int8 faster). LiteRT is not at risk:
its int8 scheme multiplies int8 activations by symmetric weights in [-127, 127], whose pair sums (at most
2 * 128 * 127 = 32512) fit 16 bits whatever the instruction.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterable

__all__ = ["VNNI_FLAGS", "cpu_flags", "u8s8_risk", "u8s8_saturates", "warn_u8s8_saturation"]

log = logging.getLogger(__name__)

#: x86 flags (as /proc/cpuinfo spells them) whose presence makes onnxruntime use a VNNI kernel for U8S8
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}
_MAX_CPUINFO_LINES = 100_000  # /proc/cpuinfo repeats its block per core; the flags line is in the first block


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags (x86 ``flags``, ARM ``Features``), or None where the file cannot be read (not Linux)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for i, line in enumerate(f):
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
                if i >= _MAX_CPUINFO_LINES:
                    break
    except OSError:
        return None
    return frozenset()


def u8s8_saturates(flags: Iterable[str] | None = None, arch: str | None = None) -> bool | None:
    """True where onnxruntime's U8S8 GEMM saturates 16-bit pair sums (x86 without VNNI), False where it cannot
    (x86 with VNNI, ARM and others), None on x86 when the CPU's flags cannot be read (this cannot be told).

    ``flags`` and ``arch`` default to this machine's (:func:`cpu_flags`, ``platform.machine()``); pass them to ask
    about another CPU (a device's profile, a test)."""
    if (arch or platform.machine()).lower() not in _X86:
        return False
    found = cpu_flags() if flags is None else frozenset(flags)
    if not found:  # unreadable, or a cpuinfo without a flags line: no evidence either way
        return None
    return not (found & set(VNNI_FLAGS))


def u8s8_risk(info, saturates: bool | None) -> str | None:
    """Why a model with ``info`` (a :class:`~edge.format.modelinfo.ModelInfo`) may compute wrong outputs on
    onnxruntime here, or None: its weights are int8 over the full range (``quantization.reduce_range`` false) and
    ``saturates`` (:func:`u8s8_saturates`) is True, or None (the CPU is unknown)."""
    q = getattr(info, "extra", {}).get("quantization")
    if not isinstance(q, dict) or saturates is False:
        return None
    if q.get("weight_type", "int8") != "int8" or q.get("reduce_range") is not False:
        return None  # uint8 weights run U8U8; 7-bit weights cannot overflow; no record: not ours to judge
    if not any(t.quant is not None and str(t.quant.dtype) == "int8" for t in getattr(info, "tensors", {}).values()):
        return None
    where = (
        "this x86 CPU has no VNNI (none of " + ", ".join(VNNI_FLAGS) + " in /proc/cpuinfo)"
        if saturates
        else "this x86 CPU's flags cannot be read, so whether it has VNNI is unknown"
    )
    return (
        f"its int8 weights use the full range (quantization.reduce_range false) and {where}: onnxruntime's U8S8 "
        "kernels without VNNI saturate 16-bit sums of u8*s8 pairs, so outputs can be far from what the quantized "
        "model computes; re-quantize the float model with `edge quantize --reduce-range` (7-bit weights, exact on "
        "every CPU) or `--weight-type uint8`"
    )


def warn_u8s8_saturation(
    info, name: str, flags: Iterable[str] | None = None, arch: str | None = None, read=None
) -> str | None:
    """Log one WARNING naming the risk and the fix when the onnxruntime int8 model ``name`` (its ``info``) is at
    risk on this CPU (:func:`u8s8_risk`; ``flags``, ``arch``: another CPU's, as :func:`u8s8_saturates` takes them);
    return the message, or None when there is no risk. ``read(initializer)``, when given, returns a target's stored
    integers: weights that all stay within 7 bits (``|w| <= 64``, e.g. quantized with headroom) cannot overflow."""
    if not isinstance(getattr(info, "extra", {}).get("quantization"), dict):  # a float model: no CPU to read
        return None
    why = u8s8_risk(info, u8s8_saturates(flags, arch))
    if why is not None and read is not None:
        int8 = [t for t in info.tensors.values() if t.quant is not None and str(t.quant.dtype) == "int8"]
        ints = [read(t.initializer) for t in int8]
        if all(a.size == 0 or max(int(a.max()), -int(a.min())) <= 64 for a in ints):  # reductions: no copies
            return None
    if why is not None:
        log.warning("%s on onnxruntime: %s", name, why)
    return why
