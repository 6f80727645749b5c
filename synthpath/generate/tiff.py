"""Write a synthetic slide as a pyramidal tiled TIFF that OpenSlide (and QuPath) open.

Layout: one tiled RGB page per level, finest first, X/YResolution in pixels per centimetre,
and an Aperio-style ImageDescription on the first page (``Aperio Image Library ...|AppMag =
20|MPP = 0.5|...``), so OpenSlide reads the file as ``aperio`` and reports
``openslide.objective-power`` as well as ``openslide.mpp-x`` / ``mpp-y``.

Levels: every power-of-two downsample of the finest level, from 1 down to the first level
that fits in one TIFF tile. A downsample the pyramid has (a synthesised level) is written as
made; one it lacks (between levels 4x apart, or below the coarsest) is the 2x2 box average of
the next finer level, computed in bands of rows so a memory-mapped 40k px level streams.

Compression: ``"zlib"`` (deflate, lossless, default) or ``"jpeg"`` (``jpeg_quality``,
as scanners write; needs the ``imagecodecs`` package). Written to a temporary name and
renamed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile

from ..units import mpp_to_objective

if TYPE_CHECKING:
    from .synthesis import Pyramid

COMPRESSIONS = ("zlib", "jpeg")


def _tile_side(tile_px: int, shapes: list[tuple[int, int]]) -> int:
    """256, or a smaller multiple of 16 when the whole slide is small (TIFF tiles are multiples of 16)."""
    largest = max(max(s) for s in shapes)
    side = 256
    while side > 16 and side // 2 >= largest:
        side //= 2
    return side


def half(a: np.ndarray, band: int = 2048) -> np.ndarray:
    """2x2 box average (rounded) of a uint8 [H,W,3] image, in bands of rows (odd edges dropped)."""
    h, w = a.shape[0] // 2, a.shape[1] // 2
    out = np.empty((h, w, 3), dtype=np.uint8)
    for y in range(0, h, band):
        blk = np.asarray(a[2 * y:2 * min(h, y + band), :2 * w], dtype=np.uint16)
        s = blk[0::2, 0::2] + blk[1::2, 0::2] + blk[0::2, 1::2] + blk[1::2, 1::2]
        out[y:y + s.shape[0]] = ((s + 2) // 4).astype(np.uint8)
    return out


def pyramid_pages(levels: list[np.ndarray], mpp: list[float], tile: int) -> list[tuple[np.ndarray, float, bool]]:
    """``(image, mpp, synthesised)`` for each page, finest first: every 2x downsample of the
    finest level down to one tile, synthesised levels where the pyramid has them."""
    order = sorted(range(len(levels)), key=lambda k: mpp[k])
    fine = float(mpp[order[0]])
    by_ds = {}
    for k in order:
        ds = float(mpp[k]) / fine
        n = int(round(np.log2(ds)))
        if abs(2.0 ** n - ds) > 1e-6 * ds:
            raise ValueError(f"level {k} ({mpp[k]} µm/px) is not a power-of-two downsample of the finest ({fine} µm/px)")
        by_ds[n] = levels[k]
    pages = []
    n, cur = 0, by_ds[0]
    while True:
        pages.append((cur, fine * 2.0 ** n, n in by_ds))
        if max(cur.shape[:2]) <= tile and n >= max(by_ds):
            return pages
        n += 1
        cur = by_ds[n] if n in by_ds else half(cur)
        if min(cur.shape[:2]) < 1:
            return pages


def write_pyramid_tiff(pyramid: "Pyramid", path: str | Path, *, compression: str = "zlib",
                       jpeg_quality: int = 90) -> Path:
    """Write ``pyramid`` (levels coarsest first, with ``mpp``) as a pyramidal TIFF at ``path``."""
    path = Path(path)
    levels = list(pyramid.levels)
    if not levels:
        raise ValueError("the pyramid has no levels")
    if len(pyramid.mpp) != len(levels):
        raise ValueError(f"the pyramid has {len(levels)} levels but {len(pyramid.mpp)} mpp values")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    for k, a in enumerate(levels):
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"pyramid level {k} must be uint8 [H,W,3], got {a.dtype} {a.shape}")
    tile = _tile_side(pyramid.tile_px, [a.shape[:2] for a in levels])
    pages = pyramid_pages(levels, [float(m) for m in pyramid.mpp], tile)
    h0, w0 = pages[0][0].shape[:2]
    mpp0 = pages[0][1]
    desc = (f"Aperio Image Library (synthpath synthetic slide)\r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) "
            f"{compression.upper()}{f' Q={int(jpeg_quality)}' if compression == 'jpeg' else ''}"
            f"|AppMag = {mpp_to_objective(mpp0):g}|MPP = {mpp0:g}|Title = synthetic slide seed {pyramid.seed}"
            f"|Seed = {pyramid.seed}|Label = {pyramid.label}|Synthetic = true")
    extra = {"compressionargs": {"level": int(jpeg_quality)}} if compression == "jpeg" else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=sum(p[0].nbytes for p in pages) > 2**31) as tif:
            for n, (img, m, _) in enumerate(pages):
                px_per_cm = 1e4 / float(m)
                tif.write(img, photometric="rgb", tile=(tile, tile), compression=compression,
                          resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                          subfiletype=0 if n == 0 else 1, description=desc if n == 0 else None,
                          metadata=None, **extra)
        os.replace(tmp, path)
    except KeyError as e:
        if compression == "jpeg" and "imagecodecs" in str(e):
            raise ValueError("TIFF compression 'jpeg' needs the imagecodecs package (pip install imagecodecs)") from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


__all__ = ["write_pyramid_tiff", "pyramid_pages", "half", "COMPRESSIONS"]
