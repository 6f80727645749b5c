"""Tile geometry of whole-slide synthesis: where tiles sit on each level, which finished
tiles a tile sees, the dependency waves, and which tiles a set of target boxes needs.

A level of ``H x W`` px is covered by evenly spaced, overlapping ``tile_px`` windows
(:func:`tile_positions`); :func:`level_grids` gives every level's positions for a layout.
:func:`needed_tiles` is the dependency closure used by ``synthesize_slides(targets=...)``:
the tiles that must be generated so that every pixel of the target boxes is final.
"""

from __future__ import annotations

import bisect
import math
from typing import Iterable, Sequence

import numpy as np

from ..pipeline import StageError

#: parent-level pixels of margin around a tile's footprint for the bicubic parent crop
#: (PIL's bicubic upsampling reads 2 px either side; one more for rounding)
PARENT_MARGIN = 3

Box = tuple[int, int, int, int, int]  # (level, y0, x0, y1, x1), half-open, in that level's pixels


def tile_positions(length: int, tile_px: int, min_overlap: int) -> list[int]:
    """Evenly spaced tile origins covering ``[0, length)`` with at least ``min_overlap`` px of
    overlap between neighbours (first at 0, last at ``length - tile_px``)."""
    if length < tile_px:
        raise ValueError(f"a level of {length} px is smaller than one {tile_px}-px tile")
    if length == tile_px:
        return [0]
    stride = tile_px - min_overlap
    n = max(2, math.ceil((length - min_overlap) / stride))
    return [round(i * (length - tile_px) / (n - 1)) for i in range(n)]


def _reach(pos: list[int], tile_px: int) -> int:
    """How many tile indices away a tile's window can still overlap (given the positions)."""
    gap = min((b - a for a, b in zip(pos, pos[1:])), default=tile_px)
    return max(1, math.ceil(tile_px / max(1, gap)))


def known_mask(done: np.ndarray, i: int, j: int, ys: list[int], xs: list[int], tile_px: int) -> np.ndarray:
    """float32 [px, px]: the part of tile (i, j)'s window already covered by finished tiles
    (``done`` is a bool [rows, cols] grid of finished tiles)."""
    m = np.zeros((tile_px, tile_px), dtype=np.float32)
    ry, rx = _reach(ys, tile_px), _reach(xs, tile_px)
    y, x = ys[i], xs[j]
    for i2 in range(max(0, i - ry), min(len(ys), i + ry + 1)):
        dy = ys[i2] - y
        if abs(dy) >= tile_px:
            continue
        for j2 in range(max(0, j - rx), min(len(xs), j + rx + 1)):
            dx = xs[j2] - x
            if (i2, j2) == (i, j) or abs(dx) >= tile_px or not done[i2, j2]:
                continue
            m[max(0, dy):min(tile_px, dy + tile_px), max(0, dx):min(tile_px, dx + tile_px)] = 1.0
    return m


def dependency_waves(ys: list[int], xs: list[int], tile_px: int) -> list[list[tuple[int, int]]]:
    """Group the tiles (row, col) into waves: a tile comes after every earlier (raster order)
    tile whose window overlaps its own; tiles in one wave never overlap each other."""
    reach_y, reach_x = _reach(ys, tile_px), _reach(xs, tile_px)
    wave: dict[tuple[int, int], int] = {}
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            w = 0
            for i2 in range(max(0, i - reach_y), i + 1):
                for j2 in range(max(0, j - reach_x), min(len(xs), j + reach_x + 1)):
                    if (i2, j2) >= (i, j):
                        continue
                    if abs(ys[i2] - y) < tile_px and abs(xs[j2] - x) < tile_px:
                        w = max(w, wave[(i2, j2)] + 1)
            wave[(i, j)] = w
    out: list[list[tuple[int, int]]] = [[] for _ in range(max(wave.values()) + 1)]
    for ij, w in wave.items():
        out[w].append(ij)
    return out


def zoom_factors(levels: Sequence[float]) -> list[int]:
    """How many pixels of level k span one pixel of level 0, per side (1 for level 0)."""
    out = []
    for k, m in enumerate(levels):
        r = levels[0] / m
        f = int(round(r))
        if abs(r - f) > 1e-6 or f < 1 or (k and f % out[-1]):
            raise StageError(f"levels {list(levels)}: level {k} ({m} µm/px) is not an integer zoom of the level above")
        out.append(f)
    return out


def level_grids(layout_tiles: tuple[int, int], levels: Sequence[float], tile_px: int,
                overlap: int) -> list[tuple[list[int], list[int]]]:
    """``(ys, xs)`` tile origins of every level of a slide of ``layout_tiles`` coarsest tiles."""
    factors = zoom_factors(levels)
    rows, cols = (int(v) for v in layout_tiles)
    return [(tile_positions(rows * tile_px * f, tile_px, overlap), tile_positions(cols * tile_px * f, tile_px, overlap))
            for f in factors]


def cover(pos: list[int], tile_px: int, a: int, b: int) -> list[int]:
    """Fewest tile indices along one axis whose windows ``[p, p + tile_px)`` cover ``[a, b)``
    (greedy: each next window is the last one that starts at or before the first uncovered px)."""
    if not 0 <= a < b <= pos[-1] + tile_px:
        raise ValueError(f"interval [{a}, {b}) is outside the level [0, {pos[-1] + tile_px})")
    out, cur = [], a
    while cur < b:
        i = bisect.bisect_right(pos, cur) - 1
        if out and i == out[-1]:  # cannot happen with overlapping windows; guards a bad grid
            raise ValueError(f"tile positions {pos} leave a gap at {cur}")
        out.append(i)
        cur = pos[i] + tile_px
    return out


def needed_tiles(boxes: Iterable[Box], grids: list[tuple[list[int], list[int]]], factors: list[int],
                 tile_px: int, margin: int = PARENT_MARGIN) -> list[set[tuple[int, int]]]:
    """The dependency closure of target boxes: per level, the tiles (row, col) to generate.

    - every pixel of a box at level k lies in a generated tile of level k (a minimal cover);
    - every generated tile of level k > 0 has its parent crop final: its footprint on level
      k-1, plus ``margin`` px, is itself a box there (and so on up to the coarsest level).
    Neighbour context comes with it: tiles of the closure that overlap see each other's
    pixels as known pixels, so the seams inside the boxes are inpainted as in a whole slide.
    A box of one whole tile window needs exactly that tile (plus the parent tiles it sits in).
    """
    n_lv = len(grids)
    per_level: list[list[tuple[int, int, int, int]]] = [[] for _ in range(n_lv)]
    for box in boxes:
        if len(box) != 5:
            raise ValueError(f"a target box is (level, y0, x0, y1, x1), got {box!r}")
        k, y0, x0, y1, x1 = (int(v) for v in box)
        if not 0 <= k < n_lv:
            raise ValueError(f"target box {box!r}: level {k} is not one of the {n_lv} levels")
        ys, xs = grids[k]
        h, w = ys[-1] + tile_px, xs[-1] + tile_px
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            raise ValueError(f"target box {box!r} is outside level {k} ({h} x {w} px) or empty")
        per_level[k].append((y0, x0, y1, x1))
    need: list[set[tuple[int, int]]] = [set() for _ in range(n_lv)]
    for k in range(n_lv - 1, -1, -1):
        ys, xs = grids[k]
        for (y0, x0, y1, x1) in per_level[k]:
            for i in cover(ys, tile_px, y0, y1):
                for j in cover(xs, tile_px, x0, x1):
                    need[k].add((i, j))
        if k == 0:
            break
        f = factors[k] // factors[k - 1]
        ph, pw = grids[k - 1][0][-1] + tile_px, grids[k - 1][1][-1] + tile_px
        for (i, j) in need[k]:
            y, x = ys[i], xs[j]
            per_level[k - 1].append((max(0, y // f - margin), max(0, x // f - margin),
                                     min(ph, -(-(y + tile_px) // f) + margin), min(pw, -(-(x + tile_px) // f) + margin)))
    return need


def all_tiles(grids: list[tuple[list[int], list[int]]]) -> list[set[tuple[int, int]]]:
    return [{(i, j) for i in range(len(ys)) for j in range(len(xs))} for ys, xs in grids]


__all__ = ["tile_positions", "known_mask", "dependency_waves", "zoom_factors", "level_grids", "cover",
           "needed_tiles", "all_tiles", "PARENT_MARGIN", "Box"]
