"""Neighbour search through the code path the audit and the release filter use.

Two measurements, each appending a row to benchmarks/RESULTS.md:

``--mode search`` (default): one :class:`synthpath.audit.neighbours.NeighbourIndex` over a
bank of ``--base`` random L2-normalised ``--dim``-d vectors (float16, as the filter stores
them), then ``--queries`` queries searched in one call (the audit's bulk search). The bank
upload + norms are timed separately from the search. The GPU target is 100k x 1M at
d = 1280 in under 10 s on one H100::

    python benchmarks/bench_neighbours.py --queries 100000 --base 1000000 --dim 1280 --device cuda

``--mode filter``: the release filter's per-batch cost. A :class:`ReleaseFilter` over a
bank of ``--base`` training tiles in the pixel space (real feature width, random values),
then ``--calls`` calls of ``--batch`` generated-size tiles (the filter's batch in synthesis
is 16): the per-call time is the embedding of the query views plus the search against the
resident bank, with no bank upload after the first call::

    python benchmarks/bench_neighbours.py --mode filter --base 50000 --batch 16 --tile-px 64

Times are wall-clock seconds and process CPU seconds (the CPU figure is the one to read on
a shared machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import time
from pathlib import Path

import torch

from synthpath.audit.neighbours import NeighbourIndex


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _append(out: Path, heading: str, header: str, line: str) -> None:
    text = out.read_text() if out.exists() else ""
    with out.open("a") as f:
        if heading not in text:
            f.write(f"\n{heading}\n\n{header}\n")
        f.write(line + "\n")


def bench_search(a, dev: torch.device) -> str:
    g = torch.Generator().manual_seed(0)
    bank = torch.empty(a.base, a.dim, dtype=torch.float16)
    for s in range(0, a.base, 65536):  # generated in chunks to keep host memory low
        bank[s:s + 65536] = torch.nn.functional.normalize(torch.randn(min(65536, a.base - s), a.dim, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(a.queries, a.dim, generator=g), dim=1)
    q[: min(100, a.queries)] = bank[: min(100, a.queries)].float()  # planted exact matches, checked below
    NeighbourIndex(bank[:4096], device=dev, precision=a.precision).search(q[:64], a.k)  # warm-up (kernels)
    _sync(dev)
    t0, c0 = time.perf_counter(), _cpu()
    index = NeighbourIndex(bank, device=dev, precision=a.precision)
    index._prepare(1)
    _sync(dev)
    t1, c1 = time.perf_counter(), _cpu()
    nb = index.search(q, a.k)
    _sync(dev)
    t2, c2 = time.perf_counter(), _cpu()
    hits = int((nb.index[: min(100, a.queries), 0] == torch.arange(min(100, a.queries))).sum())
    if hits != min(100, a.queries):
        raise SystemExit(f"planted exact matches found {hits} of {min(100, a.queries)}: the search is wrong")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    prec = "bf16 + fp32 re-rank" if index.use_bf16 else "fp32"
    pairs = a.queries * a.base / max(t2 - t1, 1e-9)
    return (f"| {dt.date.today()} | {name} | search | {a.queries} x {a.base} | {a.dim} | {a.k} | {prec} "
            f"| {t1 - t0:.2f} | {t2 - t1:.2f} | {c2 - c1:.1f} | {pairs:.3g} |")


def bench_filter(a, dev: torch.device) -> str:
    from synthpath.audit.filter import ReleaseFilter
    from synthpath.features import PixelSpace

    space = PixelSpace(a.tile_px, device=dev)
    g = torch.Generator().manual_seed(0)
    w = space.view_dim
    bank = torch.randn(a.base, space.parts, w, generator=g)
    bank = torch.nn.functional.normalize(bank, dim=-1).reshape(a.base, space.parts * w).half()
    th = {"pixel": {0: {"d1": 0.2, "cal": 0.5}}}
    flt = ReleaseFilter({"pixel": space}, {("pixel", 0): bank}, th, n=10, levels=[1.0], device=dev)
    x = torch.rand(a.batch, 3, a.tile_px, a.tile_px, generator=g) * 2 - 1
    t0, c0 = time.perf_counter(), _cpu()
    flt(x, 0)  # first call: the bank goes to the device (once)
    _sync(dev)
    t1, c1 = time.perf_counter(), _cpu()
    for _ in range(a.calls):
        flt(x, 0)
    _sync(dev)
    t2, c2 = time.perf_counter(), _cpu()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return (f"| {dt.date.today()} | {name} | filter | {a.batch} tiles x {a.base} bank tiles ({space.n_views} views, "
            f"{space.parts} parts, {w}-d) | {t1 - t0:.2f} | {(t2 - t1) / a.calls:.2f} | {(c2 - c1) / a.calls:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("search", "filter"), default="search")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--base", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    ap.add_argument("--batch", type=int, default=16, help="filter mode: tiles per filter call")
    ap.add_argument("--calls", type=int, default=3, help="filter mode: timed calls after the first")
    ap.add_argument("--tile-px", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    out = Path(a.out)
    if a.mode == "search":
        line = bench_search(a, dev)
        _append(out, "## neighbour search: NeighbourIndex (bench_neighbours.py --mode search)",
                "| date | device | mode | queries x bank | dim | k | precision | bank upload + norms s | search s "
                "| search CPU s | pairs/s |\n|---|---|---|---|---|---|---|---|---|---|---|", line)
    else:
        line = bench_filter(a, dev)
        _append(out, "## release filter per-batch cost (bench_neighbours.py --mode filter)",
                "| date | device | mode | batch x bank | first call s (bank upload) | per call s | per call CPU s |\n"
                "|---|---|---|---|---|---|---|", line)
    print(line)


if __name__ == "__main__":
    main()
