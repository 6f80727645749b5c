"""Atomic file writes: write a temporary sibling, then ``os.replace`` it into place, so a
reader (or a resumed run) never sees half a file. Every stage writes its small text and
JSON outputs through here; large binary formats (safetensors, Parquet, TIFF, tar) use the
same temp-then-rename pattern next to their own writers."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("synthpath")


def json_default(o: Any) -> Any:
    """JSON for numpy/torch scalars and arrays; anything else as its ``str``."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "tolist") and type(o).__module__.startswith("torch"):
        return o.tolist()
    return str(o)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically. The temp name carries the process id, so
    workers sharing a folder never write into each other's temp files; a failed write (a
    full disk) removes its temp file and re-raises."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def _finite(obj: Any, where: str, bad: list[str]) -> Any:
    """``obj`` with every NaN/infinite float replaced by ``None``; their key paths go to ``bad``."""
    if isinstance(obj, float) or isinstance(obj, np.floating):
        if not math.isfinite(obj):
            bad.append(f"{where} = {float(obj)}")
            return None
        return obj
    if isinstance(obj, dict):
        return {k: _finite(v, f"{where}.{k}", bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v, f"{where}[{i}]", bad) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray) or (type(obj).__module__.startswith("torch") and hasattr(obj, "tolist")):
        return _finite(obj.tolist(), where, bad)
    return obj


def write_json(path: str | Path, obj: Any, *, nonfinite: str = "null") -> None:
    """``obj`` as indented, key-sorted, standard JSON, written atomically.

    JSON has no Infinity or NaN, and readers such as ``jq`` or JavaScript reject them, so
    they are never written: with ``nonfinite="null"`` (default) each becomes ``null`` (a
    value that could not be computed) and a warning names its key; with ``"error"`` a
    ``ValueError`` naming the file and key is raised instead (for files whose numbers are
    claims, such as a privacy ledger).
    """
    bad: list[str] = []
    clean = _finite(obj, "$", bad)
    if bad:
        if nonfinite == "error":
            raise ValueError(f"{path}: refusing to write non-finite numbers into JSON: {', '.join(bad[:5])}")
        log.warning("%s: non-finite numbers written as null: %s", path, ", ".join(bad[:5]))
    write_text(path, json.dumps(clean, indent=2, sort_keys=True, default=json_default, allow_nan=False))


__all__ = ["json_default", "write_text", "write_json"]


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
