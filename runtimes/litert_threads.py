"""When a LiteRT interpreter must run on one thread (:func:`one_thread_reason`): the rule the backend
(:mod:`runtimes.litert`) applies to each interpreter it builds, from the interpreter's op listing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["one_thread_reason"]


def one_thread_reason(ops: Sequence[Mapping], delegate: bool, writable: frozenset[int], dynamic: Mapping[int, int]):
    """Why an interpreter with these op details (``_get_ops_details()``) must run on one thread, or None.

    - Built-in kernels only: their multithreaded ``CONV_2D`` copies its filter to HWCN at its first run
      and never reads the model bytes again (conv.cc: have_weights_been_transposed); on one thread it reads
      them every run, so an adaptable ``CONV_2D`` filter needs one thread.
    - Any interpreter that leaves a dynamic-range op (``dynamic``: op index -> int8 weight index, from
      :func:`runtimes.litert_arena.dynamic_range_ops`) to the built-in kernels: those split even tiny work
      over the threads and were measured to collapse with two (ai-edge-litert 2.3.0, 2 cores under load,
      fresh processes: digits CNN dynamic 0.011 ms on 1 thread, 0.05-3.4 ms on 2, built-in alone or under
      XNNPACK; ViT dynamic built-in 0.11 ms vs 1.7-1.9 ms), while XNNPACK's own partitions did not (the float
      built-in kernels collapse too where they split work, ViT fp32 0.11 vs 0.4-1.0 ms, but not on the CNN).
      An op is XNNPACK's when its weight is an input of a ``DELEGATE`` node.
    """
    ops = list(ops)
    if not delegate:
        for op in ops:
            inputs = list(op.get("inputs", ()))
            if op.get("op_name") == "DELEGATE" and "inputs" not in op:
                return "no op listing to check the built-in CONV_2D filters against the adaptable tensors"
            if op.get("op_name") == "CONV_2D" and len(inputs) > 1 and int(inputs[1]) in writable:
                return "their multithreaded CONV_2D keeps a copy of an adaptable filter and would not see a switch"
    if dynamic and any("inputs" not in op for op in ops):
        return "no op listing to tell which of its dynamic-range ops XNNPACK takes (the rest collapse on 2 threads)"
    taken = {int(i) for op in ops if op.get("op_name") == "DELEGATE" for i in op.get("inputs", ())}
    left = sorted({str(ops[k].get("op_name")) for k, w in dynamic.items() if k < len(ops) and w not in taken})
    if left:
        where = "XNNPACK leaves its" if delegate else "it runs its"
        fix = "; to keep XNNPACK's threads, quantize without them (exporters.quantize_tflite(..., op_types=...))"
        return (
            f"{where} dynamic-range {', '.join(left)} to the built-in kernels, which were measured to collapse "
            f"on more than one thread{fix if delegate else ''}"
        )
    return None
