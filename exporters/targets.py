"""Which weights SHiRA adapts: module names matched as PEFT's ``target_modules`` (:func:`select_targets`).

A module is adaptable when its own ``weight`` has two or more axes (Linear, Conv, Embedding, custom modules alike).
A module that keeps its weights under other names (``nn.GRU``/``nn.LSTM``'s ``weight_ih_l0``, ``weight_hh_l0``) is no
adaptable module, but its 2-D parameters are: :func:`exporters.shira.make_masks` takes parameter names, and the
refusal names them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from edge.errors import ConfigError

__all__ = ["match_modules", "select_targets", "short_list"]


def select_targets(model: nn.Module, patterns: str | Sequence[str] | None = None) -> list[str]:
    """Names of the ``weight`` parameters (2+ axes) of the modules matched by ``patterns``, in module order.

    Like PEFT's ``target_modules``: a list matches a module whose name equals an entry
    or ends with ``"." + entry`` (``["q", "v", "fc1"]``); a single string is a regex
    that must match the whole module name (``r"blocks\\.0\\..*"``); ``None`` takes every
    adaptable module (Linear, Conv, Embedding...; pass :data:`DEFAULT_TARGETS` for the
    digits encoder's attention and MLP linears). A pattern matching no adaptable module
    is a :class:`ConfigError` naming it.
    """
    adaptable = [name for name, m in model.named_modules() if _adaptable(m)]
    if not adaptable:
        raise ConfigError(f"{type(model).__name__} has no module whose weight has 2 or more axes; nothing to adapt")
    chosen = adaptable if patterns is None else match_modules(model, patterns, adaptable, what="adaptable")
    return [f"{n}.weight" if n else "weight" for n in chosen]


def match_modules(
    model: nn.Module, patterns: str | Sequence[str], candidates: Sequence[str] | None = None, *, what: str = "matching"
) -> list[str]:
    """Names among ``candidates`` (default: every module) matched by ``patterns`` (see :func:`select_targets`).

    Raises :class:`ConfigError` naming every pattern that matches none of them, and the
    candidate names (truncated).
    """
    names = [n for n, _ in model.named_modules()] if candidates is None else list(candidates)
    if isinstance(patterns, str):
        try:
            regex = re.compile(patterns)
        except re.error as exc:
            raise ConfigError(f"target pattern {patterns!r} is not a valid regex: {exc}") from exc
        tests = {patterns: lambda n: regex.fullmatch(n) is not None}
    else:
        keys = list(patterns)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ConfigError(f"target patterns must be a regex string or non-empty module names, got {patterns!r}")
        tests = {k: (lambda n, k=k: n == k or n.endswith("." + k)) for k in keys}
    hits = {p: {n for n in names if test(n)} for p, test in tests.items()}
    missing = [p for p, h in hits.items() if not h]
    if missing:
        pool = set(names)
        others = [n for n, _ in model.named_modules() if n not in pool and any(tests[p](n) for p in missing)]
        near = f" ({short_list(others)} match but are not {what} modules{_by_name(model, others)})" if others else ""
        raise ConfigError(
            f"target pattern(s) {missing} match no {what} module of {type(model).__name__}{near}; "
            f"available modules: {short_list(names, 40)}"
        )
    chosen = set().union(*hits.values())
    return [n for n in names if n in chosen]


def _adaptable(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return isinstance(weight, nn.Parameter) and weight.dim() >= 2


def short_list(names: Sequence[str], n: int = 5) -> str:
    """The first ``n`` names as a list's repr, and how many more."""
    return repr(list(names[:n]))[:-1] + (f", ... {len(names) - n} more]" if len(names) > n else "]")


def _by_name(model: nn.Module, names: Sequence[str]) -> str:
    """The 2-D+ parameters ``names``' modules hold under other names than ``weight`` (a GRU's), for make_masks."""
    held = [
        f"{n}.{k}" if n else k
        for n in names
        for k, p in model.get_submodule(n).named_parameters(recurse=False)
        if p.dim() >= 2 and k != "weight"
    ]
    return f"; their 2-D weights go by parameter name, make_masks(model, {short_list(held, 4)}, ...)" if held else ""
