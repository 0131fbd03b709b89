"""Names that become parts of OCI tags, TUF target paths and registry URLs, checked where they are first read.

The fleet (:mod:`edge.fleet`) and the device profiles (:mod:`edge.devices`, which may name where ``edge sync``
pulls from) share these rules, so a profile with a bad ``registry`` or ``channel`` is refused when it loads, not
at its first sync.
"""

from __future__ import annotations

import re

from edge.errors import ConfigError

__all__ = ["check_host", "check_name", "check_repository", "split_reference"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOST = re.compile(r"^[A-Za-z0-9.-]+(:\d+)?$")
_REPOSITORY = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*$")


def check_name(kind: str, value: str) -> str:
    """A channel or adapter name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            f"{kind} {value!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (it becomes part of an OCI tag and a TUF target path)"
        )
    return value


def check_host(registry: str) -> str:
    if not isinstance(registry, str) or not _HOST.match(registry):
        raise ConfigError(f"registry {registry!r} is not 'host' or 'host:port' (e.g. 127.0.0.1:5000)")
    return registry


def check_repository(repository: str) -> str:
    if not isinstance(repository, str) or len(repository) > 255 or not _REPOSITORY.match(repository):
        raise ConfigError(
            f"repository {repository!r} is not a valid OCI repository name (a lowercase path, e.g. edge/adapters)"
        )
    return repository


def split_reference(reference: str) -> tuple[str, str]:
    """``HOST[:PORT]/REPOSITORY`` -> (host, repository), both checked."""
    registry, _, repository = str(reference).partition("/")
    if not repository:
        raise ConfigError(f"registry reference {reference!r} needs a repository: HOST[:PORT]/REPOSITORY")
    return check_host(registry), check_repository(repository)
