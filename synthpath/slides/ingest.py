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
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..pipeline import StageContext, StageError
from ..recipe import Recipe
from ..tiles.store import TileStoreWriter
from .labels import LabelError, read_geojson, read_labels_csv
from .slide_job import SlideJob, SlideResult, ingest_slide, read_planned_tiles  # noqa: F401  (read_planned_tiles: re-exported for tests and bench_ingest)
from .split import assign_splits

log = logging.getLogger("synthpath.ingest")


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
