"""Whole-slide synthesis: a layout at the coarsest level, then zoom-in level by level.

Geometry. A slide of ``layout_tiles = (rows, cols)`` is ``rows * tile_px`` by ``cols *
tile_px`` pixels at the coarsest level and ``f`` times that at a level ``f`` times finer
(``f = levels[0] / levels[k]``). Each level is covered by *overlapping* tiles: evenly spaced
positions with at least ``overlap`` (default ``tile_px // 4``) pixels of overlap; large
levels need about (4/3)^2 = 1.8x as many tiles as a plain grid at the default overlap,
(8/7)^2 = 1.3x at ``tile_px // 8``. Tiles are generated in raster
order of dependency: a tile's window usually overlaps its left, top-left, top and top-right
neighbours, and whatever of its window is already generated is handed to the model as
known pixels (``cond.known`` / ``cond.mask``). Those are the strips along its top and left
edges, the same border strips the model saw in training, so each tile continues its
neighbours instead of meeting them at a seam (URCDM's inpainting, done by the one model).

Batching. Tiles whose windows do not overlap any tile still pending before them are
independent; the tiles of one dependency "wave" (for regular grids the anti-diagonals
``2 * row + col``) go through the model together, across all slides being made, up to
``batch_size`` at a time.

Levels. The coarsest level starts from pure noise at t = 1 with no parent. Each finer tile
gets the parent level's crop under it, upsampled (bicubic, as the tile store does), as the
parent condition, and starts from that crop noised to ``sampler.zoom_start``
(ZoomLDM's zoom from an intermediate timestep), with ``ceil(steps * zoom_start)`` solver
steps so the step size matches the layout's.

Seeds. Tile (level, row, col) of a slide with seed ``s`` on attempt ``a`` starts from noise
seeded by ``derive_seed("tile", s, level, row, col, a)``, so a slide is reproducible from its
seed, whatever else shares its batches.

Release filter. ``tile_filter(images in [-1,1] [N,3,H,W], level) -> bool [N]`` flags
near-copies of training tiles; a flagged tile is regenerated with the next attempt's seed,
before anything depends on it, up to ``max_retries`` times, and counted in
``Pyramid.n_filtered``. A tile still flagged after that is an error.

Memory. Only the level being made and its parent are read; finished levels stay in the
returned :class:`Pyramid`. Pass ``workdir`` to keep levels as ``numpy`` memory maps on disk
(for large slides), so RAM holds only the tiles in flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..models.conditioning import Cond
from ..models.samplers import derive_seed, get_sampler, initial_noise, zoom_start
from ..models.unet import unwrap
from ..pipeline import StageError
from ..recipe import SamplerConfig

TileFilter = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class Pyramid:
    """A synthetic slide: ``levels`` are uint8 [H,W,3] arrays, coarsest first."""

    levels: list[np.ndarray]
    mpp: list[float]
    tile_px: int
    seed: int
    label: int | None
    n_filtered: int = 0
    tiles_per_level: list[int] = field(default_factory=list)
    overlap: int | None = None  # minimum tile overlap used (default tile_px // 4)
    inpaint_seams: bool = True  # False: tiles ignored their neighbours and overwrote the overlap

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [tuple(a.shape[:2]) for a in self.levels]


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


def _to_unit(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return t.movedim(-1, -3).float() / 127.5 - 1.0


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N,3,H,W] in [-1, 1] -> uint8 [N,H,W,3]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _parent_crop(parent: np.ndarray, y: int, x: int, tile_px: int, f: int) -> np.ndarray:
    """The part of the parent level under the tile at (y, x) of a level ``f`` times finer,
    upsampled bicubically to ``tile_px`` (PIL's box resize, as the tile store's crops)."""
    box = (x / f, y / f, (x + tile_px) / f, (y + tile_px) / f)
    return np.asarray(Image.fromarray(np.asarray(parent)).resize((tile_px, tile_px), Image.BICUBIC, box=box))


def _label_index(label: int | None, num_classes: int) -> int:
    if label is None or int(label) < 0:
        return num_classes
    if int(label) > num_classes:
        raise StageError(f"label {label} is outside the model's {num_classes} classes (0..{num_classes - 1})")
    return int(label)


class _Slide:
    """One slide in flight: its seed, label and the current/parent level canvases."""

    def __init__(self, label: int | None, seed: int, num_classes: int):
        self.label = label
        self.label_index = _label_index(label, num_classes)
        self.seed = int(seed)
        self.levels: list[np.ndarray] = []
        self.done: np.ndarray | None = None
        self.n_filtered = 0


def _new_canvas(shape: tuple[int, int], workdir: Path | None, name: str) -> np.ndarray:
    if workdir is None:
        return np.zeros((*shape, 3), dtype=np.uint8)
    workdir.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(workdir / f"{name}.npy", mode="w+", dtype=np.uint8, shape=(*shape, 3))


def synthesize_slides(
    model: torch.nn.Module,
    labels: Sequence[int | None],
    layout_tiles: tuple[int, int],
    levels: Sequence[float],
    seeds: Sequence[int],
    *,
    sampler: SamplerConfig | None = None,
    tile_filter: TileFilter | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 16,
    max_retries: int = 8,
    workdir: str | Path | None = None,
    overlap: int | None = None,
    inpaint_seams: bool = True,
) -> list[Pyramid]:
    """Synthesise several slides at once (their tiles share batches); one Pyramid each.

    ``inpaint_seams=False`` gives each tile no known pixels (its neighbours are ignored and
    it simply overwrites the overlap): the ablation that shows what seam inpainting buys."""
    if len(labels) != len(seeds):
        raise ValueError(f"got {len(labels)} labels but {len(seeds)} seeds")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rows, cols = (int(v) for v in layout_tiles)
    if rows < 1 or cols < 1:
        raise StageError(f"layout_tiles must be two positive counts (rows, cols), got {tuple(layout_tiles)}")
    cfg = sampler if sampler is not None else SamplerConfig()
    solve = get_sampler(cfg.name)
    net = unwrap(model)
    px = int(net.config["tile_px"])
    num_classes = int(net.config["num_classes"])
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    factors = zoom_factors(levels)
    wd = Path(workdir) if workdir is not None else None
    slides = [_Slide(lab, sd, num_classes) for lab, sd in zip(labels, seeds)]
    overlap = px // 4 if overlap is None else int(overlap)
    if not 0 < overlap <= px // 2:
        raise ValueError(f"overlap must be in 1..tile_px/2 ({px // 2}), got {overlap}")
    tiles_per_level = []

    for k, mpp in enumerate(levels):
        h, w = rows * px * factors[k], cols * px * factors[k]
        ys, xs = tile_positions(h, px, overlap), tile_positions(w, px, overlap)
        tiles_per_level.append(len(ys) * len(xs))
        for n, sl in enumerate(slides):
            sl.levels.append(_new_canvas((h, w), wd, f"slide{n}_seed{sl.seed}_L{k}"))
            sl.done = np.zeros((len(ys), len(xs)), dtype=bool)  # finished tiles
        f = factors[k] // factors[k - 1] if k else 1
        t_start = 1.0 if k == 0 else float(cfg.zoom_start)
        steps = cfg.steps if k == 0 else max(1, math.ceil(cfg.steps * t_start))
        for wave in dependency_waves(ys, xs, px):
            tasks = [(s, i, j) for s in range(len(slides)) for (i, j) in wave]
            for c0 in range(0, len(tasks), batch_size):
                pending = [(s, i, j, 0) for (s, i, j) in tasks[c0:c0 + batch_size]]
                while pending:
                    imgs = _generate(model, slides, pending, k, mpp, ys, xs, px, f, t_start, steps, cfg, solve, dev,
                                     num_classes, inpaint_seams)
                    flags = _flags(tile_filter, imgs, k)
                    retry = []
                    for (s, i, j, a), img, bad in zip(pending, _to_uint8(imgs), flags):
                        sl = slides[s]
                        if bad:
                            sl.n_filtered += 1
                            if a + 1 > max_retries:
                                raise StageError(
                                    f"slide seed {sl.seed}: tile (row {i}, col {j}) of level {k} ({mpp} µm/px) is still "
                                    f"flagged as a near-copy of a training tile after {a + 1} attempts "
                                    f"(max_retries = {max_retries}); the model reproduces training data"
                                )
                            retry.append((s, i, j, a + 1))
                            continue
                        y, x = ys[i], xs[j]
                        sl.levels[k][y:y + px, x:x + px] = img
                        sl.done[i, j] = True
                    pending = retry
        for sl in slides:
            if isinstance(sl.levels[k], np.memmap):
                sl.levels[k].flush()
    return [
        Pyramid(levels=sl.levels, mpp=[float(m) for m in levels], tile_px=px, seed=sl.seed, label=sl.label,
                n_filtered=sl.n_filtered, tiles_per_level=list(tiles_per_level), overlap=overlap,
                inpaint_seams=inpaint_seams)
        for sl in slides
    ]


def synthesize_slide(
    model: torch.nn.Module,
    label: int | None,
    layout_tiles: tuple[int, int],
    levels: Sequence[float],
    seed: int,
    *,
    sampler: SamplerConfig | None = None,
    tile_filter: TileFilter | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 16,
    max_retries: int = 8,
    workdir: str | Path | None = None,
    overlap: int | None = None,
    inpaint_seams: bool = True,
) -> Pyramid:
    """Synthesise one slide of class ``label`` (None or -1: unconditional) from ``seed``."""
    return synthesize_slides(
        model, [label], layout_tiles, levels, [seed], sampler=sampler, tile_filter=tile_filter,
        device=device, batch_size=batch_size, max_retries=max_retries, workdir=workdir, overlap=overlap,
        inpaint_seams=inpaint_seams,
    )[0]


def _flags(tile_filter: TileFilter | None, imgs: torch.Tensor, level: int) -> list[bool]:
    if tile_filter is None:
        return [False] * imgs.shape[0]
    with torch.no_grad():
        out = torch.as_tensor(tile_filter(imgs, level)).reshape(-1)
    if out.shape[0] != imgs.shape[0]:
        raise StageError(f"tile_filter returned {out.shape[0]} flags for {imgs.shape[0]} tiles at level {level}")
    return [bool(v) for v in out.tolist()]


def _generate(model, slides, pending, k, mpp, ys, xs, px, f, t_start, steps, cfg, solve, dev, num_classes,
              inpaint_seams: bool = True) -> torch.Tensor:
    """Sample the tiles ``pending`` = [(slide, row, col, attempt)] of level ``k`` in one batch."""
    b = len(pending)
    known = np.zeros((b, px, px, 3), dtype=np.uint8)
    mask = np.zeros((b, px, px), dtype=np.float32)
    parent = np.zeros((b, px, px, 3), dtype=np.uint8)
    seeds = []
    for n, (s, i, j, a) in enumerate(pending):
        sl = slides[s]
        y, x = ys[i], xs[j]
        known[n] = sl.levels[k][y:y + px, x:x + px]
        if inpaint_seams:
            mask[n] = known_mask(sl.done, i, j, ys, xs, px)
        if k:
            parent[n] = _parent_crop(sl.levels[k - 1], y, x, px, f)
        seeds.append(derive_seed("tile", sl.seed, k, i, j, a))
    mask_t = torch.from_numpy(mask).to(dev)[:, None]
    known_t = _to_unit(known, dev) * mask_t
    parent_t = _to_unit(parent, dev) if k else torch.zeros(b, 3, px, px, device=dev)
    cond = Cond(
        log_mpp=torch.full((b,), math.log(mpp), device=dev),
        label=torch.tensor([slides[s].label_index for (s, _, _, _) in pending], dtype=torch.long, device=dev),
        parent=parent_t,
        has_parent=torch.full((b,), bool(k), dtype=torch.bool, device=dev),
        known=known_t,
        mask=mask_t,
        num_classes=num_classes,
    )
    if k == 0:
        x_init = initial_noise((b, 3, px, px), seeds, dev)
    else:
        x_init = zoom_start(parent_t, t_start, seeds, model=model, known=known_t, mask=mask_t)
    return solve(model, x_init, cond, steps=steps, guidance=float(cfg.guidance_scale), t_start=t_start)


__all__ = ["Pyramid", "synthesize_slide", "synthesize_slides", "tile_positions", "dependency_waves", "known_mask", "zoom_factors"]
