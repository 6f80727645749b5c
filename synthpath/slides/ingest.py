"""The ingest stage: slides + labels -> tile store (docs/architecture.md §1).

For each slide (in parallel across slides): open it, resolve its mpp, detect tissue on a
thumbnail (and save the overlay to ``masks/<slide_id>.png``), plan the nested tiles, read
them and write them to a per-slide temporary Parquet file. Then split patients into
train/holdout (which needs every slide's patients) and stream the temporary files into
the store's shards with the split column added.

Reading: tiles of one coarsest-level tree share reads. For each tile level the source is
the pyramid level closest above its resolution; one block per (ancestor tile, pyramid
level) is read with ``read_region`` and every tile of the tree at that resolution is
resampled out of it (Lanczos, exact sub-pixel box). Blocks are kept at most
``MAX_BLOCK_PX`` on a side, so nothing close to a whole level-0 slide is ever read.

A slide that cannot be opened or read is reported by path and reason and skipped; the
stage fails only when no slide succeeds, or on the first failure in strict mode. Label
files are checked before any slide is read, and an unknown class stops the stage.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import shutil
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from ..interrupt import disk_problem
from ..pipeline import StageContext, StageError
from ..recipe import Recipe, TissueConfig
from ..tiles.store import SCHEMA, TileStoreWriter, encode_png, tile_id
from .labels import LabelError, Region, rasterize, read_geojson, read_labels_csv, region_decider
from .mpp import MppError
from .reader import SlideOpenError, open_slide
from .split import assign_splits
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


# --------------------------------------------------------------------------- the stage
def _slide_entries(recipe: Recipe) -> list[tuple[str, object]]:
    """(slide_id, SlideEntry-like) for the recipe's slides and slide folder."""
    from ..recipe import SlideEntry

    entries = list(recipe.data.slides)
    if recipe.data.slide_dir is not None:
        listed = {Path(e.path).resolve() for e in entries}
        for p in sorted(Path(recipe.data.slide_dir).glob(recipe.data.slide_glob)):
            if p.is_file() and p.resolve() not in listed:
                entries.append(SlideEntry(path=p))
    out, seen = [], {}
    for e in entries:
        sid = e.slide_id or Path(e.path).stem
        if sid in seen:
            raise StageError(f"two slides have the id {sid!r}: {seen[sid]} and {e.path}; set data.slides[].slide_id")
        seen[sid] = e.path
        out.append((sid, e))
    if not out:
        raise StageError(f"no slides found: data.slides is empty and data.slide_glob {recipe.data.slide_glob!r} matches "
                         f"nothing in data.slide_dir {recipe.data.slide_dir}; set data.slide_glob (e.g. '*.tiff')")
    return out


def build_jobs(recipe: Recipe, workdir: Path) -> list[SlideJob]:
    """Resolve every slide's patient, label, regions and mpp override; label errors raise
    :class:`StageError` before any slide is read."""
    data = recipe.data
    classes = list(data.classes)
    try:
        csv_labels = read_labels_csv(data.labels_csv, classes) if data.labels_csv else {}
    except (LabelError, OSError) as e:
        raise StageError(str(e)) from None
    entries = _slide_entries(recipe)
    ids = {sid for sid, _ in entries}
    for sid in data.mpp_overrides:
        if sid not in ids:
            log.warning("data.mpp_overrides names slide %r, which is not among the slides", sid)
    tiling = recipe.ingest.tiling
    jobs = []
    tmp_dir = workdir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for k, (sid, e) in enumerate(entries):
        row = csv_labels.get(sid)
        patient = e.patient_id or (row.patient_id if row else None) or sid
        label = e.label or (row.label if row else None)
        if label is not None and label not in classes:
            raise StageError(f"data.slides[{k}].label: unknown label {label!r}; classes are {classes}")
        gj = e.geojson
        if gj is None and data.geojson_dir is not None:
            cand = Path(data.geojson_dir) / f"{sid}.geojson"
            gj = cand if cand.is_file() else None
        try:
            regions = read_geojson(gj, classes) if gj is not None else None
        except LabelError as err:
            raise StageError(str(err)) from None
        override = e.mpp if e.mpp is not None else data.mpp_overrides.get(sid)
        jobs.append(SlideJob(
            slide_id=sid, path=Path(e.path), patient_id=patient, mpp_override=override,
            slide_label=classes.index(label) if label is not None else None, regions=regions,
            classes=classes, levels=list(recipe.levels), tile_px=recipe.tile_px,
            tissue=recipe.ingest.tissue.model_dump(), min_label_fraction=tiling.min_label_fraction,
            unlabelled=tiling.unlabelled, mask_path=workdir / "masks" / f"{sid}.png",
            out_path=tmp_dir / f"slide-{k:05d}.parquet",
            encode_threads=max(1, (os.cpu_count() or 1) // max(1, min(recipe.ingest.workers, len(entries)))),
        ))
    return jobs


def _ignore_sigint() -> None:
    """Worker initializer: Ctrl-C reaches the whole process group; only the parent acts on it
    (it stops the workers), so the workers print no KeyboardInterrupt tracebacks."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_jobs(jobs: list[SlideJob], workers: int, strict: bool) -> list[SlideResult]:
    results: list[SlideResult | None] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc="ingest", unit="slide", disable=None)

    def done(k: int, r: SlideResult) -> None:
        results[k] = r
        bar.update(1)
        bar.set_postfix_str(f"{r.slide_id}: {r.n_tiles} tiles" if r.ok else f"{r.slide_id}: FAILED")
        if not r.ok:
            if r.disk_full:
                raise StageError(r.error)
            if strict:
                raise StageError(f"strict mode: slide {r.slide_id!r} failed: {r.error}")
            log.warning("skipping slide %s", r.error)

    try:
        if workers <= 1 or len(jobs) <= 1:
            for k, job in enumerate(jobs):
                done(k, ingest_slide(job))
        else:
            ctx = mp.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                                        initializer=_ignore_sigint) as pool:
                futs = {pool.submit(ingest_slide, job): k for k, job in enumerate(jobs)}
                try:
                    for fut in cf.as_completed(futs):
                        done(futs[fut], fut.result())
                except BaseException as e:
                    for f in futs:
                        f.cancel()
                    if not isinstance(e, Exception):  # SIGINT/SIGTERM: stop the slides being read now;
                        for proc in list((getattr(pool, "_processes", None) or {}).values()):
                            proc.terminate()  # ingest restarts its slides, so nothing is lost
                    raise
    finally:
        bar.close()
    return [r for r in results if r is not None]


def run(ctx: StageContext) -> dict:
    """Stage entry: ingest the recipe's slides into ``ctx.workdir`` (a tile store)."""
    recipe = ctx.recipe
    t0 = time.time()
    for stale in ("tiles", "tmp", "masks"):  # ingest does not resume: drop what an interrupted run left
        shutil.rmtree(ctx.workdir / stale, ignore_errors=True)
    jobs = build_jobs(recipe, ctx.workdir)
    results = _run_jobs(jobs, recipe.ingest.workers, bool(ctx.options.get("strict")))
    failed = [{"slide_id": r.slide_id, "path": r.path, "reason": r.error} for r in results if not r.ok]
    good = [r for r in results if r.ok]
    if not good:
        reasons = "\n".join(f"  - {f['reason']}" for f in failed)
        raise StageError(f"no slide could be ingested ({len(failed)} failed):\n{reasons}")

    if not any(r.n_tiles for r in good):
        raise StageError(
            f"no tile was kept from {len(good)} slide(s): every tile had less tissue than "
            f"ingest.tissue.min_tissue_fraction ({recipe.ingest.tissue.min_tissue_fraction}) or no label "
            f"(ingest.tiling.unlabelled: {recipe.ingest.tiling.unlabelled}); check masks/ in {ctx.workdir} "
            f"and the labels")
    patients = sorted({p for r in good for p in r.patients})
    split_cfg = recipe.ingest.split
    splits = assign_splits(patients, split_cfg.holdout_fraction, split_cfg.seed)
    warnings = []
    if len(patients) < 2:
        warnings.append(f"only {len(patients)} patient(s) with tiles: the holdout split is empty, so the audit "
                        f"cannot calibrate; give more patients (or GeoJSON case ids)")
    for w in warnings:
        log.warning(w)
    writer = TileStoreWriter(ctx.workdir, levels=recipe.levels, tile_px=recipe.tile_px,
                             classes=list(recipe.data.classes), shard_tiles=recipe.ingest.shard_tiles)
    for r in good:
        pf = pq.ParquetFile(r.out_path)
        for batch in pf.iter_batches(batch_size=512):
            table = pa.Table.from_batches([batch])
            split = pa.array([splits[p] for p in table.column("patient_id").to_pylist()], pa.string())
            writer.add_table(table.append_column("split", split))
    shutil.rmtree(ctx.workdir / "tmp", ignore_errors=True)

    slides_meta = {r.slide_id: {"path": r.path, "mpp": r.mpp, "mpp_source": r.mpp_source,
                                "dimensions": list(r.dimensions), "tissue_threshold": r.tissue_threshold,
                                "level_size0": r.level_size0,
                                "tiles_per_level": r.tiles_per_level, "patients": r.patients,
                                "read_region_calls": r.read_calls, "seconds": round(r.seconds, 3)} for r in good}
    meta = writer.close({"slides": slides_meta, "patient_splits": splits, "failed_slides": failed,
                         "split_seed": split_cfg.seed, "holdout_fraction": split_cfg.holdout_fraction})
    summary = summarize(ctx.workdir, meta, results, time.time() - t0)
    summary["warnings"] = warnings
    print(format_summary(summary))
    return summary


def summarize(root: Path, meta: dict, results: list[SlideResult], seconds: float) -> dict:
    index = pq.read_table(root / "index.parquet", columns=["level", "label_name", "split", "patient_id"])
    levels = index.column("level").to_pylist()
    labels = [n if n is not None else "unlabelled" for n in index.column("label_name").to_pylist()]
    split = index.column("split").to_pylist()
    pats = index.column("patient_id").to_pylist()
    n = len(levels)
    return {
        "slides": len(results),
        "slides_ok": sum(r.ok for r in results),
        "slides_failed": [{"path": r.path, "reason": r.error} for r in results if not r.ok],
        "n_tiles": n,
        "tiles_per_level": {f"{meta['levels'][k]:g}": int(c) for k, c in sorted(Counter(levels).items())},
        "tiles_per_label": dict(sorted(Counter(labels).items())),
        "tiles_per_split": dict(sorted(Counter(split).items())),
        "patients_per_split": dict(sorted(Counter(meta["patient_splits"].values()).items())),
        "patients_with_tiles_per_split": {
            s: len({p for p, sp in zip(pats, split) if sp == s}) for s in sorted(set(split))},
        "mpp": {r.slide_id: [r.mpp, r.mpp_source] for r in results if r.ok},
        "read_region_calls": sum(r.read_calls for r in results),
        "seconds": round(seconds, 3),
        "tiles_per_second": round(n / seconds, 1) if seconds > 0 else None,
    }


def format_summary(s: dict) -> str:
    lines = [f"ingest: {s['slides_ok']}/{s['slides']} slides, {s['n_tiles']} tiles in {s['seconds']:.1f} s "
             f"({s['tiles_per_second']} tiles/s)",
             "  per level (mpp): " + ", ".join(f"{k}: {v}" for k, v in s["tiles_per_level"].items()),
             "  per label:       " + ", ".join(f"{k}: {v}" for k, v in s["tiles_per_label"].items()),
             "  per split:       " + ", ".join(f"{k}: {v}" for k, v in s["tiles_per_split"].items()),
             "  patients:        " + ", ".join(f"{k}: {v}" for k, v in s["patients_per_split"].items())]
    for f in s["slides_failed"]:
        lines.append(f"  skipped: {f['reason']}")
    for w in s.get("warnings", []):
        lines.append(f"  warning: {w}")
    return "\n".join(lines)
