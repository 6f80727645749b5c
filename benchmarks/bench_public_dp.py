"""Public pretraining + private fine-tuning, side by side on the demo slide (issue 14).

Each row is a full pipeline run (ingest, train, audit, generate, export, evaluate: the real
stages, :func:`synthpath.pipeline.build`) of recipes/demo.yaml on its PRIVATE regions
(demo_private_regions.geojson: 14 train and 6 holdout patients), with the same epsilon, steps,
audit, generation and evaluation settings; only the start and what DP-SGD updates differ:

- ``scratch``: patient-level DP from a random init, every parameter (``train.init_from: null``);
- ``all``: the shipped public checkpoint + patient-level DP on every parameter;
- ``subset``: the public checkpoint + patient-level DP on ``privacy.trainable`` as the demo
  recipe sets it (the default);
- ``public_only``: the public checkpoint with no private fine-tuning (one optimizer step at
  learning rate 1e-12 and no DP: the weights stay the public ones to float precision);
- ``nondp``: the public checkpoint fine-tuned on the private patients WITHOUT DP, every
  parameter, same steps, 8 tiles per step (the DP rows' expected 2 patients x 4 tiles).

Columns: FID at 20x in EfficientNet-Lite0 features (ImageNet weights, evaluate.feature_px
input), TSTR balanced accuracy at 20x with its 95% Student-t CI over classifier seeds (test
set: the real holdout patients), the audit's membership-inference ROC AUC with its bootstrap
95% CI and TPR at 1% FPR, and the audit verdict. Every row exports even if its audit fails
(``export.allow_failed_audit``), so that each row is evaluated; the verdict column says.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_public_dp.py --work /tmp/bench_public_dp \
        --rows scratch,all,subset,public_only,nondp --out /tmp/bench_public_dp.md

Rows can run in separate processes (``--rows subset``) and the table be assembled afterwards
from the run folders (``--table-only``).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo.yaml"
COMMON = ["export.allow_failed_audit=true", "train.sample_every=100000"]
ROWS = {
    "scratch": ("DP from scratch (`all`)", ["train.init_from=null", 'privacy.trainable="all"']),
    "all": ("public-pretrained + DP `all`", ['privacy.trainable="all"']),
    "subset": ("public-pretrained + DP `{trainable}` (demo default)", []),
    "public_only": ("public-only, no private fine-tuning", ["privacy.enabled=false", "train.steps=1", "train.lr=1e-12",
                                                            "train.weight_decay=0", "train.checkpoint_every=1"]),
    "nondp": ("public-pretrained + non-DP `all` on the private data", ["privacy.enabled=false", "train.batch_size=8",
                                                                       'privacy.trainable="all"']),
}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_row(name: str, work: Path) -> None:
    from synthpath.pipeline import build
    from synthpath.recipe import load_recipe

    out = work / name
    recipe = load_recipe(RECIPE, [f"output_dir={out}", *COMMON, *ROWS[name][1]])
    shared = work / "ingest"
    if not (out / "ingest" / "manifest.json").is_file():
        if not (shared / "manifest.json").is_file():
            build(recipe, until="ingest", options={"progress": False})
            shutil.copytree(out / "ingest", shared)
        else:
            out.mkdir(parents=True, exist_ok=True)
            shutil.copytree(shared, out / "ingest")
    t0 = cpu_seconds()
    build(recipe, options={"progress": False})
    (out / "bench_cpu_seconds.json").write_text(json.dumps({"cpu_seconds": round(cpu_seconds() - t0, 1)}))


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "n/a"


def table(work: Path, rows: list[str]) -> str:
    from synthpath.recipe import load_recipe

    trainable = load_recipe(RECIPE, ["output_dir=/tmp/unused"], check_files=False).privacy.trainable
    trainable = "+".join(trainable) if isinstance(trainable, list) else trainable
    lines = ["| row | ε | FID 20x (EfficientNet-Lite0) | TSTR bal. acc. 20x [95% CI] | TRTR bal. acc. 20x | "
             "MIA AUC [95% CI] | MIA TPR@1%FPR [95% CI] | audit |",
             "|---|---|---|---|---|---|---|---|"]
    for name in rows:
        out = work / name
        label = ROWS[name][0].format(trainable=trainable)
        try:
            audit = json.loads((out / "audit" / "report.json").read_text())
            ev = json.loads((out / "evaluate" / "report.json").read_text())
            led = json.loads((out / "train" / "ledger.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            lines.append(f"| {label} | not run ({type(e).__name__}: {Path(getattr(e, 'filename', '') or '').name}) "
                         "| | | | | | |")
            continue
        h = ev["headline"]["20x"]
        mia = audit["mia"]
        tpr = mia["tpr_at_fpr"]["0.01"]["tpr"]
        tpr_ci = mia["intervals"]["tpr_at_fpr"]["0.01"]
        eps = f"{led['epsilon']:.2f}" if led.get("enabled") else "none (no DP)"
        lines.append(
            f"| {label} | {eps} | {h['fid']:.1f} | {h['tstr_balanced_accuracy']:.3f} "
            f"{_fmt_ci(h.get('tstr_balanced_accuracy_ci95'))} | {h['trtr_balanced_accuracy']:.3f} | "
            f"{mia['auc']:.3f} {_fmt_ci(mia['intervals']['auc'])} | {tpr:.3f} {_fmt_ci(tpr_ci)} | "
            f"{'passed' if audit.get('passed') else 'FAILED'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise SystemExit(f"unknown row(s) {bad}; choose from {list(ROWS)}")
    if not args.table_only:
        import torch

        torch.set_num_threads(1)
        for r in rows:
            run_row(r, work)
    md = table(work, rows)
    print(md)
    if args.out:
        Path(args.out).write_text(md + "\n")


if __name__ == "__main__":
    main()
