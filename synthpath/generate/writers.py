"""WebDataset shard writing: deterministic tars, atomic shards, done-markers.

A shard is a plain POSIX tar. Each sample (one multi-magnification stack) contributes
``{key}.{level}.png`` per level (``5x``, ``10x``, ...), ``{key}.cls`` (class index as
ASCII) and ``{key}.json`` (metadata). Members are sorted by name and written with a
fixed mtime, uid/gid 0, empty owner names and mode 0644, and PNGs are encoded with fixed
settings, so a shard's bytes depend only on its content: same samples, same sha256.

A shard is written to ``<name>.tar.tmp`` and renamed to ``<name>.tar`` when complete;
only then is ``<name>.done.json`` written (count, sha256, label histogram, recipe and
plan hashes). A shard counts as finished only when its marker exists and the tar's
sha256 matches it; anything else is redone.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import sha256_file  # noqa: F401  (re-exported: packing and tests use this name)
from ..atomic import write_json as write_json_atomic  # re-exported: runner and tests use this name

#: mtime of every tar member (2000-01-01T00:00:00Z): fixed so bytes depend on content only.
TAR_MTIME = 946684800
PNG_COMPRESS_LEVEL = 6


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def encode_png(image: np.ndarray) -> bytes:
    """Encode an RGB uint8 array [H,W,3] as PNG with fixed settings (no metadata)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image [H,W,3], got dtype {arr.dtype} shape {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), "RGB").save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def sample_members(key: str, images: dict[str, np.ndarray], label: int, meta: dict) -> dict[str, bytes]:
    """The tar members of one sample: name -> bytes.

    ``images`` maps level names (``"20x"``) to RGB uint8 arrays; ``meta`` is the sample's
    JSON metadata (written with sorted keys).
    """
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
    out: dict[str, bytes] = {}
    for name, img in images.items():
        if "." in name:
            raise ValueError(f"level name {name!r} of sample {key!r} contains a dot")
        out[f"{key}.{name}.png"] = encode_png(img)
    out[f"{key}.cls"] = str(int(label)).encode("ascii")
    out[f"{key}.json"] = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return out


def write_tar(path: Path, members: dict[str, bytes]) -> str:
    """Write ``members`` (name -> bytes) as a deterministic tar at ``path`` (not atomic by
    itself; callers write to a temp name). Returns the file's sha256 hex digest."""
    path = Path(path)
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name in sorted(members):
                data = members[name]
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                ti.mtime = TAR_MTIME
                ti.mode = 0o644
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                ti.type = tarfile.REGTYPE
                tar.addfile(ti, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())
    return sha256_file(path)


def write_unit(out_dir: Path, name: str, members: dict[str, bytes], marker: dict) -> dict:
    """Write ``<name>.tar`` atomically, then its done-marker ``<name>.done.json``.
    ``marker`` holds the caller's fields; ``sha256``, ``file`` and ``bytes`` are added.
    Returns the marker written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{name}.tar"
    done = out_dir / f"{name}.done.json"
    done.unlink(missing_ok=True)  # a stale marker must never vouch for a new tar
    tmp = out_dir / f"{name}.tar.tmp{os.getpid()}"
    try:
        digest = write_tar(tmp, members)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    out = dict(marker, sha256=digest, file=final.name, bytes=final.stat().st_size)
    write_json_atomic(done, out)
    return out


def write_shard(shard_dir: Path, shard: int, members: dict[str, bytes], marker: dict) -> dict:
    """Write one shard atomically, then its done-marker (see :func:`write_unit`)."""
    return write_unit(shard_dir, shard_name(shard), members, dict(marker, shard=shard))


def finished_unit(out_dir: Path, name: str, expect: dict, *, verify_hash: bool = True) -> dict | None:
    """The done-marker of ``<name>.tar`` if it is finished and current, else None.

    Finished = marker present, tar present with the marker's size and sha256, and every key
    in ``expect`` (e.g. plan hash, count) equal to the marker's value. ``verify_hash=False``
    skips reading the tar (a cheap poll of other workers' progress)."""
    done = Path(out_dir) / f"{name}.done.json"
    tar = Path(out_dir) / f"{name}.tar"
    if not done.is_file() or not tar.is_file():
        return None
    try:
        m = json.loads(done.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(m, dict) or any(m.get(k) != v for k, v in expect.items()):
        return None
    if tar.stat().st_size != m.get("bytes"):
        return None
    if verify_hash and sha256_file(tar) != m.get("sha256"):
        return None
    return m


def finished_marker(shard_dir: Path, shard: int, expect: dict, *, verify_hash: bool = True) -> dict | None:
    """The shard's done-marker if the shard is finished and current, else None."""
    return finished_unit(shard_dir, shard_name(shard), expect, verify_hash=verify_hash)


def clear_unit(out_dir: Path, name: str) -> None:
    """Remove leftovers of an interrupted unit (temp tars, a tar without marker)."""
    d = Path(out_dir)
    if not d.is_dir():
        return
    for p in d.glob(f"{name}.tar.tmp*"):
        p.unlink(missing_ok=True)
    (d / f"{name}.done.json").unlink(missing_ok=True)
    (d / f"{name}.tar").unlink(missing_ok=True)


def clear_partial(shard_dir: Path, shard: int) -> None:
    """Remove leftovers of an interrupted shard (temp tars, a tar without marker)."""
    clear_unit(shard_dir, shard_name(shard))


#: names of temp files: ``x.tmp123``, ``x.tar.tmp123``, ``x.json.tmp123``, ``x.tmp123.tiff``, ``.x.parquet.tmp123``
_TEMP = re.compile(r"\.tmp\d*(\.[A-Za-z0-9]+)?$")


def is_temp_name(name: str) -> bool:
    return bool(_TEMP.search(name))


def sweep_temp(root: Path) -> list[str]:
    """Delete the temp files (of writers killed mid-write) under ``root``; returns their
    paths relative to ``root``. Call only when no writer is still active there."""
    root = Path(root)
    gone = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and is_temp_name(p.name):
            p.unlink(missing_ok=True)
            gone.append(str(p.relative_to(root)))
    return gone
