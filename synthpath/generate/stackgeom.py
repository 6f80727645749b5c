"""Where the stacks of a synthetic slide can lie: pure geometry for the generation plan.

``slides`` mode cuts a slide into the plain grid of non-overlapping tiles, and a stack is
one tile per level, nested (:func:`decode_stack`). ``stacks`` mode places each tile of a
stack on one of synthesis's overlapping tile windows, nested inside the window above with
the bicubic margin to spare (:func:`axis_chains`), so generating a stack makes exactly its
own tiles.
"""

from __future__ import annotations

from ..pipeline import StageError
from .tiling import PARENT_MARGIN, level_grids


def window_overlap(tile_px: int) -> int:
    """The minimum overlap of synthesis's tile windows (its default, ``tile_px // 4``)."""
    return max(1, tile_px // 4)


def window_grids(layout: tuple[int, int], levels: list[float], tile_px: int, overlap: int) -> list[tuple[list[int], list[int]]]:
    """(ys, xs): the origins of synthesis's tile windows at each level (the same evenly
    spaced, overlapping windows :func:`synthpath.generate.synthesis.synthesize_slides` uses
    with this ``overlap``)."""
    return level_grids(tuple(layout), levels, tile_px, overlap)


def axis_chains(pos: list[list[int]], factors: list[int], tile_px: int, margin: int) -> list[tuple[int, ...]]:
    """Every nested chain of window indices along one axis, coarsest first: the window at
    level k+1 lies inside the footprint of the one at level k, with ``margin`` px (at the
    coarser level) to spare for the bicubic parent crop where the windows allow it, so a
    stack needs no tile beyond its own at each level (plus what synthesis adds for seams)."""
    chains = [(i,) for i in range(len(pos[0]))]
    for k, f in enumerate(factors):
        parent, child = pos[k], pos[k + 1]
        size = parent[-1] + tile_px
        nxt = []
        for ch in chains:
            lo, hi = parent[ch[-1]], parent[ch[-1]] + tile_px
            inside = [j for j, c in enumerate(child) if lo <= c // f and -(-(c + tile_px) // f) <= hi]
            snug = [j for j in inside if lo <= max(0, child[j] // f - margin)
                    and min(size, -(-(child[j] + tile_px) // f) + margin) <= hi]
            for j in snug or inside:
                nxt.append((*ch, j))
        chains = nxt
    if not chains:
        raise StageError("no window of a finer level fits inside a window of the level above; "
                         "check the levels and tile size")
    return chains


def stacks_in_slide(layout: tuple[int, int], factors: list[int]) -> int:
    n = layout[0] * layout[1]
    for f in factors:
        n *= f * f
    return n


def decode_stack(code: int, layout: tuple[int, int], factors: list[int]) -> list[tuple[int, int]]:
    """Stack number -> (row, col) in each level's tile grid, coarsest first.

    ``factors[k]`` is the zoom between level k and k+1 (tiles per side of a parent)."""
    sub = []
    for f in reversed(factors):
        code, r = divmod(code, f * f)
        sub.append(divmod(r, f))
    sub.reverse()
    row, col = divmod(code, layout[1])
    out = [(row, col)]
    for f, (dr, dc) in zip(factors, sub):
        row, col = row * f + dr, col * f + dc
        out.append((row, col))
    return out


__all__ = ["PARENT_MARGIN", "window_overlap", "window_grids", "axis_chains", "stacks_in_slide", "decode_stack"]
