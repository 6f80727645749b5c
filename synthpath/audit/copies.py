"""Planted copies of training tiles: the attacks the release filter must catch.

Used by the copy-filter test (``tests/test_copy_filter.py``) and the planted-copy benchmark
(``benchmarks/bench_copies.py``). Each attack starts from a real training tile of a tile
store and makes what a memorising model might emit:

- ``dihedral``: the 8 symmetries of the square (flips, quarter turns);
- ``shift``: the tile moved by (dy, dx) px with the *real neighbouring tissue* of the slide
  filling the rest (read with OpenSlide from the tile's source slide at the same scale);
- ``scale``: the same centre read over a ±10% larger/smaller field (real tissue around it);
- ``stain``: H&E stain jitter in optical density (Ruifrok-Johnston HED unmixing),
  ``colour``: brightness/contrast/saturation jitter, ``jpeg``: JPEG re-encoding,
  ``blur``: Gaussian blur;
- ``combo``: a random dihedral transform + a random shift up to half a tile + a scale in
  0.9..1.1 + stain and colour jitter + JPEG or blur, all at once.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

# Ruifrok & Johnston (2001) stain vectors: haematoxylin, eosin, DAB (rows, RGB optical density)
_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_HED = _HED / np.linalg.norm(_HED, axis=1, keepdims=True)
_HED_INV = np.linalg.inv(_HED)


def dihedral_np(img: np.ndarray, flip: bool, rot: int) -> np.ndarray:
    """[H, W, 3]: optional horizontal flip, then ``rot`` quarter turns (as torch.rot90 on H, W)."""
    if flip:
        img = img[:, ::-1]
    return np.ascontiguousarray(np.rot90(img, rot, axes=(0, 1)))


def stain_jitter(img: np.ndarray, rng: np.random.Generator, sigma: float = 0.05, bias: float = 0.05) -> np.ndarray:
    """H&E stain jitter: per-stain concentration scaled by 1±sigma and shifted by ±bias (OD units)."""
    od = -np.log((img.astype(np.float64) + 1.0) / 256.0)
    conc = od.reshape(-1, 3) @ _HED_INV
    a = 1.0 + rng.uniform(-sigma, sigma, size=3)
    b = rng.uniform(-bias, bias, size=3)
    od2 = (conc * a + b) @ _HED
    rgb = 256.0 * np.exp(-od2) - 1.0
    return np.clip(rgb.reshape(img.shape), 0, 255).round().astype(np.uint8)


def colour_jitter(img: np.ndarray, rng: np.random.Generator, brightness: float = 0.1, contrast: float = 0.15,
                  saturation: float = 0.15) -> np.ndarray:
    x = img.astype(np.float64) / 255.0
    x = x + rng.uniform(-brightness, brightness)
    mean = x.mean()
    x = (x - mean) * (1 + rng.uniform(-contrast, contrast)) + mean
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * (1 + rng.uniform(-saturation, saturation)) + grey
    return np.clip(x * 255.0, 0, 255).round().astype(np.uint8)


def jpeg(img: np.ndarray, quality: int = 60) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def blur(img: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(float(sigma))), dtype=np.uint8)


@dataclass
class TileSource:
    """Reads a training tile's neighbourhood from its real slide at the tile's scale."""

    slide: object  # synthpath.slides.reader.Slide
    x: int
    y: int
    size0: int
    tile_px: int

    def read(self, dy: float = 0.0, dx: float = 0.0, scale: float = 1.0) -> np.ndarray:
        """The tile moved by (dy, dx) tile pixels and its field of view scaled by ``scale``
        about its centre (>1: zoomed out), resampled to ``tile_px``; real tissue all round."""
        f = self.size0 / self.tile_px
        side = self.size0 * scale
        x0 = self.x + dx * f + (self.size0 - side) / 2
        y0 = self.y + dy * f + (self.size0 - side) / 2
        ix, iy = int(np.floor(x0)), int(np.floor(y0))
        big = int(np.ceil(side + (x0 - ix))) + 1
        block = np.asarray(self.slide.read_tile(ix, iy, big, big), dtype=np.uint8)  # level-0 pixels
        box = (x0 - ix, y0 - iy, x0 - ix + side, y0 - iy + side)
        return np.asarray(Image.fromarray(block).resize((self.tile_px, self.tile_px), Image.LANCZOS, box=box),
                          dtype=np.uint8)


Attack = Callable[[np.ndarray, TileSource, np.random.Generator], np.ndarray]


def _shift(dy: float, dx: float) -> Attack:
    return lambda img, src, rng: src.read(dy, dx)


def _combo(img: np.ndarray, src: TileSource, rng: np.random.Generator) -> np.ndarray:
    t = src.tile_px
    dy, dx = rng.integers(-t // 2, t // 2 + 1, size=2)
    out = src.read(float(dy), float(dx), float(rng.uniform(0.9, 1.1)))
    out = dihedral_np(out, bool(rng.integers(2)), int(rng.integers(4)))
    out = colour_jitter(stain_jitter(out, rng), rng)
    return jpeg(out, int(rng.integers(50, 90))) if rng.random() < 0.5 else blur(out, float(rng.uniform(0.5, 1.5)))


def attacks(tile_px: int) -> dict[str, Attack]:
    """Every attack by name (the benchmark's rows)."""
    t = tile_px
    out: dict[str, Attack] = {"exact": lambda img, src, rng: img}
    names = {(True, 0): "flip_h", (False, 1): "rot90", (False, 2): "rot180", (False, 3): "rot270",
             (True, 2): "flip_v", (True, 1): "transpose", (True, 3): "anti_transpose"}
    for (flip, rot), name in names.items():
        out[name] = (lambda f, r: (lambda img, src, rng: dihedral_np(img, f, r)))(flip, rot)
    out.update({
        f"shift_{t // 4}px_x": _shift(0, t // 4), f"shift_{t // 4}px_y": _shift(t // 4, 0),
        f"shift_{t // 2}px_x": _shift(0, t // 2), f"shift_-{t // 2}px_y": _shift(-(t // 2), 0),
        f"shift_{t // 2}px_diag": _shift(t // 2, t // 2), f"shift_{t // 2},-{t // 4}px": _shift(t // 2, -(t // 4)),
        "shift_random_half": lambda img, src, rng: src.read(*(float(v) for v in rng.uniform(-t / 2, t / 2, 2))),
        "scale_0.9": lambda img, src, rng: src.read(scale=0.9), "scale_1.1": lambda img, src, rng: src.read(scale=1.1),
        "stain_jitter": lambda img, src, rng: stain_jitter(img, rng),
        "colour_jitter": lambda img, src, rng: colour_jitter(img, rng),
        "jpeg_q50": lambda img, src, rng: jpeg(img, 50),
        "blur_s1.5": lambda img, src, rng: blur(img, 1.5),
        "combo": _combo,
    })
    return out


def plant(images: np.ndarray, sources: list[TileSource], attack: Attack, seed: int = 0) -> np.ndarray:
    """Apply ``attack`` to each training tile (uint8 [N, H, W, 3]) with its slide source."""
    rng = np.random.default_rng(seed)
    return np.stack([attack(img, src, rng) for img, src in zip(images, sources)])


def tile_sources(store, tile_ids: list[str]) -> list[TileSource]:
    """A :class:`TileSource` per tile id of ``store`` (its slides opened with OpenSlide)."""
    from synthpath.slides.reader import open_slide

    idx = store.index
    ids = idx.column("tile_id").to_pylist()
    pos = {t: i for i, t in enumerate(ids)}
    cols = {c: idx.column(c).to_pylist() for c in ("slide_id", "x", "y", "size0")}
    slides_meta = store.meta.get("slides", {}) if hasattr(store, "meta") else {}
    opened: dict[str, object] = {}
    out = []
    for t in tile_ids:
        i = pos[t]
        sid = cols["slide_id"][i]
        if sid not in opened:
            meta = slides_meta.get(sid) or {}
            if "path" not in meta:
                raise ValueError(f"{store.root}: store.json names no path for slide {sid!r}")
            opened[sid] = open_slide(meta["path"], meta.get("mpp"))
        out.append(TileSource(opened[sid], int(cols["x"][i]), int(cols["y"][i]), int(cols["size0"][i]),
                              int(store.tile_px)))
    return out
