"""Atomic file writes: write a temporary sibling, then ``os.replace`` it into place, so a
reader (or a resumed run) never sees half a file. Every stage writes its small text and
JSON outputs through here; large binary formats (safetensors, Parquet, TIFF, tar) use the
same temp-then-rename pattern next to their own writers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


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
    workers sharing a folder never write into each other's temp files."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default))


__all__ = ["json_default", "write_text", "write_json"]
