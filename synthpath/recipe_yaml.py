"""Reading a recipe's text and YAML safely, and applying ``--set`` overrides.

A recipe file is read as bounded UTF-8 text and parsed with PyYAML's safe loader plus three
guards: duplicate keys are reported (YAML would keep only the last), tags that build Python
objects are refused, and the node graph is measured before it is built, so an alias "bomb"
(anchors whose expansion is exponential) is refused in microseconds instead of hanging.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

#: Largest recipe file read (bytes). Real recipes are a few KiB.
MAX_BYTES = 1 << 20
#: Most YAML nodes a recipe may expand to once aliases are followed.
MAX_NODES = 100_000


# --------------------------------------------------------------------------- text and YAML
class YamlProblem(ValueError):
    """The text is not a recipe YAML; ``line`` is 1-based or None."""

    def __init__(self, message: str, line: int | None = None, key: str = ""):
        super().__init__(message)
        self.line, self.key = line, key


def read_recipe_text(path: Path) -> str:
    """The recipe file as text; :class:`YamlProblem` for a file that is too large, binary or not UTF-8."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise YamlProblem(f"the recipe file is {size} bytes; a recipe is at most {MAX_BYTES} bytes")
        data = path.read_bytes()
    except OSError as e:
        raise YamlProblem(f"cannot read the recipe file: {e.strerror or e}") from None
    if b"\x00" in data:
        line = data[:data.index(b"\x00")].count(b"\n") + 1
        raise YamlProblem("the file is binary (it contains NUL bytes), not a YAML recipe", line)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise YamlProblem(f"the file is not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}); "
                          f"save it as UTF-8", line) from None


def _mark_line(e: yaml.YAMLError) -> int | None:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return mark.line + 1 if mark is not None else None


def _yaml_message(e: yaml.YAMLError) -> str:
    """PyYAML's error without its ``in "<unicode string>"`` noise: what, where, and its context."""
    problem = getattr(e, "problem", None)
    if not problem:
        return " ".join(str(e).split())
    pm, cm = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
    msg = problem
    if pm is not None:
        msg += f" at line {pm.line + 1}, column {pm.column + 1}"
    context = getattr(e, "context", None)
    if context:
        msg += f" ({context}" + (f" at line {cm.line + 1}, column {cm.column + 1})" if cm is not None else ")")
    return msg


def _expanded_size(root: yaml.Node) -> int:
    """Nodes in the tree once every alias is expanded (shared nodes counted each time)."""
    memo: dict[int, int] = {}
    busy: set[int] = set()

    def size(node: yaml.Node) -> int:
        k = id(node)
        if k in memo:
            return memo[k]
        if k in busy:
            raise YamlProblem("a YAML alias refers to its own anchor (a recursive structure)", node.start_mark.line + 1)
        busy.add(k)
        if isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(a) + size(b) for a, b in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(c) for c in node.value)
        else:
            n = 1
        busy.discard(k)
        memo[k] = n = min(n, MAX_NODES + 1)
        return n

    return size(root)


def _duplicate_keys(root: yaml.Node) -> list[tuple[str, int, str]]:
    out: list[tuple[str, int, str]] = []
    seen: set[int] = set()

    def walk(node: yaml.Node, path: tuple) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for k, v in node.value:
                name = k.value if isinstance(k, yaml.ScalarNode) else None
                if name is not None and name != "<<":
                    line = k.start_mark.line + 1
                    if name in first:
                        out.append((".".join(map(str, path + (name,))), line,
                                    f"duplicate key {name!r} (first given at line {first[name]}); "
                                    f"YAML would silently keep only the last one"))
                    else:
                        first[name] = line
                walk(v, path + ((name if name is not None else "?"),))
        elif isinstance(node, yaml.SequenceNode):
            for i, c in enumerate(node.value):
                walk(c, path + (i,))

    walk(root, ())
    return out


def load_yaml(text: str, *, what: str = "the recipe") -> tuple[Any, list[tuple[str, int, str]]]:
    """Parse YAML safely: returns ``(data, duplicate-key problems)``; raises :class:`YamlProblem`
    for a syntax error, a tag that would build a Python object, too deep nesting or an
    alias expansion beyond :data:`MAX_NODES` nodes."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        if _expanded_size(node) > MAX_NODES:
            raise YamlProblem(f"{what} expands to more than {MAX_NODES} YAML nodes once its aliases (*name) "
                              f"are followed; this looks like an alias bomb", node.start_mark.line + 1)
        dups = _duplicate_keys(node)
        return loader.construct_document(node), dups
    except yaml.constructor.ConstructorError as e:
        raise YamlProblem(f"{what} uses a YAML tag that is not allowed (only plain YAML values are): "
                          f"{e.problem}", _mark_line(e)) from None
    except yaml.YAMLError as e:
        raise YamlProblem(f"{what} is not valid YAML: {_yaml_message(e)}", _mark_line(e)) from None
    except RecursionError:
        raise YamlProblem(f"{what} is nested too deeply") from None
    finally:
        loader.dispose()


def _parse_value(text: str) -> Any:
    if not text.strip():
        return ""
    data, _ = load_yaml(text, what="the value")
    return data


def set_override(data: dict, item: str) -> None:
    """Apply one ``a.b.c=value``; raises ``ValueError`` saying what is wrong."""
    if "=" not in item:
        raise ValueError("an override must look like key.path=value")
    key, value = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError("empty key")
    try:
        parsed = _parse_value(value)
    except YamlProblem as e:
        raise ValueError(str(e)) from None
    node: Any = data
    for depth, p in enumerate(parts):
        here = ".".join(parts[:depth]) or "<root>"
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not p.lstrip("-").isdigit():
                raise ValueError(f"{here} is a list: index it with a number (0 to {len(node) - 1}), not {p!r}")
            i = int(p)
            if not 0 <= i < len(node):
                raise ValueError(f"{here} has {len(node)} item(s): index {i} is past its end "
                                 f"(use 0 to {len(node) - 1}, or set the whole list: {here}=[...])")
            if last:
                node[i] = parsed
            else:
                node = node[i]
        elif isinstance(node, dict):
            if last:
                node[p] = parsed
            else:
                node = node.setdefault(p, {})
        else:
            raise ValueError(f"cannot set {p!r} inside {here}: it is a single value ({node!r}), not a section")


__all__ = ["MAX_BYTES", "MAX_NODES", "YamlProblem", "read_recipe_text", "load_yaml", "set_override"]
