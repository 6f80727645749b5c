"""One slide's ingest work, run in a worker process: open the slide, detect tissue, plan the
nested tiles, read them in shared blocks and write them to a per-slide temporary Parquet file.

``ingest.py`` runs these jobs across slides and merges their files into the tile store; this
module is what each job does (docs/architecture.md §1).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..interrupt import disk_problem
from ..recipe import TissueConfig
from ..tiles.store import SCHEMA, encode_png, tile_id
from .labels import Region, rasterize, region_decider
from .mpp import MppError
from .reader import SlideOpenError, open_slide
from .tiling import PlannedTile, TilingError, level_sizes, plan_tiles
from .tissue import save_mask_overlay, tissue_mask

log = logging.getLogger("synthpath.ingest")

#: Largest side, in pixels of the pyramid level read, of one shared read block.
MAX_BLOCK_PX = 2048
#: Finest tiles span at least this many cells of the label raster.
LABEL_CELLS_PER_TILE = 16
#: Largest side of the label raster.
MAX_LABEL_RASTER_PX = 8192
TMP_SCHEMA = pa.schema([f for f in SCHEMA if f.name != "split"])


@dataclass
class SlideJob:
    """Everything one worker needs to ingest one slide (picklable)."""

    slide_id: str
    path: Path
    patient_id: str
    mpp_override: float | None
    slide_label: int | None
    regions: list[Region] | None
    classes: list[str]
    levels: list[float]
    tile_px: int
    tissue: dict
    min_label_fraction: float
    unlabelled: str
    mask_path: Path
    out_path: Path
    encode_threads: int = 1


@dataclass
class SlideResult:
    slide_id: str
    path: str
    ok: bool
    error: str | None = None
    mpp: float | None = None
    mpp_source: str | None = None
    dimensions: tuple[int, int] | None = None
    tissue_threshold: float | None = None
    level_size0: list[int] = field(default_factory=list)
    tiles_per_level: list[int] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    read_calls: int = 0
    seconds: float = 0.0
    out_path: str | None = None
    disk_full: bool = False  # the failure was the output disk's (full, read-only), not the slide's

    @property
    def n_tiles(self) -> int:
        return sum(self.tiles_per_level)


# --------------------------------------------------------------------------- one slide
def _tree_order(plan: list[PlannedTile]) -> list[list[int]]:
    """Plan indices grouped by coarsest-level tree (root first)."""
    root = [0] * len(plan)
    trees: dict[int, list[int]] = {}
    for i, t in enumerate(plan):
        root[i] = i if t.parent is None else root[t.parent]
        trees.setdefault(root[i], []).append(i)
    return list(trees.values())


def read_planned_tiles(slide, plan: list[PlannedTile], tile_px: int, sizes: list[int]):
    """Return ``(tiles, calls)``: ``tiles`` yields ``(plan index, PIL tile)`` for every planned
    tile, tree by tree, sharing reads within a tree; ``calls[0]`` counts the ``read_region``
    calls made so far."""
    n_levels = len(sizes)
    src = [slide.best_level(sizes[L] / tile_px) for L in range(n_levels)]
    ds = [slide.level_downsamples[p] for p in src]
    # Grouping level: the coarsest ancestor level whose footprint at the source level fits a block.
    group = []
    for L in range(n_levels):
        g = L
        for cand in range(L + 1):
            if sizes[cand] / ds[L] <= MAX_BLOCK_PX:
                g = cand
                break
        group.append(g)
    counter = [0]

    def gen():
        # Within a tree, tiles come level by level and, at each level, grouped by ancestor,
        # so one block per (source level, grouping level) is all that needs to be held.
        slots: dict[tuple[int, int], tuple[int, Image.Image]] = {}
        for tree in _tree_order(plan):
            for i in tree:
                t = plan[i]
                a = i
                while plan[a].level > group[t.level]:
                    a = plan[a].parent
                anc = plan[a]
                slot = (src[t.level], group[t.level])
                if slot not in slots or slots[slot][0] != a:
                    slots[slot] = (a, slide.read_block(anc.x, anc.y, anc.size0, src[t.level])[0])
                    counter[0] += 1
                d = ds[t.level]
                box = ((t.x - anc.x) / d, (t.y - anc.y) / d, (t.x - anc.x + t.size0) / d, (t.y - anc.y + t.size0) / d)
                yield i, slots[slot][1].resize((tile_px, tile_px), Image.LANCZOS, box=box)

    return gen(), counter


def ingest_slide(job: SlideJob) -> SlideResult:
    """Ingest one slide into ``job.out_path``; never raises for a bad slide (the result says why)."""
    t0 = time.time()
    res = SlideResult(slide_id=job.slide_id, path=str(job.path), ok=False)
    try:
        with open_slide(job.path, job.mpp_override, slide_id=job.slide_id) as slide:
            res.mpp, res.mpp_source, res.dimensions = slide.mpp, slide.mpp_source, slide.dimensions
            sizes = level_sizes(job.levels, job.tile_px, slide.mpp, where=str(job.path))
            res.level_size0 = sizes
            tcfg = TissueConfig(**job.tissue)
            thumb, tds = slide.thumbnail(tcfg.thumbnail_px)
            mask, res.tissue_threshold = tissue_mask(thumb, tcfg)
            raster = None
            if job.regions is not None:
                w0, h0 = slide.dimensions
                lds = max(1.0, min(tds, sizes[-1] / LABEL_CELLS_PER_TILE), max(w0, h0) / MAX_LABEL_RASTER_PX)
                raster = rasterize(job.regions, w0, h0, lds)
            decide = region_decider(raster, job.slide_label, job.min_label_fraction, job.unlabelled)
            plan = plan_tiles(slide.dimensions, sizes, mask, tds, tcfg.min_tissue_fraction, decide)
            boxes = [(t.x / tds, t.y / tds, (t.x + t.size0) / tds, (t.y + t.size0) / tds) for t in plan if t.level == 0]
            save_mask_overlay(thumb, mask, job.mask_path, boxes)
            res.tiles_per_level = _write_tiles(slide, plan, sizes, job, res)
            res.patients = sorted({t.case or job.patient_id for t in plan})
            res.ok = True
    except (SlideOpenError, MppError, TilingError, OSError) as e:
        disk = disk_problem(e)
        workdir = str(job.out_path.parent.parent)
        if disk and (disk[0] != "permission denied" or workdir in str(disk[1] or "")):
            res.disk_full = True
            res.error = (f"cannot write the ingest output in {workdir}: {disk[0]} ({disk[1] or e}); "
                         f"free space or fix the folder, then run again")
        else:
            res.error = str(e) if str(job.path) in str(e) else f"{job.path}: {e}"
    except Exception as e:  # an unexpected failure on one slide must not lose the others
        res.error = f"{job.path}: {type(e).__name__}: {e}"
        log.debug("ingest of %s failed:\n%s", job.path, traceback.format_exc())
    res.seconds = time.time() - t0
    return res


def _write_tiles(slide, plan: list[PlannedTile], sizes: list[int], job: SlideJob, res: SlideResult) -> list[int]:
    """Read, PNG-encode (on ``job.encode_threads`` threads; PIL releases the GIL while
    encoding) and write the planned tiles to ``job.out_path``; return tiles per level."""
    ids = [tile_id(job.slide_id, t.level, t.x, t.y) for t in plan]
    per_level = [0] * len(sizes)
    tmp = job.out_path.with_name(job.out_path.name + ".tmp")
    writer = pq.ParquetWriter(tmp, TMP_SCHEMA)
    pool = cf.ThreadPoolExecutor(job.encode_threads) if job.encode_threads > 1 else None

    def flush(chunk: list[tuple[int, Image.Image]]) -> None:
        imgs = [img for _, img in chunk]
        pngs = list(pool.map(encode_png, imgs)) if pool else [encode_png(im) for im in imgs]
        rows = []
        for (i, _), png in zip(chunk, pngs):
            t = plan[i]
            rows.append({
                "tile_id": ids[i], "slide_id": job.slide_id, "patient_id": t.case or job.patient_id,
                "level": t.level, "mpp": job.levels[t.level], "x": t.x, "y": t.y, "size0": t.size0,
                "parent_id": None if t.parent is None else ids[t.parent],
                "label": t.label, "label_name": job.classes[t.label] if t.label >= 0 else None,
                "tissue_fraction": t.tissue_fraction, "image": png,
            })
            per_level[t.level] += 1
        writer.write_table(pa.Table.from_pylist(rows, schema=TMP_SCHEMA))

    try:
        tiles, counter = read_planned_tiles(slide, plan, job.tile_px, sizes)
        chunk: list[tuple[int, Image.Image]] = []
        for item in tiles:
            chunk.append(item)
            if len(chunk) >= 256:
                flush(chunk)
                chunk = []
        if chunk:
            flush(chunk)
        res.read_calls = counter[0]
    finally:
        writer.close()
        if pool:
            pool.shutdown()
    os.replace(tmp, job.out_path)
    res.out_path = str(job.out_path)
    return per_level
