"""Write a synthetic slide as a pyramidal tiled TIFF that OpenSlide (and QuPath) open.

Layout: one tiled RGB page per level, finest first (OpenSlide's "generic tiled TIFF":
level 0 is the first directory, each later directory a downsample), deflate-compressed,
with X/YResolution in pixels per centimetre so OpenSlide reports ``openslide.mpp-x`` /
``openslide.mpp-y``. The pyramid's levels are exact integer downsamples of each other, so
OpenSlide's level downsamples come out exact. Written to a temporary name and renamed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile

if TYPE_CHECKING:
    from .synthesis import Pyramid


def _tile_side(tile_px: int, shapes: list[tuple[int, int]]) -> int:
    """256, or a smaller multiple of 16 when the whole slide is small (TIFF tiles are multiples of 16)."""
    largest = max(max(s) for s in shapes)
    side = 256
    while side > 16 and side // 2 >= largest:
        side //= 2
    return side


def write_pyramid_tiff(pyramid: "Pyramid", path: str | Path, *, compression: str = "zlib") -> Path:
    """Write ``pyramid`` (levels coarsest first, with ``mpp``) as a pyramidal TIFF at ``path``."""
    path = Path(path)
    levels = [np.asarray(a) for a in pyramid.levels]
    if not levels:
        raise ValueError("the pyramid has no levels")
    if len(pyramid.mpp) != len(levels):
        raise ValueError(f"the pyramid has {len(levels)} levels but {len(pyramid.mpp)} mpp values")
    for k, a in enumerate(levels):
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"pyramid level {k} must be uint8 [H,W,3], got {a.dtype} {a.shape}")
    order = sorted(range(len(levels)), key=lambda k: pyramid.mpp[k])  # finest (smallest mpp) first
    tile = _tile_side(pyramid.tile_px, [levels[k].shape[:2] for k in order])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=sum(a.nbytes for a in levels) > 2**31) as tif:
            for n, k in enumerate(order):
                px_per_cm = 1e4 / float(pyramid.mpp[k])
                tif.write(
                    levels[k],
                    photometric="rgb",
                    tile=(tile, tile),
                    compression=compression,
                    resolution=(px_per_cm, px_per_cm),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if n == 0 else 1,
                    description=(
                        f"synthpath synthetic slide; seed {pyramid.seed}; label {pyramid.label}; "
                        f"mpp {pyramid.mpp[k]}" if n == 0 else None
                    ),
                    metadata=None,
                )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


__all__ = ["write_pyramid_tiff"]
