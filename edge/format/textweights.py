"""String (and other object) initializers made hashable for :func:`edge.format.modelinfo.fingerprint`.

skl2onnx stores a classifier's class labels as a STRING initializer (read by ``ArrayFeatureExtractor``); onnx reads
it as a numpy object array, whose buffer holds pointers, so its fingerprint differed on every read and such a model,
once imported, was refused at every load as "modified after export". :func:`hashable` stands each such array in for
its values: a length-prefixed UTF-8 encoding of its shape and items, so a changed label still changes the fingerprint.
The encoding is typed ``S1`` (one-byte strings), a type no ONNX initializer reads as (onnx gives STRING tensors as
object arrays), so no numeric tensor of the same bytes hashes alike; fixed-width ``S``/``U`` arrays hold no pointers
and are hashed as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["hashable"]


def hashable(tensors: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """``tensors``, each object array (onnx's STRING tensors) replaced by an ``S1`` encoding of its shape and values."""
    if not any(np.asarray(v).dtype.kind == "O" for v in tensors.values()):
        return tensors
    return {k: _encoded(v) if np.asarray(v).dtype.kind == "O" else v for k, v in tensors.items()}


def _encoded(a) -> np.ndarray:
    a = np.asarray(a)
    parts = [b"str", repr(tuple(a.shape)).encode()]
    for item in a.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode("utf-8", "surrogatepass")
        parts += [len(b).to_bytes(8, "little"), b]
    return np.frombuffer(b"".join(parts), "S1")
