"""Torch-free helpers for ``train.init_from`` (the pipeline imports them to fingerprint the
train stage without loading torch).

- :func:`weights_file`: the weights file a ``train.init_from`` value names;
- :func:`display_path`: how the card and the ledger show that path without leaking the
  user's filesystem: ``pkg://package/rel`` for a file inside an installed package, else the
  path relative to the run's output folder;
- :func:`read_provenance`: the ``provenance.json`` a shipped public checkpoint carries next
  to its weights (recipe file hash, weights hash, data declaration; see
  :mod:`synthpath.train.public_export`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

EMA_FILE = "model.safetensors"  # = synthpath.models.checkpoint.EMA_FILE (kept torch-free here)
CONFIG_FILE = "config.json"
PROVENANCE_FILE = "provenance.json"


def weights_file(path: Path | str) -> Path | None:
    """The weights a ``train.init_from`` value names (a train folder, a ``.safetensors`` file or
    a ``config.json``); None when it names none of those."""
    p = Path(path)
    if p.is_dir():
        return p / EMA_FILE
    if p.suffix == ".safetensors":
        return p
    if p.name == CONFIG_FILE:
        return p.parent / EMA_FILE
    return None


def _package_root(p: Path) -> Path | None:
    """The top-level package folder ``p`` lies in (the highest ancestor with ``__init__.py``)."""
    root = None
    for parent in p.parents:
        if (parent / "__init__.py").is_file():
            root = parent
        elif root is not None:
            break
    return root


def display_path(path: Path | str, relative_to: Path | str | None = None) -> str:
    """``path`` as the card and ledger show it: never an absolute path of this machine."""
    p = Path(path).resolve()
    root = _package_root(p)
    if root is not None:
        return f"pkg://{root.name}/{p.relative_to(root).as_posix()}"
    if relative_to is not None:
        try:
            return Path(os.path.relpath(p, Path(relative_to).resolve())).as_posix()
        except ValueError:  # another drive (Windows)
            pass
    return p.name


def read_provenance(weights: Path) -> dict | None:
    """The ``provenance.json`` beside ``weights`` (a shipped checkpoint's manifest), or None when
    there is none; ValueError when it exists but is unreadable or not a JSON object."""
    f = Path(weights).parent / PROVENANCE_FILE
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: unreadable provenance manifest: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("weights_sha256"), str):
        raise ValueError(f"{f}: a provenance manifest must be a JSON object with a 'weights_sha256' string")
    return data
