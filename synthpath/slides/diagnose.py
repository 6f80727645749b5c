"""Why a slide file cannot be used, in terms of the file itself.

- :func:`tiff_damage`: a TIFF-based file (SVS, generic TIFF, BigTIFF) that was cut short
  (an interrupted copy or download) has image directories or image data past its end;
  OpenSlide then says only "Unsupported or missing image file" and a plain-image reader may
  still decode its first page, so the truncation is found here by walking the directory
  chain and the pages' data extents.
- :func:`resolution_facts`: what the file says about its resolution, for the message when
  no source gives a usable µm/px (e.g. ``XResolution = 1`` with unit ``none``).
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Mapping

#: Over 4 GiB, classic-TIFF offsets wrap (NDPI files do this on purpose): not checked.
_CLASSIC_LIMIT = 1 << 32


def tiff_damage(path: Path | str) -> str | None:
    """A sentence saying where a TIFF-based file is truncated, or None (intact, or not a TIFF)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError:
        return None
    with f:
        head = f.read(16)
        if len(head) < 8 or head[:2] not in (b"II", b"MM"):
            return None
        e = "<" if head[:2] == b"II" else ">"
        magic = struct.unpack(e + "H", head[2:4])[0]
        if magic == 42:
            if size >= _CLASSIC_LIMIT:
                return None
            off = struct.unpack(e + "I", head[4:8])[0]
            cnt, cnt_n, ent_n, nxt, nxt_n = e + "H", 2, 12, e + "I", 4
        elif magic == 43:
            if len(head) < 16:
                return f"the BigTIFF header is cut short ({size} bytes)"
            off = struct.unpack(e + "Q", head[8:16])[0]
            cnt, cnt_n, ent_n, nxt, nxt_n = e + "Q", 8, 20, e + "Q", 8
        else:
            return None
        seen: set[int] = set()
        n = 0
        while off:
            if off in seen or n > 100_000:
                return f"its image directories form a loop at directory {n}"
            seen.add(off)
            if off + cnt_n > size:
                return f"image directory {n} should start at byte {off}, past the end of the {size}-byte file"
            f.seek(off)
            count = struct.unpack(cnt, f.read(cnt_n))[0]
            end = off + cnt_n + count * ent_n + nxt_n
            if end > size:
                return f"image directory {n} (bytes {off}-{end}) runs past the end of the {size}-byte file"
            f.seek(end - nxt_n)
            off = struct.unpack(nxt, f.read(nxt_n))[0]
            n += 1
    try:
        import tifffile

        quiet = logging.getLogger("tifffile")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            with tifffile.TiffFile(path) as tf:
                for i, page in enumerate(tf.pages):
                    pairs = [(o, c) for o, c in zip(page.dataoffsets or (), page.databytecounts or ()) if c]
                    if pairs:
                        last = max(o + c for o, c in pairs)
                        if last > size:
                            return (f"the image data of directory {i} ends at byte {last}, past the end of the "
                                    f"{size}-byte file")
        finally:
            quiet.setLevel(level)
    except Exception:  # a layout tifffile cannot parse is OpenSlide's to judge
        return None
    return None


def resolution_facts(props: Mapping[str, str], path: Path | str) -> str:
    """What the file records about its resolution, in one clause."""
    facts = []
    mx = props.get("openslide.mpp-x")
    facts.append("no openslide.mpp-x" if mx is None else f"openslide.mpp-x = {mx!r} (not a positive number)")
    xres, unit = props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit")
    if xres is None and unit is None and Path(path).suffix.lower() in (".tif", ".tiff"):
        from .mpp import _tifffile_raw

        xres, unit = _tifffile_raw(Path(path))
    if xres is None:
        facts.append("no TIFF XResolution")
    else:
        from .mpp import _UM_PER_UNIT, _positive

        u = "no ResolutionUnit" if unit is None else f"ResolutionUnit {str(unit).lower()!r}"
        if unit is None or str(unit).strip().lower() in ("none", "1"):
            meaning = " (no physical unit, so it says nothing about size)"
        elif str(unit).strip().lower() not in _UM_PER_UNIT:
            meaning = " (not a unit of length)"
        elif _positive(xres) is None:
            meaning = " (not a positive number)"
        else:
            meaning = ""
        facts.append(f"TIFF XResolution = {xres} with {u}{meaning}")
    op = props.get("openslide.objective-power")
    facts.append("no openslide.objective-power" if op is None else f"openslide.objective-power = {op!r} (unusable)")
    return ", ".join(facts)


__all__ = ["tiff_damage", "resolution_facts"]
