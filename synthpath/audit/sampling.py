"""What the audit scores: synthetic tiles drawn from the model, and balanced member /
non-member batches for membership inference."""

from __future__ import annotations

import math

import numpy as np
import torch


def windows(level: np.ndarray, tile_px: int) -> np.ndarray:
    """Every grid-aligned ``tile_px`` window of a slide level (uint8 [n, P, P, 3]), the way a
    reader of the released TIFF tiles it (a ragged last row/column is anchored at the edge)."""
    h, w = level.shape[:2]
    ys = sorted({min(y, h - tile_px) for y in range(0, h, tile_px)})
    xs = sorted({min(x, w - tile_px) for x in range(0, w, tile_px)})
    return np.stack([level[y:y + tile_px, x:x + tile_px] for y in ys for x in xs])


def draw_synthetic(model, levels: list[float], tile_px: int, num_classes: int, n_synthetic: int, label_pool: np.ndarray,
                   sampler_cfg, layout_tiles: tuple[int, int], seed: int, device, batch_size: int = 64
                   ) -> tuple[list[np.ndarray], dict]:
    """Small synthetic slides drawn exactly as ``generate`` draws them
    (:func:`synthpath.generate.synthesis.synthesize_slides`: coarse to fine, zoom-in from the
    synthetic parent, seam inpainting from neighbouring tiles, guidance), and no release
    filter, so the audit judges the raw model. Every grid-aligned window of every level of
    the finished slides is a synthetic tile for the audit; enough slides are drawn to give at
    least ``n_synthetic`` windows. Labels come from ``label_pool`` (model label indices of
    the training tiles, ``num_classes`` for unlabelled). Returns the windows per level
    (uint8 [n_k, P, P, 3]) and a description."""
    from synthpath.generate.synthesis import synthesize_slides
    from synthpath.models.samplers import derive_seed

    rows, cols = (int(v) for v in layout_tiles)
    per_slide = sum(rows * cols * int(round(levels[0] / m)) ** 2 for m in levels)
    n_slides = max(1, math.ceil(int(n_synthetic) / max(per_slide, 1)))
    rng = np.random.default_rng(seed)
    drawn = rng.choice(label_pool, size=n_slides) if len(label_pool) else np.full(n_slides, -1)
    labels = [None if (int(v) < 0 or int(v) == num_classes) else int(v) for v in drawn]
    seeds = [derive_seed("synthpath-audit", seed, i) for i in range(n_slides)]
    pyramids = synthesize_slides(model, labels, (rows, cols), list(levels), seeds, sampler=sampler_cfg,
                                 tile_filter=None, device=device, batch_size=batch_size, max_retries=0)
    out = []
    for k in range(len(levels)):
        out.append(np.concatenate([windows(p.levels[k], tile_px) for p in pyramids]))
    info = {"n_slides": n_slides, "layout_tiles": [rows, cols], "labels": labels, "seeds": seeds,
            "tiles_generated": int(sum(sum(p.tiles_per_level) for p in pyramids)),
            "method": "small synthetic slides drawn by generate's own code path (synthesize_slides: neighbours, "
                      "seam inpainting, zoom-in, guidance), unfiltered; every grid-aligned window of every level"}
    return out, info


def split_counts(n: int, n_levels: int) -> list[int]:
    """``n`` split as evenly as possible over the levels (extra to the finer ones), at least 1 each."""
    base, extra = divmod(n, n_levels)
    return [max(1, base + (1 if k >= n_levels - extra else 0)) for k in range(n_levels)]


# --------------------------------------------------------------------------- membership inference
def mia_batches(store, seed: int, max_tiles: int) -> tuple[dict, dict, dict]:
    """Balanced member (train) / non-member (holdout) batches, equal counts per level."""
    from synthpath.models.samplers import derive_seed
    from synthpath.tiles.dataset import TileDataset

    ds = {s: TileDataset(store, split=s) for s in ("train", "holdout")}
    lv = {s: d.item_levels for s, d in ds.items()}
    n_levels = len(store.levels)
    per_level = max(1, max_tiles // n_levels)
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[int]] = {"train": [], "holdout": []}
    counts = {}
    for k in range(n_levels):
        tr = np.flatnonzero(lv["train"] == k)
        ho = np.flatnonzero(lv["holdout"] == k)
        m = min(len(tr), len(ho), per_level)
        counts[str(k)] = int(m)
        if m == 0:
            continue
        chosen["train"] += rng.choice(tr, size=m, replace=False).tolist()
        chosen["holdout"] += rng.choice(ho, size=m, replace=False).tolist()
    out = {}
    for s in ("train", "holdout"):
        items = [ds[s][i] for i in chosen[s]]
        if not items:
            out[s] = None
            continue
        batch = {key: torch.stack([it[key] for it in items]) for key in items[0]}
        batch["noise_seed"] = torch.tensor([derive_seed("synthpath-mia", seed, ds[s].tile_ids[i]) for i in chosen[s]],
                                           dtype=torch.long)
        out[s] = batch
    return out["train"], out["holdout"], counts


