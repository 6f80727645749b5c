"""Nested tile geometry: which tiles a slide yields at each level.

A level-L tile covers ``size0_L = tile_px * mpp_L / slide_mpp`` level-0 pixels. To make
children nest *exactly* (a ratio x ratio grid inside the parent, no gaps, no overlap),
the finest level's footprint is rounded to whole level-0 pixels and every coarser level is
that times the product of the level ratios. The nominal mpp of a level is kept as its
label; the effective one differs by at most half a level-0 pixel per finest tile.

Coarsest tiles lie on a grid from the slide's origin and must fit inside the slide. A tile
is kept when its tissue fraction reaches ``min_tissue_fraction`` and it passes the label
rule; a finer tile is considered only inside a kept parent and must belong to the same
patient, so every kept tile's parent is kept too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


class TilingError(ValueError):
    """The recipe's levels do not fit a slide."""


def level_sizes(levels: list[float], tile_px: int, slide_mpp: float, *, where: str = "slide") -> list[int]:
    """Level-0 footprint (pixels) of a tile at each level, coarse to fine, exactly nested."""
    finest = tile_px * levels[-1] / slide_mpp
    if finest < tile_px * 0.98:
        raise TilingError(
            f"{where}: the finest level ({levels[-1]} µm/px) is finer than the slide itself "
            f"({slide_mpp:.4g} µm/px); tiles would be upsampled. Drop that level or use a finer scan"
        )
    sizes = [max(1, int(round(finest)))]
    for coarse, fine in zip(reversed(levels[:-1]), reversed(levels[1:])):
        sizes.insert(0, sizes[0] * int(round(coarse / fine)))
    return sizes


def area_weights(a0: float, a1: float, n: int) -> tuple[int, int, np.ndarray]:
    """Cells ``[i0, i1)`` of a 1-D grid of ``n`` unit cells overlapping ``[a0, a1)``, and the
    length of each overlap."""
    i0 = max(0, int(math.floor(a0)))
    i1 = min(n, int(math.ceil(a1)))
    if i1 <= i0:
        return i0, i0, np.zeros(0)
    idx = np.arange(i0, i1, dtype=np.float64)
    w = np.clip(np.minimum(idx + 1, a1) - np.maximum(idx, a0), 0.0, None)
    return i0, i1, w


def window_shares(grid: np.ndarray, downsample: float, x: float, y: float, size0: float) -> dict[int, float]:
    """Area share of each value of an integer grid inside the level-0 square ``(x, y, size0)``.

    ``grid`` has one cell per ``downsample`` level-0 pixels. Shares are of the whole square
    (parts outside the grid count as no value).
    """
    j0, j1, wx = area_weights(x / downsample, (x + size0) / downsample, grid.shape[1])
    i0, i1, wy = area_weights(y / downsample, (y + size0) / downsample, grid.shape[0])
    total = (size0 / downsample) ** 2
    if wx.size == 0 or wy.size == 0 or total <= 0:
        return {}
    sub = grid[i0:i1, j0:j1].ravel()
    low = int(sub.min())
    sums = np.bincount(sub - low if low else sub, weights=np.outer(wy, wx).ravel())
    return {int(v) + low: float(a) / total for v, a in enumerate(sums) if a > 0}


class AreaTable:
    """Summed-area table of a boolean grid: the exact covered share of any level-0 square
    in O(1), fractional cells included (the integral is bilinear inside each cell, so
    bilinear interpolation of the table is exact)."""

    def __init__(self, mask: np.ndarray, downsample: float):
        h, w = mask.shape
        self.sat = np.zeros((h + 1, w + 1), dtype=np.float64)
        self.sat[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
        self.h, self.w, self.ds = h, w, float(downsample)

    def _integral(self, u: float, v: float) -> float:
        u = min(max(u, 0.0), float(self.w))
        v = min(max(v, 0.0), float(self.h))
        i = min(int(u), self.w - 1)
        j = min(int(v), self.h - 1)
        fu, fv = u - i, v - j
        s = self.sat
        return ((1 - fu) * (1 - fv) * s[j, i] + fu * (1 - fv) * s[j, i + 1]
                + (1 - fu) * fv * s[j + 1, i] + fu * fv * s[j + 1, i + 1])

    def share(self, x: float, y: float, size0: float) -> float:
        u0, v0 = x / self.ds, y / self.ds
        u1, v1 = (x + size0) / self.ds, (y + size0) / self.ds
        area = self._integral(u1, v1) - self._integral(u0, v1) - self._integral(u1, v0) + self._integral(u0, v0)
        return max(0.0, area) / ((size0 / self.ds) ** 2)


def mask_fraction(mask: np.ndarray, downsample: float, x: float, y: float, size0: float) -> float:
    """Share of the level-0 square covered by a boolean mask (one-off; see :class:`AreaTable`)."""
    return window_shares(mask.astype(np.uint8), downsample, x, y, size0).get(1, 0.0)


@dataclass
class TileDecision:
    """What the label rule says about one tile: keep it or not, its label (-1 = none) and
    its case (``None`` = the slide's own patient)."""

    keep: bool
    label: int
    case: str | None


@dataclass
class PlannedTile:
    level: int
    x: int
    y: int
    size0: int
    parent: int | None  # index into the plan list
    tissue_fraction: float
    label: int
    case: str | None


def plan_tiles(
    dims: tuple[int, int],
    sizes: list[int],
    tissue: np.ndarray,
    tissue_downsample: float,
    min_tissue_fraction: float,
    decide: Callable[[int, int, int], TileDecision],
) -> list[PlannedTile]:
    """All kept tiles of a slide, parents before their children."""
    w0, h0 = dims
    tissue = AreaTable(tissue, tissue_downsample)
    out: list[PlannedTile] = []
    s = sizes[0]
    frontier: list[int] = []
    for y in range(0, h0 - s + 1, s):
        for x in range(0, w0 - s + 1, s):
            t = _consider(tissue, min_tissue_fraction, decide, 0, x, y, s, None)
            if t is not None:
                out.append(t)
                frontier.append(len(out) - 1)
    for level in range(1, len(sizes)):
        s = sizes[level]
        ratio = sizes[level - 1] // s
        nxt: list[int] = []
        for pi in frontier:
            p = out[pi]
            for j in range(ratio):
                for i in range(ratio):
                    t = _consider(tissue, min_tissue_fraction, decide, level, p.x + i * s, p.y + j * s, s, pi)
                    if t is not None and t.case == p.case:
                        out.append(t)
                        nxt.append(len(out) - 1)
        frontier = nxt
    return out


def _consider(tissue: AreaTable, min_tissue, decide, level, x, y, s, parent) -> PlannedTile | None:
    frac = tissue.share(x, y, s)
    if frac < min_tissue:
        return None
    d = decide(x, y, s)
    if not d.keep:
        return None
    return PlannedTile(level=level, x=x, y=y, size0=s, parent=parent, tissue_fraction=frac, label=d.label, case=d.case)
