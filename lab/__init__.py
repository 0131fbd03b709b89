"""The lab: the digits demo, the drifting stream, datasets, the demo model and the benchmarks.

Neither the device package (:mod:`edge`, :mod:`runtimes`) nor the exporter library
(:mod:`exporters`) imports it. Its commands (``edge demo``, ``edge train``, ``edge bench``)
reach the ``edge`` CLI through the ``edge.commands`` entry-point group (pyproject.toml),
loaded only when named.
"""
