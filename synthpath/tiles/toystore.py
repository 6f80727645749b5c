"""A small nested tile store of synthetic H&E-like tissue, for trainer tests and benchmarks.

Each patient is one synthetic slide (:func:`synthpath.slides.testdata.tissue_image`), cut
into ``n_levels`` nested levels (each coarse tile has 2x2 children at the next level), with
a label per coarse tile that its children inherit. It is written with the public tile-store
writer, so the trainer reads it exactly as it reads a store made by ingest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..slides.testdata import tissue_image
from .store import TileStore, write_tile_store


def make_toy_store(root: Path | str, *, n_patients: int = 6, tile_px: int = 16, n_levels: int = 2,
                   coarse_tiles: int = 2, holdout_patients: int = 1, tiles_per_patient_limit: int | None = None,
                   classes: tuple[str, ...] = ("stroma", "tumour"), seed: int = 0) -> TileStore:
    """Write the store into ``root`` and return it.

    ``coarse_tiles`` coarse tiles per slide in a row; the last ``holdout_patients`` patients
    are the holdout split. ``tiles_per_patient_limit`` keeps only that many tiles of the
    first patient (to exercise sampling with replacement).
    """
    levels = [2.0 ** (n_levels - 1 - i) for i in range(n_levels)]  # e.g. [2.0, 1.0], finest = 1 mpp
    fine = 2 ** (n_levels - 1)  # finest pixels per coarse pixel
    records = []
    for p in range(n_patients):
        slide = f"slide{p:02d}"
        w0 = coarse_tiles * tile_px * fine
        h0 = tile_px * fine
        base = tissue_image(w0, h0, seed=seed * 1000 + p, n_blobs=3 + p % 3)
        kept = 0
        for lv, mpp in enumerate(levels):
            f = int(round(mpp / levels[-1]))
            img = np.asarray(Image.fromarray(base).resize((w0 // f, h0 // f), Image.BILINEAR))
            size0 = tile_px * f
            for ty in range(h0 // size0):
                for tx in range(w0 // size0):
                    if tiles_per_patient_limit is not None and p == 0 and kept >= tiles_per_patient_limit:
                        continue
                    x, y = tx * size0, ty * size0
                    coarse_col = x // (tile_px * fine)
                    label = (coarse_col + p) % len(classes)
                    parent = None
                    if lv > 0:
                        ps = tile_px * int(round(levels[lv - 1] / levels[-1]))
                        parent = f"{slide}/L{lv - 1}/{(x // ps) * ps}_{(y // ps) * ps}"
                    crop = img[ty * tile_px:(ty + 1) * tile_px, tx * tile_px:(tx + 1) * tile_px]
                    records.append({
                        "tile_id": f"{slide}/L{lv}/{x}_{y}", "slide_id": slide, "patient_id": f"case{p:02d}",
                        "level": lv, "mpp": mpp, "x": x, "y": y, "size0": size0, "parent_id": parent,
                        "label": label, "label_name": classes[label],
                        "split": "holdout" if p >= n_patients - holdout_patients else "train",
                        "tissue_fraction": 1.0, "image": np.ascontiguousarray(crop),
                    })
                    kept += 1
    # a tile whose parent was dropped by the limit must not name it
    ids = {r["tile_id"] for r in records}
    for r in records:
        if r["parent_id"] is not None and r["parent_id"] not in ids:
            r["parent_id"] = None
    return write_tile_store(root, records, levels=levels, tile_px=tile_px, classes=list(classes))
