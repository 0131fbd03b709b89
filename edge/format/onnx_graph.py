"""Small edits and look-ups on ONNX graphs that the exporter (host) and the importer (device) share."""

from __future__ import annotations

from collections import defaultdict

__all__ = ["consumers", "keep_only", "set_metadata", "subgraph_reads"]


def keep_only(field, keep) -> None:
    """Filter a repeated protobuf field in place."""
    kept = [item for item in field if keep(item)]
    del field[:]
    field.extend(kept)


def consumers(graph) -> dict[str, list]:
    """Value name -> the nodes of ``graph`` that read it (a node reading a value twice counts once)."""
    users: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            users[name].append(node)
    return users


def subgraph_reads(graph) -> set[str]:
    """Names read by nodes inside If/Loop/Scan bodies, which the main graph's consumer map does not see."""
    import onnx

    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                names.update(i for n in sub.node for i in n.input)
                names |= subgraph_reads(sub)
    return names


def set_metadata(proto, key: str, value: str) -> None:
    """Add or replace the ``metadata_props`` entry ``key`` of a ModelProto."""
    keep_only(proto.metadata_props, lambda p: p.key != key)
    proto.metadata_props.add(key=key, value=value)
