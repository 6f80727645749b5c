"""Quality measurements of synthetic pyramids (used by tests and the dataset card).

- :func:`consistency`: cross-magnification agreement. Each finer level is box-downsampled
  to the size of the level above and compared with it (PSNR in dB, SSIM in [-1, 1]). A
  zoom that kept the parent's structure scores high; unrelated content scores low.
- :func:`seam_score`: mean absolute intensity step across the lines where tiles meet,
  divided by the mean step between neighbouring pixels elsewhere. 1.0 means the borders
  are as smooth as the interior (seamless); visible seams push it above 1.
- :func:`pyramid_seams`: :func:`seam_score` at every level of a pyramid, at the lines where
  :mod:`synthpath.generate.synthesis` starts new pixels (the end of the previous tile).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

if TYPE_CHECKING:
    from .synthesis import Pyramid


def _float(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an image [H,W] or [H,W,C], got shape {a.shape}")
    return a.astype(np.float64)


def box_downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks (the image is cropped to a multiple of factor)."""
    a = _float(img)
    h, w = (a.shape[0] // factor) * factor, (a.shape[1] // factor) * factor
    a = a[:h, :w]
    return a.reshape(h // factor, factor, w // factor, factor, a.shape[2]).mean(axis=(1, 3))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    a, b = _float(a), _float(b)
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs equal shapes, got {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) with a Gaussian window, averaged over channels."""
    a, b = _float(a), _float(b)
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs equal shapes, got {a.shape} and {b.shape}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch], b[..., ch]
        blur = lambda z: gaussian_filter(z, sigma, mode="reflect", truncate=3.5)  # noqa: E731
        mx, my = blur(x), blur(y)
        vx = blur(x * x) - mx * mx
        vy = blur(y * y) - my * my
        cxy = blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        vals.append(float(s.mean()))
    return float(np.mean(vals))


def consistency(pyramid: "Pyramid") -> list[dict]:
    """For each level below the coarsest: ``{"level", "mpp", "psnr", "ssim"}`` of the level,
    box-downsampled to the coarser level's size, against that coarser level."""
    out = []
    for k in range(1, len(pyramid.levels)):
        coarse, fine = np.asarray(pyramid.levels[k - 1]), np.asarray(pyramid.levels[k])
        f = fine.shape[0] // coarse.shape[0]
        if f < 1 or fine.shape[0] != coarse.shape[0] * f or fine.shape[1] != coarse.shape[1] * f:
            raise ValueError(f"level {k} ({fine.shape[:2]}) is not an integer zoom of level {k - 1} ({coarse.shape[:2]})")
        down = box_downsample(fine, f)
        out.append({"level": k, "mpp": float(pyramid.mpp[k]), "psnr": psnr(down, coarse), "ssim": ssim(down, coarse)})
    return out


def seam_score(
    image: np.ndarray,
    tile_px: int,
    stride: int | None = None,
    *,
    borders: tuple[Sequence[int], Sequence[int]] | None = None,
) -> float:
    """Mean |step| across tile borders / mean |step| between other neighbouring pixels.

    Borders default to a regular grid of ``tile_px`` tiles every ``stride`` px (default
    ``tile_px``): the lines ``j * stride + (tile_px - stride)`` for j >= 1, where a new tile's
    own pixels meet the previous tile's. ``borders = (rows, cols)`` gives the lines
    explicitly (index b = the step between pixel b-1 and b).
    """
    a = _float(image).mean(axis=2)
    h, w = a.shape
    if borders is None:
        stride = tile_px if stride is None else int(stride)
        if not 0 < stride <= tile_px:
            raise ValueError(f"stride must be in 1..tile_px ({tile_px}), got {stride}")
        ov = tile_px - stride
        by = [j * stride + ov for j in range(1, h) if j * stride + ov < h]
        bx = [j * stride + ov for j in range(1, w) if j * stride + ov < w]
    else:
        by = [int(b) for b in borders[0] if 0 < int(b) < h]
        bx = [int(b) for b in borders[1] if 0 < int(b) < w]
    if not by and not bx:
        raise ValueError(f"no tile border lies inside a {h}x{w} image (tile_px {tile_px})")
    dy = np.abs(np.diff(a, axis=0))  # dy[b-1] = step between rows b-1 and b
    dx = np.abs(np.diff(a, axis=1))
    my = np.zeros(h - 1, dtype=bool)
    mx = np.zeros(w - 1, dtype=bool)
    my[[b - 1 for b in by]] = True
    mx[[b - 1 for b in bx]] = True
    border_sum = dy[my].sum() + dx[:, mx].sum()
    border_n = dy[my].size + dx[:, mx].size
    inner_sum = dy[~my].sum() + dx[:, ~mx].sum()
    inner_n = dy[~my].size + dx[:, ~mx].size
    inner = inner_sum / max(inner_n, 1)
    border = border_sum / max(border_n, 1)
    if inner == 0:
        return 1.0 if border == 0 else float("inf")
    return float(border / inner)


def pyramid_seams(pyramid: "Pyramid") -> list[dict]:
    """``{"level", "mpp", "seam"}`` for each level, at the lines where synthesis began new pixels.

    With seam inpainting, a tile keeps its neighbours' pixels in the overlap (known pixels),
    so its own pixels begin where the previous tile ends (``y + tile_px``). Without it
    (``pyramid.inpaint_seams`` False), a tile overwrites the overlap, so they begin at its
    own origin (the next tile's ``y``). With feathered seams (``pyramid.feather_px`` = w > 0)
    the change from the neighbour's pixels to the tile's own is spread over the w lines
    before ``y + tile_px``, so every line of that band, up to and including ``y + tile_px``,
    counts as a border (the score is the mean step over all of them)."""
    from .synthesis import tile_positions

    px = pyramid.tile_px
    ov = getattr(pyramid, "overlap", None) or px // 4
    out = []
    for k, lev in enumerate(pyramid.levels):
        h, w = np.asarray(lev).shape[:2]
        ys, xs = tile_positions(h, px, ov), tile_positions(w, px, ov)
        band = int(getattr(pyramid, "feather_px", 0) or 0)
        if getattr(pyramid, "inpaint_seams", True):
            by = [y + px - d for y in ys[:-1] for d in range(band + 1)]
            bx = [x + px - d for x in xs[:-1] for d in range(band + 1)]
        else:
            by, bx = list(ys[1:]), list(xs[1:])
        if not by and not bx:
            continue
        out.append({"level": k, "mpp": float(pyramid.mpp[k]), "seam": seam_score(lev, px, borders=(by, bx))})
    return out


__all__ = ["consistency", "seam_score", "pyramid_seams", "psnr", "ssim", "box_downsample"]
