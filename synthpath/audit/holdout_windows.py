"""More held-out real windows for the copy rule's false-positive rate.

With 43 held-out tiles at a level, a 1% threshold can only flag 0 or 1 of them, so the
rate on the grid tiles alone says little. :func:`offset_windows` cuts further real windows
of the held-out patients: every window at an offset of a multiple of ``tile_px / steps``
from a held-out tile that lies wholly inside held-out tiles *of the same patient* at the
same level (stitched from the store's own tile images, so no pixel of another patient, in
particular of a training patient, is in it and the pixels are exactly the ingest's).
Neighbouring windows overlap, so they are not independent draws: the exact binomial
interval of :func:`rate_interval` is the interval for independent windows and is narrower
than the truth; the per-patient counts show how clustered the flags are.
"""

from __future__ import annotations

import numpy as np


def offset_windows(store, level: int, *, split: str = "holdout", steps: int = 4):
    """(images uint8 [M, T, T, 3], patient ids [M], (tile id, dy, dx) [M]): the windows at
    offsets (dy, dx) in multiples of ``T // steps`` px, (0, 0) excluded, of each ``split``
    tile at ``level`` whose 2x2 block of grid tiles (right, below, diagonal) all exist in the
    store with the same slide, patient, split and level."""
    idx = store.index
    cols = {c: idx.column(c).to_pylist() for c in ("tile_id", "slide_id", "patient_id", "level", "split", "x", "y",
                                                   "size0")}
    t = int(store.tile_px)
    at = {}
    for i, tid in enumerate(cols["tile_id"]):
        if cols["level"][i] == level and cols["split"][i] == split:
            at[(cols["slide_id"][i], cols["x"][i], cols["y"][i])] = i
    images, patients, where = [], [], []
    cache: dict[str, np.ndarray] = {}

    def img(i: int) -> np.ndarray:
        tid = cols["tile_id"][i]
        if tid not in cache:
            cache[tid] = store.read_images([tid])[0]
        return cache[tid]

    offs = [k * (t // steps) for k in range(steps)]
    for (slide, x, y), i in sorted(at.items(), key=lambda kv: kv[1]):
        s0, pat = cols["size0"][i], cols["patient_id"][i]
        block = [[at.get((slide, x + bx * s0, y + by * s0)) for bx in (0, 1)] for by in (0, 1)]
        if any(j is None or cols["patient_id"][j] != pat for row in block for j in row):
            continue
        big = np.concatenate([np.concatenate([img(j) for j in row], axis=1) for row in block], axis=0)
        for dy in offs:
            for dx in offs:
                if dy or dx:
                    images.append(big[dy:dy + t, dx:dx + t])
                    patients.append(pat)
                    where.append((cols["tile_id"][i], dy, dx))
    arr = np.stack(images) if images else np.zeros((0, t, t, 3), dtype=np.uint8)
    return arr, np.array(patients), where


def rate_interval(k: int, n: int, confidence: float = 0.95) -> dict:
    """``k`` of ``n`` flagged: the rate and its exact (Clopper-Pearson) two-sided interval."""
    from scipy.stats import binomtest

    if n <= 0:
        return {"k": int(k), "n": 0, "rate": float("nan"), "interval": [0.0, 1.0]}
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return {"k": int(k), "n": int(n), "rate": k / n, "interval": [float(ci.low), float(ci.high)]}
