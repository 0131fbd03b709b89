"""Weights an exporter folded a BatchNorm into, told by the graph's own node metadata.

torch's dynamo ONNX export runs onnxscript's optimizer, whose ``FuseBatchNormIntoConv`` rule (and its ``Gemm`` and
``ConvTranspose`` twins) folds an eval-mode BatchNorm into the op before it: the stored weight becomes torch's
``W * gamma / sqrt(var + eps)`` per output channel, yet keeps the torch name (``0.weight``). Imported without a
state dict, that name was taken as the torch parameter's, so an adapter for ``0.weight`` would be added to the
folded values unscaled, and the import said ``batchnorm_folded: []``. With a state dict
(:func:`edge.convert.onnx_names.name_by_value`) the per-channel scale is found and recorded; without one, such a
weight is left out of the targets and said in ``skipped`` (:func:`drop_bn_folded`), with what to pass instead.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

__all__ = ["RULE_KEY", "bn_folded", "drop_bn_folded"]

#: the node metadata key onnxscript's rewriter stamps with the rule that made the node
RULE_KEY = "pkg.onnxscript.rewriter.rule_name"


def bn_folded(graph) -> dict[str, str]:
    """Initializer -> the rule, for every weight (input 1) of a node made by a ``FuseBatchNormInto*`` rule."""
    out: dict[str, str] = {}
    for node in graph.node:
        rule = next((p.value for p in node.metadata_props if p.key == RULE_KEY), "")
        if "FuseBatchNormInto" in rule and len(node.input) > 1:  # "FuseBatchNormIntoConv, RemoveOptional..."
            out[node.input[1]] = rule
    return out


def drop_bn_folded(graph, tensors: Mapping, skipped: MutableMapping[str, str]) -> dict:
    """``tensors`` without the targets a BatchNorm was folded into (each said in ``skipped``)."""
    folded = bn_folded(graph)
    kept = {}
    for key, t in tensors.items():
        rule = folded.get(t.initializer)
        if rule is None:
            kept[key] = t
        else:
            skipped[key] = (
                f"the exporter folded a BatchNorm into it (node metadata {rule}): its values are not torch's "
                f"{key}; pass --state-dict/--hf (state_dict=) to name it with the per-channel scale recorded"
            )
    return kept
