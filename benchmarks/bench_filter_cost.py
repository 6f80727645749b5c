"""CPU cost per tile of the pixel space's release-filter check on the demo tile store.

For each level, the training tiles of that level form the filter's bank (as the audit
builds it) and the held-out tiles are checked in batches of ``--batch`` (as generation
does). Reported per tile, in CPU seconds (``resource.getrusage``, so the figure does not
depend on what else the shared machine runs): ``embed_views`` alone (every query view
materialised), the lazy ``query_views`` (pooled maps only; where the code has it), and the
whole ``ReleaseFilter.check`` (embedding + neighbour search). Runs against whatever synthpath is
on ``PYTHONPATH``, so the same command measures two versions of the code.

    PYTHONPATH=$PWD python benchmarks/bench_filter_cost.py --store <demo run>/ingest
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

import numpy as np
import torch


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True, help="a tile store folder (the demo recipe's ingest)")
    ap.add_argument("--levels", default="2,1")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tiles", type=int, default=64, help="held-out tiles checked per level")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from synthpath.audit.filter import ReleaseFilter
    from synthpath.features import PixelSpace
    from synthpath.tiles.store import TileStore

    store = TileStore(a.store)
    idx = store.index
    cols = {c: idx.column(c).to_pylist() for c in ("tile_id", "level", "split")}
    space = PixelSpace(store.tile_px, device="cpu")
    print(f"pixel space: {space.n_views} query views, {space.parts} parts of {space.view_dim} dims")
    for lv in (int(v) for v in a.levels.split(",")):
        def ids(split: str) -> list[str]:
            return [t for t, l, s in zip(cols["tile_id"], cols["level"], cols["split"]) if l == lv and s == split]

        bank = space.embed(store.read_images(ids("train")))
        flt = ReleaseFilter({"pixel": space}, {("pixel", 0): bank}, {"pixel": {0: {"d1": 0.3, "cal": 0.7}}},
                            n=10, levels=[1.0], device="cpu")
        imgs = store.read_images(ids("holdout")[: a.max_tiles])
        x = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
        flt.check(x[:2], 0)  # warm-up (the bank index is built once)
        c0 = _cpu()
        for i in range(0, len(x), a.batch):
            space.embed_views(x[i:i + a.batch])
        c1 = _cpu()
        for i in range(0, len(x), a.batch):
            flt.check(x[i:i + a.batch], 0)
        c2 = _cpu()
        lazy = hasattr(space, "query_views")
        for i in range(0, len(x) if lazy else 0, a.batch):
            space.query_views(x[i:i + a.batch])
        c3 = _cpu()
        n = len(x)
        maps = f", query_views (lazy maps) {1000 * (c3 - c2) / n:.1f} ms CPU/tile" if lazy else ""
        print(f"level {lv} ({store.levels[lv]:g} um/px): bank {bank.shape[0]} training tiles, {n} tiles checked: "
              f"embed_views (all views) {1000 * (c1 - c0) / n:.1f} ms CPU/tile{maps}, filter check (embed + search) "
              f"{1000 * (c2 - c1) / n:.1f} ms CPU/tile", flush=True)


if __name__ == "__main__":
    main()
