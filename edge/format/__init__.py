"""What host and device share on disk: model info, the adapter file, the low-bit codec,
transport compression, signatures, update state, the TFLite file reader, bounded I/O.

This package imports nothing of the project but :mod:`edge.errors` and :mod:`edge.registry`,
so the exporters (host) and the runtime (device) read and write the same bytes.
"""
