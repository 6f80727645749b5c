"""Small slide files for tests and benchmarks, written with tifffile.

:func:`make_pyramid_tiff` writes a multi-level tiled TIFF that OpenSlide opens (as a
generic tiled TIFF, or as an Aperio slide when an objective power is given), with
H&E-like content: pink stroma blobs dotted with purple nuclei on white glass. Where the
resolution goes is chosen by the caller so that each of OpenSlide's mpp sources can be
exercised: TIFF resolution tags in centimetres (which OpenSlide turns into
``openslide.mpp-x``) or inches (which it does not), an Aperio ``MPP`` field, or nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

STROMA = np.array([232, 150, 190], dtype=np.float32)
NUCLEUS = np.array([95, 60, 150], dtype=np.float32)
GLASS = np.array([246, 244, 246], dtype=np.float32)


def tissue_image(width: int, height: int, seed: int = 0, n_blobs: int = 6) -> np.ndarray:
    """uint8 [height, width, 3]: a few soft pink blobs with purple dots on white."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tissue = np.zeros((height, width), dtype=np.float32)
    for _ in range(n_blobs):
        cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
        rx, ry = rng.uniform(0.12, 0.3) * width, rng.uniform(0.12, 0.3) * height
        d = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
        tissue = np.maximum(tissue, np.clip(1.5 - d, 0, 1))
    nuclei = np.zeros_like(tissue)
    n_nuc = max(1, int(width * height / 600))
    r = max(1.5, min(width, height) / 200)
    for cx, cy in zip(rng.uniform(0, width, n_nuc), rng.uniform(0, height, n_nuc)):
        x0, x1 = int(max(0, cx - 2 * r)), int(min(width, cx + 2 * r + 1))
        y0, y1 = int(max(0, cy - 2 * r)), int(min(height, cy + 2 * r + 1))
        d = ((xx[y0:y1, x0:x1] - cx) ** 2 + (yy[y0:y1, x0:x1] - cy) ** 2) / r**2
        nuclei[y0:y1, x0:x1] = np.maximum(nuclei[y0:y1, x0:x1], np.clip(1.2 - d, 0, 1))
    nuclei *= tissue > 0.5
    img = GLASS * (1 - tissue[..., None]) + STROMA * tissue[..., None]
    img = img * (1 - nuclei[..., None]) + NUCLEUS * nuclei[..., None]
    img += rng.normal(0, 3.0, img.shape).astype(np.float32)
    return img.clip(0, 255).astype(np.uint8)


def make_pyramid_tiff(path: Path | str, size: tuple[int, int] = (1024, 768), mpp: float = 0.5, levels: int = 3,
                      with_mpp: bool = True, objective: float | None = None, *, resolution_unit: str = "centimeter",
                      tile: int = 128, seed: int = 0, image: np.ndarray | None = None,
                      tiled: bool = True) -> Path:
    """Write a pyramidal tiled TIFF (``levels`` pages, each half the previous) and return its path.

    - ``with_mpp`` and no ``objective``: resolution tags in ``resolution_unit``
      (``"centimeter"``: OpenSlide reports ``openslide.mpp-x``; ``"inch"``: only the raw
      ``tiff.XResolution``/``tiff.ResolutionUnit`` properties).
    - ``objective`` given: an Aperio-style ImageDescription with ``AppMag`` (and ``MPP``
      when ``with_mpp``), so OpenSlide reports ``openslide.objective-power``.
    - ``with_mpp=False`` and no ``objective``: no resolution information at all.
    - ``tiled=False``: one stripped page (no pyramid). OpenSlide does not read such files,
      so ``openslide.open_slide`` falls back to a plain image with no properties, and the
      resolution tags can only be read with tifffile.
    """
    import tifffile

    path = Path(path)
    w, h = size
    base = tissue_image(w, h, seed) if image is None else np.asarray(image, dtype=np.uint8)
    if base.shape != (h, w, 3):
        raise ValueError(f"image must be [{h}, {w}, 3], got {list(base.shape)}")
    pages = [base]
    for _ in range(1, levels if tiled else 1):
        prev = Image.fromarray(pages[-1])
        nw, nh = max(1, prev.width // 2), max(1, prev.height // 2)
        pages.append(np.asarray(prev.resize((nw, nh), Image.BOX)))
    desc = None
    if objective is not None:
        fields = [f"AppMag = {objective:g}"] + ([f"MPP = {mpp:.4f}"] if with_mpp else [])
        desc = f"Aperio Image Library v12.0.0 \n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) RAW|" + "|".join(fields)
    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp) as tw:
        for i, page in enumerate(pages):
            kw: dict = dict(photometric="rgb", compression="zlib", metadata=None)
            if tiled:
                kw["tile"] = (tile, tile)
            if i > 0:
                kw["subfiletype"] = 1  # reduced-resolution page: OpenSlide counts it as a level
            if with_mpp and objective is None:
                per_unit = 1e4 if resolution_unit == "centimeter" else 25400.0
                kw["resolution"] = (per_unit / (mpp * 2**i), per_unit / (mpp * 2**i))
                kw["resolutionunit"] = resolution_unit.upper()
            if i == 0 and desc is not None:
                kw["description"] = desc
            tw.write(page, **kw)
    tmp.replace(path)
    return path
