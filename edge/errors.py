"""One exception tree for the whole runtime.

Every error the package raises on purpose is an :class:`EdgeError`. Each subclass
also inherits the builtin it refines, so callers that already catch ``ValueError``
or ``OSError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "EdgeError",
    "ConfigError",
    "FormatError",
    "AdapterMismatchError",
    "BackendUnavailableError",
    "ExportValidationError",
    "RegistryError",
    "SignatureError",
    "RuntimeClosedError",
    "SaturationError",
    "WriteError",
    "OutOfMemoryError",
]


class EdgeError(Exception):
    """Base class of every error raised on purpose by this package."""


class ConfigError(EdgeError, ValueError):
    """A configuration value or option is unknown or out of range."""


class FormatError(EdgeError, ValueError):
    """A file is not a valid model or adapter file (corrupt, truncated, wrong version)."""


class AdapterMismatchError(EdgeError, ValueError):
    """An adapter does not fit the model it is applied to (fingerprint, names, shapes, indices)."""


class BackendUnavailableError(EdgeError, RuntimeError):
    """A backend, execution provider or delegate that was asked for is not installed."""


class ExportValidationError(EdgeError, AssertionError):
    """An exported file's outputs differ from the source model's beyond tolerance."""


class RegistryError(EdgeError, KeyError):
    """A name is registered twice, or looked up and not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class SignatureError(EdgeError, PermissionError):
    """An adapter's signature is missing, malformed, or not from a trusted key."""


class RuntimeClosedError(EdgeError, RuntimeError):
    """A runtime was used after it was closed."""


class SaturationError(ConfigError):
    """Fusing adapters into a quantized weight would leave the integer type's range."""


class WriteError(EdgeError, OSError):
    """A file could not be written where it was asked for (a folder in the way, no permission, disk full)."""


class OutOfMemoryError(EdgeError, MemoryError):
    """The device ran out of memory loading or running a model (the file is fine): a lighter strategy, a memory
    budget that makes ``strategy="auto"`` pick one, or more memory for the process."""
