"""Opening slides and reading regions at a target resolution.

Everything goes through OpenSlide: whole-slide formats directly, plain RGB images
(PNG/JPEG/TIFF) through its image fallback (``OpenSlide.open_slide`` falls back to an
``ImageSlide``), whose resolution must then come from the recipe.

Reads never load a whole level-0 slide: a region is read from the pyramid level closest
above (finer than or equal to) the wanted resolution and resized down with a Lanczos filter;
the thumbnail is assembled from strips of the best level for its size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from .mpp import resolve_mpp

#: Largest side (in pixels of the level read) of one ``read_region`` call.
MAX_READ_PX = 4096


class SlideOpenError(RuntimeError):
    """A slide file could not be opened or read."""


@dataclass
class Slide:
    """An open slide plus its resolved level-0 resolution."""

    path: Path
    handle: object  # openslide.OpenSlide or openslide.ImageSlide
    mpp: float
    mpp_source: str

    @property
    def dimensions(self) -> tuple[int, int]:
        return tuple(self.handle.dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self.handle.level_downsamples)

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def best_level(self, downsample: float) -> int:
        """The pyramid level whose downsample is the largest one <= ``downsample``
        (so the source is never coarser than what is asked for)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-6) and d >= self.level_downsamples[best]:
                best = i
        return best

    def read_block(self, x: int, y: int, size0: int, level: int) -> tuple[Image.Image, float]:
        """Read the level-0 square ``[x, x+size0) x [y, y+size0)`` at pyramid ``level``.

        Returns the RGB image (transparent pixels outside the slide become white) and the
        level's downsample; the block may extend one pixel past the square so that any
        sub-box of it can be resampled exactly.
        """
        ds = self.level_downsamples[level]
        side = int(math.ceil(size0 / ds)) + 1
        if side > MAX_READ_PX * 4:
            raise SlideOpenError(f"{self.path}: refusing to read a {side}x{side} block at level {level}")
        try:
            region = self.handle.read_region((int(x), int(y)), level, (side, side))
        except openslide.OpenSlideError as e:
            raise SlideOpenError(f"{self.path}: read_region failed at ({x}, {y}) level {level}: {e}") from e
        return _rgba_to_rgb(region), ds

    def read_tile(self, x: int, y: int, size0: int, out_px: int) -> Image.Image:
        """One tile: level-0 square of side ``size0`` resampled to ``out_px``."""
        level = self.best_level(size0 / out_px)
        block, ds = self.read_block(x, y, size0, level)
        box = (0.0, 0.0, size0 / ds, size0 / ds)
        return block.resize((out_px, out_px), Image.LANCZOS, box=box)

    def thumbnail(self, longest_px: int) -> tuple[Image.Image, float]:
        """An RGB thumbnail whose longest side is ``longest_px`` (never upsampled), and its
        downsample from level 0 (level-0 pixels per thumbnail pixel, same on both axes)."""
        w0, h0 = self.dimensions
        scale = max(1.0, max(w0, h0) / float(longest_px))
        tw, th = max(1, int(round(w0 / scale))), max(1, int(round(h0 / scale)))
        scale = w0 / tw  # exact x scale; y differs by < 1 px over the whole slide
        level = self.best_level(scale)
        ds = self.level_downsamples[level]
        lw, lh = self.handle.level_dimensions[level]
        f = scale / ds  # level pixels per thumbnail pixel
        out = Image.new("RGB", (tw, th), (255, 255, 255))
        rows = max(1, int(MAX_READ_PX * MAX_READ_PX / max(lw, 1) / f))  # thumbnail rows per strip
        for t0 in range(0, th, rows):
            t1 = min(th, t0 + rows)
            y0 = int(math.floor(t0 * f))
            y1 = min(lh, int(math.ceil(t1 * f)) + 1)
            try:
                strip = self.handle.read_region((0, int(round(y0 * ds))), level, (lw, max(1, y1 - y0)))
            except openslide.OpenSlideError as e:
                raise SlideOpenError(f"{self.path}: reading the thumbnail failed: {e}") from e
            strip = _rgba_to_rgb(strip)
            box = (0.0, t0 * f - y0, min(lw, tw * f), min(y1 - y0, t1 * f - y0))
            out.paste(strip.resize((tw, t1 - t0), Image.BOX, box=box), (0, t0))
        return out, scale


def _rgba_to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode != "RGBA":
        return img.convert("RGB")
    if img.getchannel("A").getextrema() == (255, 255):
        return img.convert("RGB")  # fully inside the slide: no compositing needed
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, img).convert("RGB")


#: Whole-slide formats that are never handed to the plain-image fallback: when OpenSlide
#: refuses one of these, its reason is the reason.
WSI_SUFFIXES = frozenset({".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi", ".dcm"})


def _openslide_reason(path: Path) -> str:
    try:
        openslide.OpenSlide(str(path)).close()
    except Exception as e:  # whatever OpenSlide says is the message we want
        return f"{type(e).__name__}: {e}"
    return "it opens"


def open_slide(path: Path | str, mpp_override: float | None = None, *, slide_id: str | None = None) -> Slide:
    """Open ``path`` with OpenSlide (plain images through the image fallback) and resolve its
    mpp (see :mod:`synthpath.slides.mpp`). Raises :class:`SlideOpenError` or
    :class:`~synthpath.slides.mpp.MppError` with the path in the message.

    The true reason comes first: a TIFF-based file cut short is reported as truncated (see
    :func:`~synthpath.slides.diagnose.tiff_damage`) with OpenSlide's own message; a file
    OpenSlide recognises, or one with a whole-slide suffix (``.svs``, ``.ndpi``, ...), is
    never retried as a plain image; a plain image is decoded once here, so a damaged one
    fails now, by name, and not later in the middle of tiling."""
    from .diagnose import tiff_damage

    path = Path(path)
    if path.is_dir():
        raise SlideOpenError(f"{path}: is a folder, not a slide file")
    if not path.is_file():
        raise SlideOpenError(f"{path}: no such file")
    damage = tiff_damage(path)
    if damage:
        raise SlideOpenError(f"{path}: the file is truncated or damaged: {damage} (OpenSlide says: "
                             f"{_openslide_reason(path)}); copy it again from its source")
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError, ValueError):
        fmt = None
    try:
        if fmt is not None or path.suffix.lower() in WSI_SUFFIXES:
            handle = openslide.OpenSlide(str(path))
        else:
            handle = openslide.ImageSlide(str(path))
            handle.read_region((0, 0), 0, (1, 1))  # decodes the whole image: a damaged one fails here
    except (openslide.OpenSlideError, OSError, ValueError, Image.UnidentifiedImageError, Image.DecompressionBombError) as e:
        if fmt is not None or path.suffix.lower() in WSI_SUFFIXES:
            raise SlideOpenError(f"{path}: OpenSlide cannot open it ({type(e).__name__}: {e})") from e
        raise SlideOpenError(f"{path}: not a slide OpenSlide knows ({_openslide_reason(path)}) and not a readable "
                             f"image ({type(e).__name__}: {e}); the file may be truncated or corrupt") from e
    try:
        if min(handle.dimensions) <= 0:
            raise SlideOpenError(f"{path}: empty slide (dimensions {handle.dimensions})")
        mpp, source = resolve_mpp(dict(handle.properties), path, mpp_override, slide_id=slide_id)
    except Exception:
        handle.close()
        raise
    return Slide(path=path, handle=handle, mpp=mpp, mpp_source=source)


def to_array(img: Image.Image) -> np.ndarray:
    """PIL image -> uint8 [H, W, 3]."""
    return np.asarray(img.convert("RGB"), dtype=np.uint8)
