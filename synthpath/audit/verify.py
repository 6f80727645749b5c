"""Every released pixel is checked: the release filter over the finished canvas of a slide.

Synthesis filters each generation window as it is made, but a window's pixels are later
partly overwritten by its neighbours (seam inpainting), and the pyramidal TIFF holds the
whole finished canvas of every level. :func:`verify_canvas` therefore runs the release
filter on the *finished* canvas, level by level, on tile-sized windows at a stride no
larger than the shift the filter tolerates (``filter.shift_tolerance_px``: half a tile for
the pixel space), with the last row and column of windows flush with the canvas edge.

Why that covers every pixel: any tile-sized square of the canvas (a copy placed anywhere)
is within ``stride / 2`` px per axis of some checked window, i.e. it appears in that window
moved by at most ``stride / 2 <= tolerance / 2``, which the filter is built to catch; and
every pixel lies in at least one checked window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .filter import ReleaseFilterError


@dataclass
class CanvasCheck:
    """Result of :func:`verify_canvas`: windows checked and flagged per level."""

    stride: int
    tile_px: int
    windows: list[int] = field(default_factory=list)  # per level
    flagged: list[tuple[int, int, int]] = field(default_factory=list)  # (level, y, x) of flagged windows

    @property
    def passed(self) -> bool:
        return not self.flagged

    def describe(self) -> dict:
        return {"passed": self.passed, "stride_px": self.stride, "tile_px": self.tile_px,
                "windows_per_level": list(self.windows), "flagged": [list(f) for f in self.flagged[:20]],
                "n_flagged": len(self.flagged)}


def window_origins(length: int, tile_px: int, stride: int) -> list[int]:
    """Window origins along an axis: every ``stride`` px from 0, plus one flush with the end."""
    if length < tile_px:
        raise ValueError(f"a canvas side of {length} px is smaller than one {tile_px}-px window")
    out = list(range(0, length - tile_px + 1, stride))
    if out[-1] != length - tile_px:
        out.append(length - tile_px)
    return out


def verification_stride(tile_filter, tile_px: int, stride: int | None = None) -> int:
    """The stride to use: ``stride`` if given, else the filter's shift tolerance (fails
    closed when the filter declares none: nothing then guarantees coverage)."""
    if stride is None:
        tol = int(getattr(tile_filter, "shift_tolerance_px", 0) or 0)
        if tol < 1:
            raise ReleaseFilterError(
                "cannot verify a slide canvas: the release filter declares no shift tolerance (its feature spaces "
                "have no 'pixel' space); add 'pixel' to audit.feature_spaces and re-run the audit")
        stride = tol
    stride = int(stride)
    if not 1 <= stride <= tile_px:
        raise ValueError(f"verification stride must be in 1..{tile_px} px, got {stride}")
    return stride


@torch.no_grad()
def verify_canvas(tile_filter, levels: list[np.ndarray], tile_px: int, *, stride: int | None = None,
                  batch_size: int = 64, device: torch.device | str | None = None,
                  stop_at_first: bool = False) -> CanvasCheck:
    """Run ``tile_filter(images [N,3,T,T] in [-1,1], level) -> bool [N]`` over every window of
    every level of a finished slide (``levels``: uint8 [H, W, 3] arrays, coarsest first, as
    in synthesis). ``stop_at_first`` returns as soon as one window is flagged."""
    stride = verification_stride(tile_filter, tile_px, stride)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    res = CanvasCheck(stride=stride, tile_px=tile_px)
    for k, canvas in enumerate(levels):
        a = np.asarray(canvas)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"level {k} canvas must be uint8 [H, W, 3], got {a.dtype} {a.shape}")
        ys, xs = window_origins(a.shape[0], tile_px, stride), window_origins(a.shape[1], tile_px, stride)
        boxes = [(y, x) for y in ys for x in xs]
        res.windows.append(len(boxes))
        for s in range(0, len(boxes), batch_size):
            chunk = boxes[s:s + batch_size]
            tiles = np.stack([a[y:y + tile_px, x:x + tile_px] for y, x in chunk])
            x_in = torch.from_numpy(tiles).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            flags = torch.as_tensor(tile_filter(x_in, k)).reshape(-1)
            if flags.shape[0] != len(chunk):
                raise ReleaseFilterError(f"the filter returned {flags.shape[0]} flags for {len(chunk)} windows")
            for (y, x), bad in zip(chunk, flags.tolist()):
                if bad:
                    res.flagged.append((k, y, x))
            if stop_at_first and res.flagged:
                return res
    return res
