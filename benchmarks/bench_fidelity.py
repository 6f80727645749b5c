"""Speed of the fidelity metrics (FID, KID, improved precision/recall) on feature arrays.

    python benchmarks/bench_fidelity.py [--n 2000] [--dim 1280]

Prints the timings and appends a row to benchmarks/results_fidelity.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from synthpath.evaluate import fidelity as fid


def timed(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000, help="samples per set")
    ap.add_argument("--dim", type=int, default=1280, help="feature dimension (EfficientNet-Lite0: 1280)")
    ap.add_argument("--kid-subsets", type=int, default=100)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    real = rng.normal(size=(args.n, args.dim))
    synth = rng.normal(size=real.shape) * 1.1 + 0.05  # an independent, slightly different set
    f, t_fid = timed(fid.frechet_distance, real, synth)
    k, t_kid = timed(fid.kernel_inception_distance, real, synth, subsets=args.kid_subsets, subset_size=1000)
    pr, t_pr = timed(fid.precision_recall, real, synth)
    line = (f"| {datetime.now(timezone.utc):%Y-%m-%d %H:%M} | {platform.processor() or platform.machine()} "
            f"({torch.get_num_threads()} threads) | {args.n} x {args.dim} | {t_fid:.2f} | {t_kid:.2f} "
            f"({args.kid_subsets} subsets) | {t_pr:.2f} | FID {f:.3f}, KID {k['mean']:.4f}, "
            f"P {pr['precision']:.3f} R {pr['recall']:.3f} |")
    print(line)
    out = Path(__file__).with_name("results_fidelity.md")
    if not out.exists():
        out.write_text("# Fidelity metric timings (seconds)\n\n| when | cpu | n x dim | FID | KID | P/R (k=3) | values |\n"
                       "|---|---|---|---|---|---|---|\n")
    with out.open("a") as fh:
        fh.write(line + "\n")


if __name__ == "__main__":
    main()
