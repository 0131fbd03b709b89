"""YAML the one way this project reads it (device profiles): ``yaml.SafeLoader`` with limits and YAML 1.1's traps
refused. Re-exported by :mod:`edge.format.io`, beside the other bounded readers.
"""

from __future__ import annotations

from edge.errors import FormatError

__all__ = ["MAX_YAML_ALIASES", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "load_yaml"]

MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 100_000  # nodes after expanding aliases (billion laughs expands to 10^9)
MAX_YAML_ALIASES = 100


def load_yaml(data: bytes | str, *, source: str = "YAML") -> object:
    """Parse YAML the one way this project does: ``yaml.SafeLoader`` plus duplicated-key refusal,
    at most ``MAX_YAML_ALIASES`` aliases and ``MAX_YAML_NODES`` nodes once aliases are expanded
    (a billion-laughs file is refused, not expanded) and ``MAX_YAML_DEPTH`` levels of nesting. A number YAML 1.1
    reads otherwise than a person does (``010`` is 8, ``1:30`` is 90: octal, base 60) is refused, saying so."""
    import yaml

    try:
        loader = _yaml_loader()(data)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except FormatError as e:
        raise FormatError(f"{source}: {e}") from e
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as e:
        raise FormatError(f"{source}: not valid YAML: {e}") from e


_LOADER = None


def _yaml_loader():
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml

    class Loader(yaml.SafeLoader):
        def __init__(self, stream) -> None:
            super().__init__(stream)
            self._depth = 0
            self._aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self._aliases += 1
                if self._aliases > MAX_YAML_ALIASES:
                    raise FormatError(f"more than {MAX_YAML_ALIASES} aliases (*name); write the values out")
            self._depth += 1
            try:
                if self._depth > MAX_YAML_DEPTH:
                    raise FormatError(f"nesting deeper than {MAX_YAML_DEPTH} levels")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def get_single_node(self):
            node = super().get_single_node()
            if node is not None:
                _expanded_size(node, {})
            return node

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        dup = key in seen
                    except TypeError:
                        continue  # unhashable: SafeLoader refuses it below
                    if dup:
                        raise FormatError(
                            f"key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1})"
                        )
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    def plain_number(kind: str):
        base = getattr(yaml.SafeLoader, f"construct_yaml_{kind}")

        def construct(loader, node):
            value = base(loader, node)
            text = str(node.value).replace("_", "").lstrip("+-")
            where = f"{node.value!r} (line {node.start_mark.line + 1})"
            if ":" in text:  # 1:30 is 90 to YAML 1.1, text to YAML 1.2 and to a reader
                raise FormatError(f"{where} is a base-60 number to YAML 1.1 ({value!r}); quote it or write {value!r}")
            if kind == "int" and text[:1] == "0" and text.isdigit() and int(text) != abs(value):  # 010 is 8 to YAML 1.1
                raise FormatError(f"{where} is octal to YAML 1.1 ({value!r}); write it without the leading zero")
            return value

        Loader.add_constructor(f"tag:yaml.org,2002:{kind}", construct)

    plain_number("int")
    plain_number("float")
    _LOADER = Loader
    return Loader


def _expanded_size(node, memo: dict) -> int:
    """Nodes ``node`` stands for once every alias is expanded; raises over ``MAX_YAML_NODES``."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = MAX_YAML_NODES + 1  # a cycle (an alias to an enclosing node) counts as too big
    size = 1
    if isinstance(node.value, list):
        for item in node.value:
            for child in item if isinstance(item, tuple) else (item,):
                size += _expanded_size(child, memo)
                if size > MAX_YAML_NODES:
                    raise FormatError(f"expands to more than {MAX_YAML_NODES} nodes (aliases of aliases?)")
    memo[key] = size
    return size
