"""Benchmark: slide synthesis time per level, bulk tiles/s, and the time for a URCDM-size
slide (20x, about 40,000 x 40,000 px).

What it measures (untrained weights of the named size: speed does not depend on them):

1. one slide of ``--layout`` coarsest tiles, timed level by level (synthesising levels
   ``[:1]``, ``[:2]``, ... and taking differences, so each level's figure includes its
   parent-conditioned zoom-in, not the levels above it);
2. bulk generation: ``--bulk-slides`` slides synthesised together (tiles of all slides share
   batches, as the generate stage does), reported as tiles/s and tile-steps/s;
3. the time for one slide whose finest level is ``--target-px`` square, *extrapolated* from the
   measured tile-steps/s by counting that slide's tiles and solver steps per level (a full run
   of that size does not fit in a benchmark's time; the output says it is an extrapolation).

The release filter is not included (``--filter`` is not offered: its cost depends on the
audit's feature spaces; see the audit benchmarks).

    python benchmarks/bench_generate.py --device cuda --size base --tile-px 256 --compile
    python benchmarks/bench_generate.py --device cpu --size tiny --tile-px 32 --steps 4   # smoke run

Results are printed and appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import time
from pathlib import Path

import torch

from synthpath.generate.synthesis import synthesize_slides, tile_positions, zoom_factors
from synthpath.models.registry import build_model, count_params
from synthpath.recipe import SamplerConfig
from synthpath.units import level_name

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tiles_and_steps(layout: tuple[int, int], levels: list[float], tile_px: int, steps: int, zoom_start: float):
    """Per level: (tiles sampled, solver steps per tile) for one slide, with synthesis's
    overlapping tile grid (``tile_px // 4`` overlap)."""
    out = []
    for k, f in enumerate(zoom_factors(levels)):
        h, w = layout[0] * tile_px * f, layout[1] * tile_px * f
        n = len(tile_positions(h, tile_px, tile_px // 4)) * len(tile_positions(w, tile_px, tile_px // 4))
        out.append((n, steps if k == 0 else max(1, math.ceil(steps * zoom_start))))
    return out


def timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    ap.add_argument("--tile-px", type=int, default=64)
    ap.add_argument("--levels", type=float, nargs="+", default=[2.0, 1.0, 0.5], help="mpp, coarse to fine")
    ap.add_argument("--layout", type=int, nargs=2, default=[2, 2], metavar=("ROWS", "COLS"))
    ap.add_argument("--sampler", default="dpmpp_2m", choices=["ddim", "dpmpp_2m"])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--zoom-start", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=64, help="tiles per model batch")
    ap.add_argument("--bulk-slides", type=int, default=4)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    ap.add_argument("--target-px", type=int, default=40000, help="finest-level side of the extrapolated slide")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    levels = [float(x) for x in args.levels]
    layout = (args.layout[0], args.layout[1])
    cfg = SamplerConfig(name=args.sampler, steps=args.steps, guidance_scale=1.5, zoom_start=args.zoom_start)
    torch.manual_seed(0)
    model = build_model(args.size, 2, args.tile_px).to(device).eval()
    n_params = count_params(model)
    if args.compile:
        model = torch.compile(model)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    def run(n_slides: int, lv: list[float], seed0: int = 0):
        with torch.no_grad(), autocast:
            return synthesize_slides(model, [i % 2 for i in range(n_slides)], layout, lv,
                                     [seed0 + i for i in range(n_slides)], sampler=cfg, device=device,
                                     batch_size=args.batch_size)

    # warm-up (compilation, cuDNN autotune) on the full level set
    timed(lambda: run(1, levels, 10_000), device)

    # 1. one slide, level by level
    cumulative = [timed(lambda k=k: run(1, levels[:k + 1]), device) for k in range(len(levels))]
    per_level = [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])]
    one = tiles_and_steps(layout, levels, args.tile_px, args.steps, args.zoom_start)

    # 2. bulk
    t_bulk = timed(lambda: run(args.bulk_slides, levels, 100), device)
    bulk_tiles = args.bulk_slides * sum(n for n, _ in one)
    bulk_tile_steps = args.bulk_slides * sum(n * s for n, s in one)
    tiles_s = bulk_tiles / t_bulk
    tile_steps_s = bulk_tile_steps / t_bulk

    # 3. extrapolation to a target-size slide with the same levels
    fz = zoom_factors(levels)[-1]
    side0 = math.ceil(args.target_px / fz / args.tile_px)
    big = tiles_and_steps((side0, side0), levels, args.tile_px, args.steps, args.zoom_start)
    big_tile_steps = sum(n * s for n, s in big)
    big_s = big_tile_steps / tile_steps_s

    res = {
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "size": args.size, "params": n_params, "tile_px": args.tile_px,
        "levels": "/".join(level_name(m) for m in levels), "layout": f"{layout[0]}x{layout[1]}",
        "sampler": f"{args.sampler} {args.steps} steps (zoom from t={args.zoom_start})",
        "batch": args.batch_size, "compile": args.compile,
        "per_level_s": [round(x, 3) for x in per_level],
        "per_level_tiles": [n for n, _ in one],
        "bulk": f"{args.bulk_slides} slides in {t_bulk:.2f} s",
        "tiles_per_s": round(tiles_s, 2), "tile_steps_per_s": round(tile_steps_s, 1),
        "target": f"{args.target_px}² px at {level_name(levels[-1])} ({side0}x{side0} coarsest tiles, "
                  f"{sum(n for n, _ in big)} tiles)",
        "target_extrapolated_min": round(big_s / 60, 1),
    }
    for k, v in res.items():
        print(f"{k:>26}: {v}")
    print(f"\nThe {args.target_px}² px figure is an EXTRAPOLATION from the measured tile-steps/s, not a full run.")

    new = not RESULTS.exists()
    with open(RESULTS, "a") as f:
        if new:
            f.write("# Benchmark results\n\n")
        f.write(f"\n## bench_generate.py, {res['when']}\n\n")
        f.write(f"- device: {res['device']}; model `{res['size']}` ({res['params']:,} params); tile {res['tile_px']} px; "
                f"levels {res['levels']}; sampler {res['sampler']}; batch {res['batch']}; compile {res['compile']}\n")
        f.write(f"- one slide of {res['layout']} coarsest tiles, seconds per level (tiles): "
                + ", ".join(f"{level_name(m)} {s} s ({n})" for m, s, n in zip(levels, res['per_level_s'], res['per_level_tiles']))
                + "\n")
        f.write(f"- bulk: {res['bulk']} = **{res['tiles_per_s']} tiles/s** ({res['tile_steps_per_s']} tile-steps/s)\n")
        f.write(f"- {res['target']}: **{res['target_extrapolated_min']} min, extrapolated** from tile-steps/s "
                f"(goal: < 30 min on one H100)\n")
    return res


if __name__ == "__main__":
    main()
