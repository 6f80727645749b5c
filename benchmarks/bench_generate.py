"""Benchmark: whole-slide synthesis cost per generated tile as the slide grows, and the
projected time of a URCDM-size slide (20x, ~40,000 px square) from per-tile costs at scale.

For each ``--layouts`` entry (default 4x4, 8x8, 16x16 coarsest tiles) one whole slide is
synthesised (every tile of every level, as ``generate.mode: slides`` does) and timed:

- **total**: all of ``synthesize_slides``;
- **model**: the model's forwards alone (forward hooks on the prepared model);
- **host**: total - model, i.e. everything a fast GPU leaves to the host (parent crops,
  known masks, feathering, canvases, batching, the solver's arithmetic on the device).

On the CPU the clock is CPU seconds of this process (``time.process_time``), not wall clock,
so other jobs on a shared machine do not inflate it; on CUDA it is wall clock with
``torch.cuda.synchronize`` around each forward. Per generated tile, the largest layout must
cost no more than 1.25x the smallest, in total and host-side (cost linear in slide area).

Projection: a slide of ``--target-px`` px square at the finest level, with the same levels
and sampler, is ``sum over levels of tiles x steps`` model tile-steps plus ``tiles`` host
units; it is priced with the model seconds per tile-step and the host seconds per tile
*measured at the largest layout* (no 2x2 extrapolation). Run it on the GPU for the real figure:

    python benchmarks/bench_generate.py --device cuda --size base --tile-px 256 --steps 25 \\
        --levels 2.0 1.0 0.5 --layouts 2x2 4x4 8x8 --batch-size 128 --compile
    python benchmarks/bench_generate.py            # CPU, tiny model, 32 px tiles, 2 steps

Prints a table and appends a section to benchmarks/RESULTS.md (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

from synthpath.generate.synthesis import synthesize_slides
from synthpath.generate.tiling import level_grids
from synthpath.models import build_model, prepare_model
from synthpath.models.registry import count_params
from synthpath.recipe import SamplerConfig
from synthpath.units import level_name

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


class Clock:
    """CPU seconds on the CPU, synchronised wall seconds on CUDA; accumulates model forwards."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.model_s = 0.0
        self._t0 = 0.0

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    def attach(self, model: torch.nn.Module) -> None:
        model.register_forward_pre_hook(lambda *a: setattr(self, "_t0", self.now()))
        model.register_forward_hook(lambda *a: setattr(self, "model_s", self.model_s + self.now() - self._t0))


def slide_work(layout, levels, px, steps, zoom_start, overlap=None):
    """(tiles, model tile-steps) of one whole slide with synthesis's tile grid."""
    grids = level_grids(layout, levels, px, px // 4 if overlap is None else overlap)
    tiles = [len(ys) * len(xs) for ys, xs in grids]
    per = [steps] + [max(1, math.ceil(steps * zoom_start))] * (len(levels) - 1)
    return tiles, sum(n * s for n, s in zip(tiles, per))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    ap.add_argument("--tile-px", type=int, default=32)
    ap.add_argument("--levels", type=float, nargs="+", default=[2.0, 1.0], help="mpp, coarse to fine")
    ap.add_argument("--layouts", nargs="+", default=["4x4", "8x8", "16x16"])
    ap.add_argument("--sampler", default="dpmpp_2m", choices=["ddim", "dpmpp_2m"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--zoom-start", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="torch.compile (prepare_model's one mode)")
    ap.add_argument("--memmap", action="store_true", help="canvases as memory maps in a temporary folder")
    ap.add_argument("--target-px", type=int, default=41344, help="finest-level side of the projected slide")
    ap.add_argument("--target-levels", type=float, nargs="+", default=[2.0, 1.0, 0.5],
                    help="levels of the projected slide (5x/10x/20x)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    levels = [float(x) for x in args.levels]
    cfg = SamplerConfig(name=args.sampler, steps=args.steps, guidance_scale=args.guidance, zoom_start=args.zoom_start)
    torch.manual_seed(0)
    raw = build_model(args.size, 2, args.tile_px)
    n_params = count_params(raw)
    model = prepare_model(raw, device, compile=args.compile)
    clock = Clock(device)
    clock.attach(model)
    fwd_per_step = 2 if args.guidance != 1.0 else 1  # guided: conditional + null-label rows in one forward

    def run(layout, seed):
        with tempfile.TemporaryDirectory() as wd, torch.no_grad():
            return synthesize_slides(model, [seed % 2], layout, levels, [seed], sampler=cfg, device=device,
                                     batch_size=args.batch_size, workdir=wd if args.memmap else None)[0]

    run((2, 2), 10_000)  # warm-up (allocator, compile, cuDNN autotune)
    rows = []
    for lay in args.layouts:
        layout = tuple(int(v) for v in lay.lower().split("x"))
        clock.model_s = 0.0
        t0 = clock.now()
        pyr = run(layout, 1)
        total = clock.now() - t0
        tiles, tile_steps = slide_work(layout, levels, args.tile_px, args.steps, args.zoom_start)
        assert sum(pyr.tiles_per_level) == sum(tiles)
        n = sum(tiles)
        rows.append({"layout": lay, "tiles": n, "tile_steps": tile_steps, "total_s": total, "model_s": clock.model_s,
                     "host_s": total - clock.model_s, "total_ms_tile": 1e3 * total / n,
                     "host_ms_tile": 1e3 * (total - clock.model_s) / n, "batch_fill": pyr.batch_fill,
                     "px": f"{pyr.levels[-1].shape[0]}²"})
    base, big = rows[0], rows[-1]
    ratio_total = big["total_ms_tile"] / base["total_ms_tile"]
    ratio_host = big["host_ms_tile"] / base["host_ms_tile"]

    # projection from the largest layout's per-tile costs
    model_s_per_tile_step = big["model_s"] / big["tile_steps"]
    host_s_per_tile = big["host_s"] / big["tiles"]
    tl = [float(x) for x in args.target_levels]
    f = round(tl[0] / tl[-1])
    side0 = math.ceil(args.target_px / f / args.tile_px)
    t_tiles, t_steps = slide_work((side0, side0), tl, args.tile_px, args.steps, args.zoom_start)
    proj_s = t_steps * model_s_per_tile_step + sum(t_tiles) * host_s_per_tile

    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU {platform.machine()} x{torch.get_num_threads()} threads")
    clock_name = "wall s (CUDA-synchronised)" if device.type == "cuda" else "CPU s (process_time)"
    hdr = "| layout | finest px | tiles | tile-steps | total s | model s | host s | total ms/tile | host ms/tile | batch fill |"
    lines = [hdr, "|---" * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['px']} | {r['tiles']} | {r['tile_steps']} | {r['total_s']:.2f} | "
                     f"{r['model_s']:.2f} | {r['host_s']:.2f} | {r['total_ms_tile']:.2f} | {r['host_ms_tile']:.3f} | "
                     f"{r['batch_fill']:.1f} |")
    summary = (f"per-tile cost {big['layout']} / {base['layout']}: total {ratio_total:.2f}x, host {ratio_host:.2f}x "
               f"(target <= 1.25x)")
    proj = (f"projection: {args.target_px}² px at {level_name(tl[-1])} with levels "
            f"{'/'.join(level_name(m) for m in tl)} = {side0}x{side0} coarsest tiles, {sum(t_tiles):,} tiles, "
            f"{t_steps:,} tile-steps x {fwd_per_step} forward rows -> {model_s_per_tile_step * 1e3:.3f} ms/tile-step model + "
            f"{host_s_per_tile * 1e3:.3f} ms/tile host = **{proj_s / 60:.1f} min** on this device "
            f"(model `{args.size}` at {args.tile_px} px; target <= 15 min for `base` at 256 px on one H100)")
    print("\n".join(lines))
    print(summary)
    print(proj)
    if not args.no_write:
        with open(RESULTS, "a") as fh:
            fh.write(f"\n## bench_generate.py (issue 15: cost per tile vs slide size), "
                     f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n")
            fh.write(f"- {dev_name}; clock: {clock_name}; model `{args.size}` ({n_params:,} params), tile {args.tile_px} px, "
                     f"levels {'/'.join(level_name(m) for m in levels)}; {args.sampler} {args.steps} steps, guidance "
                     f"{args.guidance}, zoom from t={args.zoom_start}; batch {args.batch_size}; compile {args.compile}; "
                     f"canvases {'memory-mapped' if args.memmap else 'in RAM'}\n\n")
            fh.write("\n".join(lines) + "\n\n")
            fh.write(f"- {summary}\n- {proj}\n")
    return {"rows": rows, "ratio_total": ratio_total, "ratio_host": ratio_host, "projection_min": proj_s / 60}


if __name__ == "__main__":
    main()
