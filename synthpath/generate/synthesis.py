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

Seams (``seams``). ``"feather"`` (default): the known pixels go to the model as above, and
the sampler's replacement of its data prediction by them is weighted by a mask that ramps
from 1 to 0 over the ``feather_px`` known pixels next to the new ones, so the tile's own
prediction and its neighbours' pixels are cross-faded instead of meeting at a hard line.
``"inpaint"``: hard replacement (the old default). ``"overwrite"``: no known pixels, the
tile overwrites the overlap (the ablation). ``benchmarks/bench_quality.py`` measures all three.

Targets. ``targets[s]`` lists boxes ``(level, y0, x0, y1, x1)`` (half-open, in that level's
pixels) of slide ``s`` whose pixels must be final; only their dependency closure is generated
(:func:`synthpath.generate.tiling.needed_tiles`: a minimal cover of each box by tile windows,
and, for every tile below the coarsest level, its parent footprint plus a bicubic margin as
a box on the level above). A box that is exactly one tile window (``tiling.level_grids``)
needs exactly that tile. ``targets=None`` (or ``targets[s] = None``) makes the whole slide.
Pixels outside the closure stay 0. ``Pyramid.tiles_per_level`` counts the tiles generated.

Cost. A tile reads its window of the level being made and a ``tile_px / f`` (+ margin)
box of its parent level, never a whole level, so the host work per tile does not grow with
the slide. Levels are canvases: in RAM, or with ``workdir`` ``numpy`` memory maps on disk,
so a 40k px slide streams with RAM bounded by the tiles in flight. Tiles of one wave, across
all slides of the call, fill batches of ``batch_size`` (retries of filtered tiles rejoin the
queue); ``Pyramid.batch_fill`` is the mean number of tiles per model call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import distance_transform_edt

from ..models.conditioning import Cond
from ..models.samplers import derive_seed, get_sampler, initial_noise, zoom_start
from ..models.unet import unwrap
from ..pipeline import StageError
from ..recipe import SamplerConfig
from .tiling import (PARENT_MARGIN, Box, all_tiles, dependency_waves, known_mask, level_grids, needed_tiles,
                     tile_positions, zoom_factors)

TileFilter = Callable[[torch.Tensor, int], torch.Tensor]
SEAM_METHODS = ("feather", "inpaint", "overwrite")


@dataclass
class Pyramid:
    """A synthetic slide: ``levels`` are uint8 [H,W,3] arrays (or memory maps), coarsest first."""

    levels: list[np.ndarray]
    mpp: list[float]
    tile_px: int
    seed: int
    label: int | None
    n_filtered: int = 0
    tiles_per_level: list[int] = field(default_factory=list)  # tiles generated (not counting retries)
    overlap: int | None = None  # minimum tile overlap used (default tile_px // 4)
    inpaint_seams: bool = True  # False: tiles ignored their neighbours and overwrote the overlap
    seams: str = "feather"
    feather_px: int = 0  # width of the cross-fade band before each tile's own pixels
    grid_tiles_per_level: list[int] = field(default_factory=list)  # tiles of the whole-slide grid
    batch_fill: float = 0.0  # mean tiles per model call over the synthesis call that made this slide
    model_calls: int = 0

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [tuple(a.shape[:2]) for a in self.levels]


def _to_unit(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return t.movedim(-1, -3).float() / 127.5 - 1.0


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N,3,H,W] in [-1, 1] -> uint8 [N,H,W,3]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _parent_crop(parent: np.ndarray, y: int, x: int, tile_px: int, f: int) -> np.ndarray:
    """The part of the parent level under the tile at (y, x) of a level ``f`` times finer,
    upsampled bicubically to ``tile_px`` (PIL's box resize, as the tile store's crops).

    Only the footprint plus :data:`PARENT_MARGIN` px (the bicubic filter's reach) is read
    from ``parent``, so the cost is per tile, not per parent level; the result equals
    resizing the whole parent level with the same box."""
    h, w = parent.shape[:2]
    y0, x0 = max(0, y // f - PARENT_MARGIN), max(0, x // f - PARENT_MARGIN)
    y1, x1 = min(h, -(-(y + tile_px) // f) + PARENT_MARGIN), min(w, -(-(x + tile_px) // f) + PARENT_MARGIN)
    sub = np.ascontiguousarray(parent[y0:y1, x0:x1])
    box = (x / f - x0, y / f - y0, (x + tile_px) / f - x0, (y + tile_px) / f - y0)
    return np.asarray(Image.fromarray(sub).resize((tile_px, tile_px), Image.BICUBIC, box=box))


def _label_index(label: int | None, num_classes: int) -> int:
    if label is None or int(label) < 0:
        return num_classes
    if int(label) >= num_classes:
        raise StageError(f"label {label} is outside the model's {num_classes} classes (0..{num_classes - 1})")
    return int(label)


def feather_weights(mask: np.ndarray, feather_px: int) -> np.ndarray:
    """float32 [px, px] replacement weights: 1 on known pixels more than ``feather_px`` px
    from the unknown region, ramping linearly to 1 / (feather_px + 1) at its edge, 0 outside."""
    if feather_px <= 0 or not mask.any():
        return mask.astype(np.float32)
    if mask.all():
        return np.ones_like(mask, dtype=np.float32)
    d = distance_transform_edt(mask > 0)
    return np.clip(d / (feather_px + 1), 0.0, 1.0).astype(np.float32)


class _Slide:
    """One slide in flight: its seed, label, level canvases and which tiles it needs."""

    def __init__(self, label: int | None, seed: int, num_classes: int):
        self.label = label
        self.label_index = _label_index(label, num_classes)
        self.seed = int(seed)
        self.levels: list[np.ndarray] = []
        self.done: np.ndarray | None = None
        self.need: list[set[tuple[int, int]]] = []
        self.n_filtered = 0
        self.made: list[int] = []


def _new_canvas(shape: tuple[int, int], workdir: Path | None, name: str) -> np.ndarray:
    """A zeroed uint8 [H,W,3] level: in RAM (zero pages cost nothing until written), or a
    ``.npy`` memory map under ``workdir`` (a sparse file on disk)."""
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
    seams: str | None = None,
    feather_px: int | None = None,
    targets: Sequence[Sequence[Box] | None] | None = None,
) -> list[Pyramid]:
    """Synthesise several slides at once (their tiles share batches); one Pyramid each.

    ``seams``: ``"feather"`` (default), ``"inpaint"`` or ``"overwrite"`` (see the module
    doc); ``inpaint_seams=False`` is the old spelling of ``seams="overwrite"``.
    ``feather_px`` (default ``overlap // 2``) is the cross-fade width of ``"feather"``.
    ``targets``: None, or one entry per slide: None (whole slide) or a list of boxes
    ``(level, y0, x0, y1, x1)``; only the tiles those boxes depend on are generated."""
    if len(labels) != len(seeds):
        raise ValueError(f"got {len(labels)} labels but {len(seeds)} seeds")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if targets is not None and len(targets) != len(seeds):
        raise ValueError(f"got {len(targets)} target lists for {len(seeds)} slides")
    rows, cols = (int(v) for v in layout_tiles)
    if rows < 1 or cols < 1:
        raise StageError(f"layout_tiles must be two positive counts (rows, cols), got {tuple(layout_tiles)}")
    method = seams if seams is not None else ("feather" if inpaint_seams else "overwrite")
    if method not in SEAM_METHODS:
        raise ValueError(f"seams must be one of {SEAM_METHODS}, got {method!r}")
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
    feather = 0 if method != "feather" else (overlap // 2 if feather_px is None else int(feather_px))
    if feather < 0 or feather > overlap:
        raise ValueError(f"feather_px must be in 0..overlap ({overlap}), got {feather}")
    grids = level_grids((rows, cols), levels, px, overlap)
    for n, sl in enumerate(slides):
        boxes = None if targets is None else targets[n]
        sl.need = all_tiles(grids) if boxes is None else needed_tiles(boxes, grids, factors, px)
    run = _Run(model, slides, px, cfg, solve, dev, num_classes, method, feather, tile_filter, max_retries)

    for k, mpp in enumerate(levels):
        ys, xs = grids[k]
        h, w = ys[-1] + px, xs[-1] + px
        for n, sl in enumerate(slides):
            sl.levels.append(_new_canvas((h, w), wd, f"slide{n}_seed{sl.seed}_L{k}"))
            sl.done = np.zeros((len(ys), len(xs)), dtype=bool)  # finished tiles
            sl.made.append(len(sl.need[k]))
        f = factors[k] // factors[k - 1] if k else 1
        for wave in dependency_waves(ys, xs, px):
            queue = [(s, i, j, 0) for s, sl in enumerate(slides) for (i, j) in wave if (i, j) in sl.need[k]]
            while queue:
                batch, queue = queue[:batch_size], queue[batch_size:]
                queue = run.batch(batch, k, mpp, ys, xs, f) + queue
        for sl in slides:
            if isinstance(sl.levels[k], np.memmap):
                sl.levels[k].flush()
    fill = run.tiles / max(1, run.calls)
    return [
        Pyramid(levels=sl.levels, mpp=[float(m) for m in levels], tile_px=px, seed=sl.seed, label=sl.label,
                n_filtered=sl.n_filtered, tiles_per_level=list(sl.made), overlap=overlap,
                inpaint_seams=method != "overwrite", seams=method, feather_px=feather,
                grid_tiles_per_level=[len(ys) * len(xs) for ys, xs in grids], batch_fill=fill, model_calls=run.calls)
        for sl in slides
    ]


def synthesize_slide(
    model: torch.nn.Module,
    label: int | None,
    layout_tiles: tuple[int, int],
    levels: Sequence[float],
    seed: int,
    *,
    targets: Sequence[Box] | None = None,
    **kwargs,
) -> Pyramid:
    """Synthesise one slide of class ``label`` (None or -1: unconditional) from ``seed``;
    keyword arguments as :func:`synthesize_slides` (``targets`` is this slide's box list)."""
    return synthesize_slides(model, [label], layout_tiles, levels, [seed], targets=[targets], **kwargs)[0]


class _Run:
    """The per-call state of one synthesis: model, sampler and counters."""

    def __init__(self, model, slides, px, cfg, solve, dev, num_classes, method, feather, tile_filter, max_retries):
        self.model, self.slides, self.px, self.cfg, self.solve, self.dev = model, slides, px, cfg, solve, dev
        self.num_classes, self.method, self.feather = num_classes, method, feather
        self.tile_filter, self.max_retries = tile_filter, max_retries
        self.calls = 0
        self.tiles = 0

    def batch(self, pending, k, mpp, ys, xs, f) -> list[tuple[int, int, int, int]]:
        """Generate ``pending`` = [(slide, row, col, attempt)] of level ``k``, write the accepted
        tiles, and return the ones the filter sent back (with their next attempt)."""
        imgs = self._generate(pending, k, mpp, ys, xs, f)
        self.calls += 1
        self.tiles += len(pending)
        flags = _flags(self.tile_filter, imgs, k)
        retry = []
        px = self.px
        for (s, i, j, a), img, bad in zip(pending, _to_uint8(imgs), flags):
            sl = self.slides[s]
            if bad:
                sl.n_filtered += 1
                if a + 1 > self.max_retries:
                    raise StageError(
                        f"slide seed {sl.seed}: tile (row {i}, col {j}) of level {k} ({mpp} µm/px) is still "
                        f"flagged as a near-copy of a training tile after {a + 1} attempts "
                        f"(max_retries = {self.max_retries}); the model reproduces training data")
                retry.append((s, i, j, a + 1))
                continue
            sl.levels[k][ys[i]:ys[i] + px, xs[j]:xs[j] + px] = img
            sl.done[i, j] = True
        return retry

    def _generate(self, pending, k, mpp, ys, xs, f) -> torch.Tensor:
        px, dev, b = self.px, self.dev, len(pending)
        known = np.zeros((b, px, px, 3), dtype=np.uint8)
        mask = np.zeros((b, px, px), dtype=np.float32)
        weight = np.zeros((b, px, px), dtype=np.float32)
        parent = np.zeros((b, px, px, 3), dtype=np.uint8)
        seeds = []
        for n, (s, i, j, a) in enumerate(pending):
            sl = self.slides[s]
            y, x = ys[i], xs[j]
            known[n] = sl.levels[k][y:y + px, x:x + px]
            if self.method != "overwrite":
                mask[n] = known_mask(sl.done, i, j, ys, xs, px)
                weight[n] = feather_weights(mask[n], self.feather)
            if k:
                parent[n] = _parent_crop(sl.levels[k - 1], y, x, px, f)
            seeds.append(derive_seed("tile", sl.seed, k, i, j, a))
        mask_t = torch.from_numpy(mask).to(dev)[:, None]
        known_t = _to_unit(known, dev) * mask_t
        parent_t = _to_unit(parent, dev) if k else torch.zeros(b, 3, px, px, device=dev)
        cond = Cond(
            log_mpp=torch.full((b,), math.log(mpp), device=dev),
            label=torch.tensor([self.slides[s].label_index for (s, _, _, _) in pending], dtype=torch.long, device=dev),
            parent=parent_t,
            has_parent=torch.full((b,), bool(k), dtype=torch.bool, device=dev),
            known=known_t,
            mask=mask_t,
            num_classes=self.num_classes,
        )
        cfg = self.cfg
        t_start = 1.0 if k == 0 else float(cfg.zoom_start)
        steps = cfg.steps if k == 0 else max(1, math.ceil(cfg.steps * t_start))
        if k == 0:
            x_init = initial_noise((b, 3, px, px), seeds, dev)
        else:
            x_init = zoom_start(parent_t, t_start, seeds, model=self.model, known=known_t, mask=mask_t)
        replace = torch.from_numpy(weight).to(dev)[:, None]
        return self.solve(self.model, x_init, cond, steps=steps, guidance=float(cfg.guidance_scale), t_start=t_start,
                          replace_mask=replace)


def _flags(tile_filter: TileFilter | None, imgs: torch.Tensor, level: int) -> list[bool]:
    if tile_filter is None:
        return [False] * imgs.shape[0]
    with torch.no_grad():
        out = torch.as_tensor(tile_filter(imgs, level)).reshape(-1)
    if out.shape[0] != imgs.shape[0]:
        raise StageError(f"tile_filter returned {out.shape[0]} flags for {imgs.shape[0]} tiles at level {level}")
    return [bool(v) for v in out.tolist()]


__all__ = ["Pyramid", "synthesize_slide", "synthesize_slides", "tile_positions", "dependency_waves", "known_mask",
           "zoom_factors", "level_grids", "needed_tiles", "feather_weights", "SEAM_METHODS"]
