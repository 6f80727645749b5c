"""The ``audit`` stage: memorization + membership-inference audit, report and release gate.

What it does, in order (:func:`run_audit`):

1-4. :mod:`synthpath.audit.calibration`: the feature spaces of ``audit.feature_spaces`` (the
   ``learned`` encoder is trained on training tiles only and dropped, with a note, when it
   cannot retrieve altered held-out tiles); training features; holdout-to-train distances
   and the copy thresholds (``holdout_quantile`` quantiles); the release filter in ``filter/``.
5. :func:`synthpath.audit.sampling.draw_synthetic`: small synthetic slides drawn by
   generate's own code path (neighbours, seam inpainting, zoom-in, guidance), unfiltered;
   every grid-aligned window of every level is an audited tile (at least ``n_synthetic``).
6. Runs the release filter on them: copies per space and level, and the share of synthetic
   tiles closer to train than to holdout (train subsampled to the holdout's size).
7. The calibrated membership-inference attack (:mod:`synthpath.audit.mia`).
8. Writes ``report.json``, ``report.md``, ``roc.png`` and ``contact_sheet.png`` (real
   patient tiles: it stays here, next to ``PATIENT_IMAGES_DO_NOT_SHARE.txt``).

The gate (:func:`run`) fails the audit when
- copies are significantly more frequent than the copy rule's false-positive rate on real
  holdout tiles (one-sided exact binomial test at ``audit.alpha``), or the lower confidence
  bound of the copy fraction exceeds ``max_copy_fraction``;
- any space's closer-to-train share exceeds ``max_closer_to_train``;
- the attack's AUC exceeds ``max_mia_auc``, or the bootstrap lower bound of its TPR at 1%
  FPR exceeds ``max_mia_tpr``.
Every rate comes with its interval in the report. A failed audit raises
:class:`~synthpath.pipeline.ReleaseBlocked` after copying its report to
``<output_dir>/audit_failed/``, unless ``--allow-failed-audit`` (or
``export.allow_failed_audit``) is set; then ``report.json`` has ``"allowed_failed": true``.
Report and filter carry the binding :mod:`synthpath.audit.gate` checks before any release.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthpath.features import resolve_device
from synthpath.pipeline import ReleaseBlocked, StageContext, StageError

from .calibration import Calibration, _cat, _finite, calibrate, holdout_false_positive_rate
from .filter import FILTER_DIR, bank_index, view_chunks
from .neighbours import closer_to_train_share
from .render import PATIENT_NOTICE, _fmt, write_contact_sheet, write_patient_notice, write_report
from .sampling import draw_synthetic, mia_batches
from .stats import binomial_excess

__all__ = ["Calibration", "calibrate", "run", "run_audit"]

log = logging.getLogger("synthpath.audit")

FAILED_DIR = "audit_failed"
REPORT_FILES = ("report.json", "report.md", "contact_sheet.png", PATIENT_NOTICE, "roc.png")


def run_audit(store, model, recipe, work: Path | str, *, device=None, binding: dict | None = None) -> dict:
    """Run every check and write the report files and the release filter into ``work``.
    ``binding`` (:func:`synthpath.audit.gate.current_binding`) is recorded in both.

    Returns the report dict (also written to ``work/report.json``) without gating.
    """
    from .mia import plot_roc, run_attack

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = recipe.audit
    dev = resolve_device(device if device is not None else cfg.device)
    t_start = time.time()
    seed = int(recipe.seed)
    levels = list(store.levels)
    n_levels = len(levels)
    px = store.tile_px
    num_classes = len(store.classes)
    n = int(cfg.k_neighbours)
    q = float(cfg.holdout_quantile)

    idx = store.index
    split = idx.column("split").to_numpy(zero_copy_only=False)
    level_col = idx.column("level").to_numpy().astype(np.int64)
    label_col = idx.column("label").to_numpy().astype(np.int64)
    n_train = {k: int(((split == "train") & (level_col == k)).sum()) for k in range(n_levels)}
    n_hold = {k: int(((split == "holdout") & (level_col == k)).sum()) for k in range(n_levels)}
    if sum(n_train.values()) == 0:
        raise StageError(f"{store.root}: the tile store has no training tiles to audit against")
    if sum(n_hold.values()) == 0:
        raise StageError(f"{store.root}: the tile store has no holdout tiles, so no threshold can be calibrated; "
                         "set ingest.split.holdout_fraction so at least one patient is held out")

    cal = calibrate(store, cfg, work, device=dev, seed=seed, binding=binding)
    spaces, names, flt, thresholds = cal.spaces, cal.names, cal.filter, cal.thresholds
    train_features, tr_ids, ho_base, ho_d1, notes, enc_info = (cal.train_features, cal.train_ids, cal.holdout_base,
                                                                cal.holdout_d1, cal.notes, cal.encoder_info)
    cat = _cat

    # 5. synthetic tiles: small slides drawn by generate's own code path
    label_pool = label_col[(split == "train") & (level_col == 0)]
    label_pool = np.where(label_pool < 0, num_classes, label_pool)
    t0 = time.time()
    synth, synth_info = draw_synthetic(model, levels, px, num_classes, int(cfg.n_synthetic), label_pool, recipe.sampler,
                                       tuple(recipe.generate.layout_tiles), seed, dev, batch_size=cfg.batch_size)
    counts = [len(a) for a in synth]
    synth_seconds = time.time() - t0

    # 6. copies and closer-to-train share
    per_level: dict[str, dict] = {}
    copy_any_total = 0
    worst: list[dict] = []
    closer_by_space: dict[str, list[tuple[float, int]]] = {s: [] for s in names}
    copies_by_space = {s: 0 for s in names}
    for k in range(n_levels):
        imgs = synth[k]
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        res = flt.check(x, k)
        any_copy = torch.zeros(len(imgs), dtype=torch.bool)
        entry: dict[str, Any] = {"n_synthetic": len(imgs), "n_train": n_train[k], "n_holdout": n_hold[k], "spaces": {}}
        for s in names:
            r = res[s]
            any_copy |= r["copy"]
            copies_by_space[s] += int(r["copy"].sum())
            th = thresholds[s][k]
            hd1 = cat(ho_d1[(s, k)])
            hb = cat(ho_base[(s, k)])
            if train_features[(s, k)].shape[0] and hb.shape[0]:
                sp = spaces[s]
                closer = closer_to_train_share(view_chunks(sp, imgs), train_features[(s, k)], hb, seed=seed,
                                               device=dev, make_index=lambda t, sp=sp: bank_index(t, dev, sp))
                closer_by_space[s].append((closer["share"], len(imgs)))
            else:
                closer = {"share": None, "n_reference": 0, "repeats": 0}
            entry["spaces"][s] = {
                "tau_d1": _finite(th["d1"]), "tau_calibrated": _finite(th["cal"]), "threshold_source": th["source"],
                "copies": int(r["copy"].sum()),
                "copy_fraction": float(r["copy"].float().mean()) if len(imgs) else 0.0,
                "synthetic_d1_median": _finite(float(r["d1"].median())) if len(imgs) else None,
                "synthetic_d1_min": _finite(float(r["d1"].min())) if len(imgs) else None,
                "holdout_d1_median": _finite(float(hd1.median())) if hd1.numel() else None,
                "synthetic_calibrated_median": _finite(float(r["cal"].median())) if len(imgs) else None,
                "carlini_memorised_alpha_1_3": int((r["cal"] < 1 / 3).sum()),
                "closer_to_train": closer["share"],
                "closer_reference_size": closer["n_reference"],
            }
            for i in range(len(imgs)):
                tau = th["d1"] if th["d1"] and th["d1"] > 0 else 1e-12
                worst.append({"level": k, "space": s, "i": i, "d1": float(r["d1"][i]), "cal": float(r["cal"][i]),
                              "ratio": float(r["d1"][i]) / tau, "copy": bool(r["copy"][i]), "nn": int(r["nn"][i])})
        entry["copies_any_space"] = int(any_copy.sum())
        copy_any_total += int(any_copy.sum())
        per_level[str(k)] = entry
    n_syn_total = sum(len(a) for a in synth)

    # 7. membership inference
    members, nonmembers, mia_counts = mia_batches(store, seed, cfg.mia_max_tiles)
    if members is None or nonmembers is None:
        raise StageError("membership inference needs training and holdout tiles at the same level; none of the "
                         f"levels has both (train {n_train}, holdout {n_hold})")
    t0 = time.time()
    mia = run_attack(model, members, nonmembers, num_classes, list(cfg.mia_timesteps), seed=seed,
                     batch_size=cfg.batch_size, device=dev, noise_draws=int(cfg.mia_noise_draws))
    mia["seconds"] = round(time.time() - t0, 2)
    mia["per_level_pairs"] = mia_counts
    plot_roc(mia, work / "roc.png")

    # 8. checks
    alpha = float(cfg.alpha)
    copy_fraction = copy_any_total / max(n_syn_total, 1)
    fpr = holdout_false_positive_rate(cal)
    p0 = max(fpr["rate"], q)
    test = binomial_excess(copy_any_total, n_syn_total, p0, alpha)
    closer_space = {s: (sum(a * w for a, w in v) / sum(w for _, w in v) if v else None) for s, v in closer_by_space.items()}
    closer_vals = [v for v in closer_space.values() if v is not None]
    closer_max = max(closer_vals) if closer_vals else None
    tpr1 = mia["tpr_at_fpr"]["0.01"]["tpr"]
    tpr1_iv = mia["intervals"]["tpr_at_fpr"]["0.01"]
    checks = {
        "copy_fraction": {
            "value": copy_fraction, "threshold": cfg.max_copy_fraction,
            "passed": (not test["reject"]) and test["lower_bound"] <= cfg.max_copy_fraction,
            "copies": copy_any_total, "n_synthetic": n_syn_total, "per_space": copies_by_space,
            "interval": test["interval"], "interval_level": 1 - alpha,
            "holdout_false_positive_rate": fpr["rate"], "holdout_flagged": fpr["flagged"], "n_holdout": fpr["n"],
            "null_rate": p0, "p_value": test["p_value"], "alpha": alpha, "critical_copies": test["critical_count"],
            "rule": "a tile is a copy in a space when d1 <= tau_d1 and calibrated l2 <= tau_calibrated; "
                    "copy_fraction counts tiles that are copies in any space. The check fails when the copies are "
                    "significantly more frequent than the same rule flags real unseen (holdout) tiles (one-sided "
                    "exact binomial test at alpha against null_rate = max(holdout false-positive rate, "
                    "holdout_quantile)), or when the one-sided lower confidence bound of the copy fraction exceeds "
                    "max_copy_fraction",
        },
        "closer_to_train": {
            "value": closer_max, "threshold": cfg.max_closer_to_train,
            "passed": closer_max is None or closer_max <= cfg.max_closer_to_train,
            "per_space": closer_space, "ideal": 0.5,
            "rule": "per space, share of synthetic tiles nearer to train (subsampled to the holdout size) than to "
                    "holdout; the value is the largest over spaces",
        },
        "mia_auc": {
            "value": mia["auc"], "threshold": cfg.max_mia_auc, "passed": bool(mia["auc"] <= cfg.max_mia_auc),
            "interval": mia["intervals"]["auc"], "interval_level": mia["intervals"]["level"],
            "tpr_at_fpr": mia["tpr_at_fpr"],
        },
        "mia_tpr_at_1pct_fpr": {
            "value": tpr1, "threshold": cfg.max_mia_tpr, "passed": bool(tpr1_iv[0] <= cfg.max_mia_tpr),
            "interval": tpr1_iv, "interval_level": mia["intervals"]["level"], "chance": 0.01,
            "rule": "fails when the bootstrap lower bound of the calibrated attack's TPR at 1% FPR exceeds "
                    "audit.max_mia_tpr",
        },
    }
    passed = all(c["passed"] for c in checks.values())
    report = {
        "passed": bool(passed),
        "checks": checks,
        "failed_checks": [k for k, c in checks.items() if not c["passed"]],
        "levels_mpp": levels,
        "tile_px": px,
        "per_level": per_level,
        "spaces": {s: sp.describe() for s, sp in spaces.items()},
        "encoder": enc_info,
        "mia": {k: v for k, v in mia.items() if k not in ("scores_members", "scores_nonmembers")},
        "synthetic": {"n": n_syn_total, "per_level": counts, "sampler": recipe.sampler.model_dump(mode="json"),
                      "seconds": round(synth_seconds, 2), **synth_info},
        "thresholds": {"holdout_quantile": q, "k_neighbours": n},
        "notes": notes,
        "filter": {"dir": FILTER_DIR, "rule": "copy in any space"},
        "seconds": round(time.time() - t_start, 2),
        "device": str(dev),
        "binding": binding,
    }
    if enc_info.get("disabled"):
        report["notes"] = notes + [enc_info["disabled"]]
    worst.sort(key=lambda w: (w["ratio"], w["cal"]))
    write_contact_sheet(store, synth, tr_ids, worst, thresholds, work / "contact_sheet.png")
    write_patient_notice(work, ["contact_sheet.png"])
    write_report(report, work)
    return report


# --------------------------------------------------------------------------- stage
def _gate_message(report: dict) -> str:
    parts = []
    for name in report["failed_checks"]:
        ch = report["checks"][name]
        v, t = ch["value"], ch["threshold"]
        iv = ch.get("interval")
        ivs = f", {ch.get('interval_level', 0.95):.0%} interval [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else ""
        if name == "copy_fraction":
            parts.append(f"copy_fraction {v:.3f}{ivs}: {ch['copies']} of {ch['n_synthetic']} synthetic tiles are "
                         f"near-copies of training tiles (per space: {ch['per_space']}), against "
                         f"{ch['null_rate']:.3f} of real unseen tiles (one-sided exact binomial p = {ch['p_value']:.2g}; "
                         f"limit audit.max_copy_fraction {t:.3f})")
        elif name == "closer_to_train":
            parts.append(f"closer_to_train {v:.3f} > {t:.3f} (per space: "
                         + ", ".join(f"{s}={_fmt(x)}" for s, x in ch["per_space"].items()) + ", ideal 0.5)")
        elif name == "mia_tpr_at_1pct_fpr":
            parts.append(f"membership inference finds {v:.3f} of training tiles at 1% FPR{ivs}; the lower bound "
                         f"exceeds audit.max_mia_tpr {t:.3f}")
        else:
            parts.append(f"mia_auc {v:.3f} > {t:.3f}{ivs} (audit.max_mia_auc)")
    return "; ".join(parts)


def _advice(recipe) -> str:
    """What to change after a failed audit, for this run's training settings."""
    p = recipe.privacy
    if getattr(p, "enabled", False):
        eps = getattr(p, "target_epsilon", None)
        return (f"Training already used DP-SGD (privacy.target_epsilon {eps}): lower privacy.target_epsilon, add "
                "patients, or train fewer steps")
    return "Train with DP-SGD (privacy.enabled: true), add patients, or train fewer steps"


def _write_failed_copy(recipe, work: Path) -> Path:
    failed_dir = recipe.output_dir / FAILED_DIR
    tmp = recipe.output_dir / (FAILED_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in REPORT_FILES:
        if (work / f).is_file():
            shutil.copy2(work / f, tmp / f)
    if failed_dir.exists():
        shutil.rmtree(failed_dir)
    os.replace(tmp, failed_dir)
    return failed_dir


def run(ctx: StageContext) -> dict:
    """Stage entry: audit the trained model against the tile store; gate the release.

    The report and the filter are bound (:mod:`synthpath.audit.gate`) to the weights, the
    recipe sections that shape samples and limits, and the tile store. While this runs, the
    pipeline's ``audit.partial/`` folder exists, and a failed audit leaves ``audit_failed/``:
    either makes ``generate`` and ``export`` refuse any earlier passing audit."""
    from synthpath.models.checkpoint import load_model
    from synthpath.tiles.store import TileStore

    from .gate import allow_failed, current_binding

    recipe = ctx.recipe
    dev = resolve_device(recipe.audit.device)
    store = TileStore(ctx.inputs["ingest"])
    try:
        model = load_model(ctx.inputs["train"], dev, ema=True)
    except (FileNotFoundError, ValueError) as e:
        raise StageError(f"cannot load the trained model from {ctx.inputs['train']}: {e}") from None
    binding = current_binding(recipe, ctx.inputs["train"], ctx.inputs["ingest"], ctx.options)
    work = Path(ctx.workdir)
    report = run_audit(store, model, recipe, work, device=dev, binding=binding)
    allowed = allow_failed(recipe, ctx.options)
    if not report["passed"]:
        msg = _gate_message(report)
        if not allowed:
            failed_dir = _write_failed_copy(recipe, work)
            raise ReleaseBlocked(f"the audit failed, so nothing is released: {msg}. The report is in "
                                 f"{failed_dir}/report.md. {_advice(recipe)}; or pass --allow-failed-audit (the "
                                 "dataset card then says so first).")
        report["allowed_failed"] = True
        report["allowed_failed_reason"] = msg
        write_report(report, work)
        log.warning("audit FAILED but --allow-failed-audit is set: %s", msg)
    # this audit (passed, or failed with the override) supersedes any earlier failed one
    shutil.rmtree(recipe.output_dir / FAILED_DIR, ignore_errors=True)
    c = report["checks"]
    summary = {
        "passed": report["passed"],
        "allowed_failed": bool(report.get("allowed_failed", False)),
        "failed_checks": report["failed_checks"],
        "copy_fraction": c["copy_fraction"]["value"],
        "copies": c["copy_fraction"]["copies"],
        "n_synthetic": c["copy_fraction"]["n_synthetic"],
        "closer_to_train": c["closer_to_train"]["value"],
        "mia_auc": c["mia_auc"]["value"],
        "mia_tpr_at_1pct_fpr": c["mia_auc"]["tpr_at_fpr"]["0.01"]["tpr"],
        "mia_tpr_at_1pct_fpr_interval": c["mia_tpr_at_1pct_fpr"]["interval"],
        "feature_spaces": list(report["spaces"]),
        "report": "report.json",
    }
    if summary["allowed_failed"]:
        summary["warning"] = "AUDIT FAILED; released anyway because --allow-failed-audit was set"
    return summary
