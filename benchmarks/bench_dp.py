"""DP training step time over non-DP step time, at the same physical batch.

    python benchmarks/bench_dp.py                       # CPU, tiny model, 32 px, 16 rows, 1 thread
    python benchmarks/bench_dp.py --device cuda         # the same on the GPU (bf16 autocast, channels_last)
    python benchmarks/bench_dp.py --size base --px 256 --rows 32 --device cuda --iters 10

Every variant runs the trainer's own step (:func:`synthpath.train.engine.gradient_step`)
on the same rows (tiles x noise draws) of random images with random conditions:

- ``plain``: no privacy (PlainGradients: mean, global clip, AdamW);
- ``tile``: Opacus GradSampleModule hooks + DPOptimizer, one unit per row;
- ``patient``: the same, with ``--tiles-per-patient`` rows folded into each unit;
- ``ghost-tile`` / ``ghost-patient``: the same two mechanisms with ghost clipping
  (:class:`~synthpath.train.engine.GhostGradients`: per-unit norms without per-sample
  gradients, :mod:`synthpath.train.ghost`).

Robust timing: every variant first takes ``--warmup`` untimed steps; then ``--repeats``
rounds each time ``--iters`` steps of every variant in turn (interleaved, so a change in the
machine's load hits a whole round), and the table gives the median and the range over the
rounds of the seconds per step and of the round's ratio to non-DP.

On the CPU the clock is the process's CPU seconds (``resource.getrusage``: user + system,
all threads), since the machine is shared; one torch thread by default, because idle
OpenMP threads spin and bill CPU time. On CUDA every variant runs under the same bf16
autocast (inside ``predict_v``) and, with ``--channels-last`` (default), the same
channels_last model and inputs, and the clock is wall time between ``torch.cuda.synchronize``
calls; the table adds each variant's peak GPU memory.

Prints a table and appends it to benchmarks/RESULTS.md (``--out ''``: print only).
(Reference, one H100, plain Opacus on a 124M UNet: 2.7x slower with hooks, 4.8x with functorch.)
"""

from __future__ import annotations

import argparse
import platform
import resource
import shlex
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

from synthpath.models import Cond, build_model
from synthpath.models.diffusion import diffusion_loss
from synthpath.models.registry import count_params
from synthpath.train.engine import GhostGradients, PlainGradients, PrivateGradients, Rows, gradient_step

warnings.filterwarnings("ignore", message="Full backward hook")


def make_rows_fn(rows: int, px: int, classes: int, rows_per_unit: int, device: torch.device,
                 channels_last: bool = False):
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(rows, 3, px, px, generator=g) * 2 - 1).to(device)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    cond = Cond.unconditional(rows, px, classes, 0.0, label=torch.randint(0, classes, (rows,), generator=g))
    cond = cond.replace(parent=torch.rand(rows, 3, px, px, generator=g) * 2 - 1,
                        has_parent=torch.rand(rows, generator=g) < 0.7).to(device)

    def make(chunk):
        n = len(chunk) * rows_per_unit
        unit = torch.arange(len(chunk), device=device).repeat_interleave(rows_per_unit)
        return Rows(x0=x0[:n], cond=cond.index(slice(0, n)), unit=unit,
                    weight=torch.full((n,), 1.0 / rows_per_unit, device=device))

    return make


def wrapper(kind: str, size: str, px: int, classes: int, units: int, device: torch.device,
            channels_last: bool = False):
    from opacus import GradSampleModule
    from opacus.accountants import create_accountant
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    model = build_model(size, classes, px).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if kind == "plain":
        return PlainGradients(model, opt, max_units=units, grad_clip=1.0), model
    if kind.startswith("ghost"):
        acc = create_accountant("rdp")
        return GhostGradients(model, opt, acc, sigma=1.0, max_grad_norm=1.0, expected_units=float(units),
                              sample_rate=0.01, noise_generator=torch.Generator(device=device).manual_seed(0),
                              max_units=units), model
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    dp = DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=float(units),
                     loss_reduction="mean", generator=torch.Generator(device=device).manual_seed(0))
    acc = create_accountant("rdp")
    dp.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=0.01))
    return PrivateGradients(gsm, dp, acc, max_units=units), model


LABELS = {"plain": ("non-DP", "-"), "tile": ("tile", "Opacus hooks"), "patient": ("patient", "Opacus hooks"),
          "ghost-tile": ("tile", "ghost"), "ghost-patient": ("patient", "ghost")}


class Variant:
    """One wrapper, its model and its rows, ready to time steps of."""

    def __init__(self, kind: str, args, device: torch.device):
        rpu = args.tiles_per_patient if kind.endswith("patient") else 1
        self.kind, self.units, self.device = kind, args.rows // rpu, device
        cl = device.type == "cuda" and args.channels_last
        self.grads, self.model = wrapper(kind, args.size, args.px, 2, self.units, device, cl)
        self.make = make_rows_fn(args.rows, args.px, 2, rpu, device, cl)
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.seconds: list[float] = []  # per step, one entry per timed repeat
        self.peak_gib = 0.0  # CUDA only

    def _loss(self, module, rows):
        return diffusion_loss(module, rows.x0, rows.cond, generator=self.gen)

    def steps(self, n: int) -> None:
        for _ in range(n):
            gradient_step(self.grads, list(range(self.units)), self.make, self._loss)

    def timed(self, n: int) -> None:
        """``n`` steps; appends seconds per step: wall time between two synchronisations on
        CUDA, CPU seconds of this process (user + system, every thread) on the CPU."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter() if cuda else cpu_seconds()
        self.steps(n)
        if cuda:
            torch.cuda.synchronize(self.device)
            self.peak_gib = max(self.peak_gib, torch.cuda.max_memory_allocated(self.device) / 2**30)
        self.seconds.append(((time.perf_counter() if cuda else cpu_seconds()) - t0) / n)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads), from getrusage."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def measure(kinds: list[str], args, device: torch.device) -> dict[str, Variant]:
    """Warm every variant up (untimed), then ``args.repeats`` rounds; each round times
    ``args.iters`` steps of every variant in turn, so a change in the machine's load falls on
    all variants of a round alike and the per-round ratio to non-DP cancels most of it."""
    var = {k: Variant(k, args, device) for k in kinds}
    for v in var.values():
        v.steps(args.warmup)
    for _ in range(args.repeats):
        for v in var.values():
            v.timed(args.iters)
    return var


def table(var: dict[str, Variant], args, device: torch.device, command: str) -> str:
    base = var["plain"].seconds
    cuda = device.type == "cuda"
    dev = torch.cuda.get_device_name(device) if cuda else f"CPU {platform.machine()}, {torch.get_num_threads()} thread(s)"
    prec = ("bf16 autocast" + (", channels_last" if args.channels_last else "") + "; wall seconds between "
            "cuda.synchronize() calls") if cuda else "fp32; CPU seconds of the process (getrusage user + system)"
    clock = "s/step" if cuda else "CPU s/step"
    lines = [
        f"`{command}` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)\n",
        f"- device: {dev}; {prec}",
        f"- model `{args.size}` ({count_params(var['plain'].model):,} params); tile {args.px} px; physical batch "
        f"{args.rows} rows; patient unit = {args.tiles_per_patient} rows",
        f"- {args.warmup} warm-up step(s) per variant, not timed; then {args.repeats} rounds of {args.iters} timed "
        f"steps per variant, variants interleaved within a round; ratio = the round's DP s/step over the same "
        f"round's non-DP s/step; median [min - max] over the rounds\n",
        f"| level | clipping | {clock} median [min - max] | DP / non-DP median [min - max] |"
        + (" peak GiB |" if cuda else ""),
        "|---|---|---|---|" + ("---|" if cuda else ""),
    ]
    for k, v in var.items():
        level, clip = LABELS.get(k, (k, ""))
        m, lo, hi = spread(v.seconds)
        rm, rlo, rhi = spread([a / b for a, b in zip(v.seconds, base)])
        lines.append(f"| {level} | {clip} | {m:.3f} [{lo:.3f} - {hi:.3f}] | {rm:.2f}x [{rlo:.2f} - {rhi:.2f}] |"
                     + (f" {v.peak_gib:.2f} |" if cuda else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", help="model size (tiny, small, base)")
    ap.add_argument("--px", type=int, default=32, help="tile side")
    ap.add_argument("--rows", type=int, default=16, help="physical batch: rows through the model per step")
    ap.add_argument("--tiles-per-patient", type=int, default=4, help="rows folded into one patient unit")
    ap.add_argument("--iters", type=int, default=2, help="timed steps per variant and round")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (median and spread over these)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before the first round")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared CPU, idle OpenMP threads spin and bill CPU "
                         "time to the process; 0 = leave torch's default)")
    ap.add_argument("--variants", default="plain,tile,patient,ghost-tile,ghost-patient")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                    help="channels_last model and inputs on CUDA (every variant alike)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")),
                    help="append the table to this file ('' = print only)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.iters < 1 or args.warmup < 0:
        ap.error("--repeats and --iters must be at least 1, --warmup at least 0")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but no CUDA device is available")
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    kinds = [k.strip() for k in args.variants.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in LABELS]
    if unknown:
        ap.error(f"unknown --variants {unknown}; choose from {', '.join(LABELS)}")
    if "plain" not in kinds:
        kinds.insert(0, "plain")
    command = "python benchmarks/bench_dp.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = table(measure(kinds, args, device), args, device, command.strip())
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n## bench_dp.py\n\n" + text)


if __name__ == "__main__":
    main()
