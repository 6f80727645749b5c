"""Sampling throughput of a synthpath model: image-steps/s and achieved TFLOP/s.

Runs the DPM-Solver++(2M) sampler (one model forward per image-step at guidance 1) on a
batch of ``--batch`` tiles for ``--steps`` steps, after ``--warmup`` untimed runs, eager and
(with ``--compile``) ``torch.compile``d, the model prepared by
:func:`synthpath.models.prepare_model` exactly as ``generate`` prepares it (bf16 autocast,
channels-last, cudnn.benchmark on CUDA; fp32 on CPU; one compile mode); ``torch.cuda.synchronize`` around the timed region. FLOPs per forward are counted by
``torch.utils.flop_counter.FlopCounterMode`` (multiply-add = 2). Prints a table and appends
one row per mode to ``benchmarks/RESULTS.md``.

    python benchmarks/bench_sampling.py --size base --px 256 --batch 64 --steps 20 --compile
    python benchmarks/bench_sampling.py --size tiny --px 64 --batch 4 --steps 3   # CPU check

Reference (DESIGN.md): a plain-torch ~124M UNet at 256 px on one H100 did 147 img-steps/s
eager and 528 compiled (about 263 TFLOP/s).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time
from pathlib import Path

import torch

from synthpath.models import COMPILE_MODE, Cond, build_model, initial_noise, prepare_model, sample_dpmpp_2m
from synthpath.models.registry import count_params, model_cost

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Sampling throughput (bench_sampling.py)"
HEADER = (
    "| date (UTC) | device | size | px | params (M) | GFLOP/fwd | batch | steps | mode | img-steps/s | TFLOP/s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_sampling(model, dev: torch.device, px: int, batch: int, steps: int, warmup: int, repeats: int) -> float:
    """Seconds per sampler run (mean over ``repeats``) after ``warmup`` runs."""
    nc = model.num_classes if hasattr(model, "num_classes") else model._orig_mod.num_classes
    cond = Cond.unconditional(batch, px, nc, 0.0, label=0, device=dev)
    x = initial_noise((batch, 3, px, px), list(range(batch)), dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(warmup):
        sample_dpmpp_2m(model, x, cond, steps=steps, guidance=1.0)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        sample_dpmpp_2m(model, x, cond, steps=steps, guidance=1.0)
    _sync(dev)
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="base", help="model size from the registry (tiny, small, base)")
    ap.add_argument("--px", type=int, default=256, help="tile side in pixels")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args(argv)

    dev = _device(args.device)
    torch.manual_seed(0)
    model = prepare_model(build_model(args.size, 2, args.px), dev)
    cost = model_cost(args.size, args.px)
    gflop = cost["gflops"]
    params = count_params(model)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()}"

    modes = [("eager", model)]
    if args.compile:
        modes.append((f"compiled ({COMPILE_MODE})", prepare_model(model, dev, compile=True)))
    rows = []
    for mode, m in modes:
        sec = time_sampling(m, dev, args.px, args.batch, args.steps, args.warmup, args.repeats)
        ips = args.batch * args.steps / sec
        rows.append({
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "device": dev_name + (" bf16" if dev.type == "cuda" else " fp32"),
            "size": args.size, "px": args.px, "params_m": params / 1e6, "gflop": gflop,
            "batch": args.batch, "steps": args.steps, "mode": mode,
            "img_steps_s": ips, "tflops": ips * gflop / 1e3,
        })
    for r in rows:
        print(f"{r['device']} | {r['size']} {r['px']}px {r['params_m']:.1f}M {r['gflop']:.1f} GFLOP/fwd | "
              f"B{r['batch']} x {r['steps']} steps | {r['mode']}: {r['img_steps_s']:.1f} img-steps/s, {r['tflops']:.2f} TFLOP/s")
    if not args.no_write:
        text = RESULTS.read_text() if RESULTS.exists() else "# synthpath benchmark results\n"
        sections = [ln for ln in text.splitlines() if ln.startswith("## ")]
        with RESULTS.open("a") as fh:
            if not RESULTS.exists() or not text.strip():
                fh.write("# synthpath benchmark results\n")
            if not sections or sections[-1] != SECTION:
                # rows are appended at the end, so open our own table when another one is last
                fh.write(f"\n{SECTION}\n\n" + HEADER)
            for r in rows:
                fh.write(f"| {r['date']} | {r['device']} | {r['size']} | {r['px']} | {r['params_m']:.1f} | {r['gflop']:.1f} | "
                         f"{r['batch']} | {r['steps']} | {r['mode']} | {r['img_steps_s']:.1f} | {r['tflops']:.2f} |\n")
    return rows


if __name__ == "__main__":
    main()
