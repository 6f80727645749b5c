"""Exact nearest-neighbour search throughput (synthetic x training pairs per second).

Runs :func:`synthpath.audit.neighbours.knn` on random L2-normalised features and appends
a row to benchmarks/RESULTS.md. The lead's target: 100k synthetic x 1M training tiles,
d=1280, under 5 minutes on one H100:

    python benchmarks/bench_neighbours.py --queries 100000 --base 1000000 --dim 1280 --device cuda --fast
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import torch

from synthpath.audit.neighbours import knn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--base", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fast", action="store_true", help="bf16 candidate search + fp32 re-rank (CUDA only)")
    ap.add_argument("--query-chunk", type=int, default=8192)
    ap.add_argument("--base-chunk", type=int, default=131072)
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    a = ap.parse_args()
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(a.queries, a.dim, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(a.base, a.dim, generator=g), dim=1)
    if dev.type == "cuda":  # the base stays in host memory as float16, as the release filter keeps it
        b = b.half().pin_memory()
    knn(q[:64], b[:4096], a.k, device=dev, fast=a.fast)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    knn(q, b, a.k, device=dev, fast=a.fast, query_chunk=a.query_chunk, base_chunk=a.base_chunk)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    pairs = a.queries * a.base / sec
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    line = (f"| {dt.date.today()} | {name} | {a.queries} x {a.base} | {a.dim} | {a.k} | {'bf16+rerank' if a.fast else 'fp32'} "
            f"| {sec:.2f} | {pairs:.3g} | {2 * a.dim * pairs / 1e12:.2f} |")
    print(line)
    out = Path(a.out)
    if not out.exists() or "## neighbour search" not in out.read_text():
        with out.open("a") as f:
            f.write("\n## neighbour search (bench_neighbours.py)\n\n| date | device | queries x base | dim | k | "
                    "precision | seconds | pairs/s | TFLOP/s |\n|---|---|---|---|---|---|---|---|---|\n")
    with out.open("a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
