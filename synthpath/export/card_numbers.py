"""Numbers of the dataset card and their sources: every number the card shows is formatted
by :class:`Numbers`, which records where it came from (file, JSON path, value) for
``hf/card_provenance.json``; key/value tables of a JSON report, and the readers of the
card's source files (JSON reports, the ``model.safetensors`` header).

Used by :mod:`synthpath.export.card` (which re-exports the public names) and
:mod:`synthpath.export.card_sections`.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from ..pipeline import StageError


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def _path(path) -> list:
    """A JSON path as a list of keys/indices; a string is split on dots (for keys that
    contain no dots)."""
    if isinstance(path, str):
        return [int(p) if p.isdigit() else p for p in path.split(".")]
    return list(path)


class Numbers:
    """Formats values for the card and remembers their source (file, JSON path as a list
    of keys and indices; a last element ``"#len"`` means the length of the list there)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def __call__(self, value: Any, source: str, path) -> str:
        text = _fmt(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self.records.append({"text": text, "value": value, "source": source, "path": _path(path)})
        return text


def _read_json(path: Path, what: str, required: bool = True) -> dict | None:
    if not path.is_file():
        if required:
            raise StageError(f"{what} {path} is missing")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StageError(f"{what} {path} cannot be read: {e}") from None


def safetensors_params(path: Path) -> int:
    """Number of parameters in a safetensors file, from its JSON header alone."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return int(sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"))


MAX_LIST = 8  # longer lists (curves, histories) are left out of card tables


def _flat(obj: Any, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path tuple, leaf) pairs of a JSON object; short lists of scalars stay whole, long
    lists are dropped."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_flat(v, prefix + (k,)))
    elif isinstance(obj, list):
        if len(obj) > MAX_LIST:
            return []
        if any(isinstance(x, (dict, list)) for x in obj):
            for i, v in enumerate(obj):
                out.extend(_flat(v, prefix + (i,)))
        else:
            out.append((prefix, obj))
    else:
        out.append((prefix, obj))
    return out


def _show(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _cell(num: Numbers, v: Any, source: str, path) -> str:
    path = _path(path)
    if isinstance(v, list):
        return ", ".join(_cell(num, x, source, path + [i]) for i, x in enumerate(v)) or "—"
    if v is None:
        return "—"
    if isinstance(v, dict):
        return "; ".join(f"{k} {_cell(num, x, source, path + [k])}" for k, x in v.items()) or "—"
    if isinstance(v, str):
        return "`" + v.replace("|", "/").replace("`", "'").replace("\n", " ") + "`"
    return num(v, source, path)


def _table(num: Numbers, pairs: list[tuple[tuple, Any]], source: str) -> str:
    rows = ["| key | value |", "|---|---|"]
    for path, v in pairs:
        rows.append(f"| `{_show(path)}` | {_cell(num, v, source, list(path))} |")
    return "\n".join(rows)


def _get(d: dict, *names: str) -> tuple[str | None, Any]:
    for n in names:
        if n in d and d[n] is not None:
            return n, d[n]
    return None, None
