"""Tissue detection: Otsu's threshold on the HSV saturation of a blurred thumbnail.

Stained tissue is saturated (pink eosin, purple haematoxylin); glass, background and most
pen-free debris are grey or white. The threshold is Otsu's on the saturation histogram,
scaled by ``otsu_scale`` and floored at ``min_saturation`` so that a slide that is almost
all tissue (or almost all glass) does not get a meaningless split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..recipe import TissueConfig


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising between-class variance."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return 0.0
    hist, edges = np.histogram(v, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(1, hist.sum())
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    w1 = 1.0 - w0
    m0 = np.cumsum(p * centers)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    k = int(np.argmax(between))
    return float(edges[k + 1])


def saturation(img: Image.Image) -> np.ndarray:
    """HSV saturation in [0, 1] (float32 [H, W])."""
    hsv = np.asarray(img.convert("RGB").convert("HSV"), dtype=np.float32)
    return hsv[..., 1] / 255.0


def tissue_mask(thumb: Image.Image, cfg: TissueConfig) -> tuple[np.ndarray, float]:
    """Boolean tissue mask [H, W] of the thumbnail and the saturation threshold used."""
    img = thumb.convert("RGB")
    if cfg.blur_px > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=cfg.blur_px))
    sat = saturation(img)
    thr = max(cfg.min_saturation, otsu_threshold(sat) * cfg.otsu_scale)
    return sat > thr, thr


def save_mask_overlay(thumb: Image.Image, mask: np.ndarray, path: Path,
                      boxes: list[tuple[float, float, float, float]] = ()) -> None:
    """Write the thumbnail with tissue tinted green and background dimmed; ``boxes``
    (thumbnail coordinates) are drawn as outlines, e.g. the kept coarsest tiles."""
    base = thumb.convert("RGB")
    tinted = Image.blend(base, Image.new("RGB", base.size, (40, 200, 60)), 0.4)
    dimmed = Image.blend(base, Image.new("RGB", base.size, (255, 255, 255)), 0.5)
    img = Image.composite(tinted, dimmed, Image.fromarray(mask.astype(np.uint8) * 255, "L"))
    draw = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(20, 60, 220))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    img.save(tmp, format="PNG")
    tmp.replace(path)
