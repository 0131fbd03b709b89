"""Out-of-distribution detection on a frozen encoder's features: the public face.

Importing this module registers every built-in detector in :data:`DETECTORS`: the
interface, metrics and the baselines ``msp``, ``energy``, ``mahalanobis`` and ``knn``
live in :mod:`edge.route.detectors`, the hyperdimensional-computing detector ``hdc``
(the router's) in :mod:`edge.route.hdc`. A new detector is one module with one
``@DETECTORS.register(name)`` class, imported here.
"""

from __future__ import annotations

from edge.route.detectors import (
    DETECTORS,
    KNN,
    MSP,
    Detector,
    Energy,
    Mahalanobis,
    auroc,
    fpr_at_tpr,
    make_detector,
    threshold_at_tpr,
)
from edge.route.hdc import HDC

__all__ = [
    "DETECTORS",
    "Detector",
    "Energy",
    "HDC",
    "KNN",
    "MSP",
    "Mahalanobis",
    "auroc",
    "fpr_at_tpr",
    "make_detector",
    "threshold_at_tpr",
]
