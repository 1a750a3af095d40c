"""YAML for suites and ``--method-arg`` values: PyYAML's safe loader without YAML 1.1's
base-60 numbers, so a layer range such as ``10:20`` stays text (PyYAML reads it as 620);
and the keys a YAML file gives twice (suites, task files)."""

from __future__ import annotations

import re
from typing import Any

import yaml

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose ints and floats have no base-60 form."""


Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# PyYAML's own patterns (resolver.py) with the base-60 alternatives left out
Loader.add_implicit_resolver(_INT, re.compile(r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))
Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:
    [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def load(text: str) -> Any:
    """Parse ``text`` with :class:`Loader` (safe: no arbitrary objects)."""
    return yaml.load(text, Loader=Loader)  # a SafeLoader subclass: safe


def compose(text: str) -> yaml.Node | None:
    """The node tree of ``text`` (for line numbers), resolved as :func:`load` does."""
    return yaml.compose(text, Loader=Loader)


def duplicate_keys(root: yaml.Node | None, source: str) -> list[str]:
    """``file:line: key 'x' given twice`` for each key repeated in one mapping of the node
    tree ``root`` (YAML silently keeps the last value), in line order."""
    found: list[tuple[int, str]] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                if key.value in seen:
                    found.append((key.start_mark.line + 1, key.value))
                seen.add(key.value)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return [f"{source}:{line}: key '{key}' given twice" for line, key in sorted(found)]


def problem(exc: yaml.YAMLError) -> tuple[str, str]:
    """``file:LINE``'s suffix and PyYAML's problem in words: ``(":3", "found ...")``; a
    tab where YAML wants spaces gets the fix added."""
    mark = getattr(exc, "problem_mark", None)
    text = str(getattr(exc, "problem", None) or exc)
    if "'\\t'" in text:
        text += "; YAML indents with spaces, not tabs"
    return (f":{mark.line + 1}" if mark is not None else ""), text
