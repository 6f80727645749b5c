"""The ``evaluate`` stage: downstream utility and fidelity of the released dataset.

Inputs: the tile store (``ingest/``: real training and real holdout tiles), the exported
Hugging Face dataset (``export/hf``, read with ``datasets.load_dataset`` as a user would),
and the synthetic slide TIFFs (``generate/slides`` or anywhere under ``export/``) for
patch-FID and the cascade's consistency and seam metrics.

Per level it reports:
- utility: TSTR, TRTR and (optionally) real+synthetic classifiers tested on the real
  holdout patients (accuracy, balanced accuracy, macro AUROC; mean and 95% Student-t CI over
  ``evaluate.seeds``), and the TSTR/TRTR ratios;
- fidelity: FID, KID and improved precision/recall (k=3) between synthetic tiles and real
  holdout tiles in ``evaluate.feature_space``; patch-FID between random native-resolution
  crops of the synthetic slide levels (crossing tile seams) and crops of real holdout tiles;
- the cascade metrics of :mod:`synthpath.generate.quality` on the synthetic pyramids.

Outputs (in the stage folder): ``report.json``, ``metrics.png``,
``confusion_tstr_<level>.png``, ``real_vs_synthetic_<level>.png``.

Cross-stage write: this stage re-renders the dataset card ``export/hf/README.md`` with a
"Utility and fidelity" section by calling the export stage's card writer. That card is the
one file outside ``ctx.workdir`` this stage writes (atomically, through the card writer);
the export manifest is left untouched, so the export stage does not look stale.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_json
from ..pipeline import StageContext, StageError
from ..units import level_name
from . import fidelity as fid
from . import plots
from .data import EvaluateDataError, SyntheticDataset, find_slide_files, image_column, read_slide_levels, real_split
from .utility import Hyper, Split, ratio, run_setting

log = logging.getLogger("synthpath.evaluate")

CI_METHOD = "95% Student-t interval over classifier seeds (mean ± t(0.975,n-1)·sd/√n), clipped to [0,1]; none for one seed"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)




# --------------------------------------------------------------------------- pieces
def utility_for_level(real_train: Split, real_test: Split, synthetic: Split, num_classes: int, hp: Hyper,
                      seeds: list[int], settings: list[str], device) -> dict:
    """The classifier settings of one level, plus TSTR/TRTR ratios."""
    out: dict = {}
    train_sets = {"tstr": synthetic, "trtr": real_train}
    if "mixed" in settings and len(real_train) and len(synthetic):
        train_sets["mixed"] = Split.concat([real_train, synthetic])
    for s in settings:
        data = train_sets.get(s)
        if data is None or len(data) == 0:
            out[s] = {"skipped": f"no {'synthetic' if s == 'tstr' else 'real training'} tiles at this level"}
            continue
        t0 = time.time()
        out[s] = run_setting(data, real_test, num_classes, hp, seeds, device=device)
        out[s]["seconds"] = round(time.time() - t0, 2)
    if "summary" in out.get("tstr", {}) and "summary" in out.get("trtr", {}):
        out["tstr_trtr_ratio"] = {k: ratio(out["tstr"], out["trtr"], k) for k in ("accuracy", "balanced_accuracy", "auroc")}
    return out


def fidelity_for_level(real: np.ndarray, synthetic: np.ndarray, space, space_name: str, seed: int) -> dict:
    """FID/KID/PR between real holdout tiles and synthetic tiles of one level."""
    if len(real) < 2 or len(synthetic) < 2:
        return {"skipped": f"need at least 2 tiles per side, got {len(real)} real and {len(synthetic)} synthetic",
                "feature_space": space_name}
    fr = fid.features_for(real, space)
    fs = fid.features_for(synthetic, space)
    out = fid.fidelity_metrics(fr, fs, seed=seed)
    out["feature_space"] = space_name
    out["real_source"] = "real holdout tiles (tile store)"
    out["synthetic_source"] = "exported HF dataset"
    if out["n_real"] < out["feature_dim"] or out["n_synthetic"] < out["feature_dim"]:
        out["caution"] = (f"fewer samples than feature dimensions ({out['feature_dim']}): the covariances are "
                          f"rank-deficient and FID is biased upwards; compare only runs with the same counts")
    return out


def pfid_for_level(slide_levels: list[np.ndarray], real: np.ndarray, crop_px: int, n: int, space, space_name: str,
                   seed: int) -> dict:
    """Patch-FID: random native-resolution crops of whole synthetic slide levels against
    random crops of real holdout tiles of the same level."""
    usable = [im for im in slide_levels if im.shape[0] >= crop_px and im.shape[1] >= crop_px]
    if not usable or len(real) < 2:
        return {"skipped": f"{len(usable)} synthetic slide levels at least {crop_px} px and {len(real)} real tiles"}
    # no more crops than non-overlapping windows: more would mostly re-measure the same pixels
    n = int(min(n, sum((im.shape[0] // crop_px) * (im.shape[1] // crop_px) for im in usable)))
    if n < 2:
        return {"skipped": f"fewer than 2 crops of {crop_px} px fit in the synthetic slides"}
    syn_crops = fid.pyramid_crops(usable, n, crop_px, seed)
    real_crops = fid.random_crops(list(real), n, crop_px, seed + 1)
    fr, fs = fid.features_for(real_crops, space), fid.features_for(syn_crops, space)
    return {"pfid": fid.frechet_distance(fr, fs), "n_crops": int(n), "crop_px": int(crop_px),
            "n_slides": len(usable), "feature_space": space_name,
            "real_source": f"{crop_px}px crops of {len(real)} real holdout tiles"}


def cascade_metrics(slides: list[list[np.ndarray]], mpp: list[float], tile_px: int) -> dict:
    """The cascade's cross-level consistency (SSIM / PSNR of each level, box-downsampled,
    against the level above) and tile-seam ratio (step across tile borders / step elsewhere;
    1 = seamless) from :mod:`synthpath.generate.quality`, averaged over the synthetic slides."""
    from ..generate import quality
    from ..generate.synthesis import Pyramid

    per: dict[int, dict[str, list[float]]] = {k: {"ssim": [], "psnr": [], "seam": []} for k in range(len(mpp))}
    for levels in slides:
        pyr = Pyramid(levels=levels, mpp=list(mpp), tile_px=tile_px, seed=0, label=None)
        for c in quality.consistency(pyr):
            per[c["level"]]["ssim"].append(c["ssim"])
            per[c["level"]]["psnr"].append(c["psnr"])
        for sm in quality.pyramid_seams(pyr):
            per[sm["level"]]["seam"].append(sm["seam"])

    def mean(v: list[float]) -> float | None:
        v = [x for x in v if np.isfinite(x)]
        return float(np.mean(v)) if v else None

    out = {}
    for k, vals in per.items():
        row = {"ssim_vs_coarser": mean(vals["ssim"]), "psnr_vs_coarser_db": mean(vals["psnr"]),
               "seam_ratio": mean(vals["seam"])}
        row = {a: b for a, b in row.items() if b is not None}
        if row:
            out[level_name(mpp[k])] = row
    return {"n_slides": len(slides), "per_level": out,
            "method": "synthpath.generate.quality: consistency (level downsampled vs level above), pyramid_seams"}


def headline(report: dict) -> dict:
    """The compact, card-sized part of the report: per level the mean (and 95% CI) of each
    setting's balanced accuracy and AUROC, the TSTR/TRTR ratio, and the fidelity numbers,
    with sample counts. Stored as ``report["headline"]``; its keys are the card's rows."""
    out: dict = {}
    for name, e in report["levels"].items():
        u, f, p = e.get("utility") or {}, e.get("fidelity") or {}, e.get("pfid") or {}
        row: dict = {"n_real_holdout": e["counts"]["real_holdout"], "n_synthetic": e["counts"]["synthetic"],
                     "n_real_train": e["counts"]["real_train"]}
        for s in ("tstr", "trtr", "mixed"):
            summ = (u.get(s) or {}).get("summary")
            if not summ:
                continue
            for key in ("accuracy", "balanced_accuracy", "auroc"):
                m = summ[key]
                row[f"{s}_{key}"] = m["mean"]
                if key == "balanced_accuracy":
                    row[f"{s}_{key}_ci95"] = [m["ci_low"], m["ci_high"]]
        for key in ("balanced_accuracy", "accuracy", "auroc"):
            if (u.get("tstr_trtr_ratio") or {}).get(key) is not None:
                row[f"tstr_over_trtr_{key}"] = u["tstr_trtr_ratio"][key]
        if f.get("fid") is not None:
            row.update(fid=f["fid"], kid=f["kid"]["mean"], kid_std=f["kid"]["std"], precision=f.get("precision"),
                       recall=f.get("recall"), fidelity_n_real=f["n_real"], fidelity_n_synthetic=f["n_synthetic"])
        if p.get("pfid") is not None:
            row.update(pfid=p["pfid"], pfid_crops=p["n_crops"], pfid_crop_px=p["crop_px"])
        out[name] = row
    return out


def card_view(report: dict) -> dict:
    """What the dataset card shows: a subset of ``report.json`` with the same key paths, so
    every number in the card can be traced to the report."""
    view: dict = {"feature_space": {k: report["feature_space"][k] for k in ("name", "label")}}
    view.update({k: report[k] for k in ("seeds", "ci_method", "headline") if k in report})
    if "per_level" in (report.get("cascade") or {}):
        view["cascade"] = {"n_slides": report["cascade"]["n_slides"], "per_level": report["cascade"]["per_level"]}
    return view


def _write_card(ctx: StageContext, report: dict) -> str:
    """Re-render the export card with the evaluation section, through the export stage's
    card writer (``synthpath.export.card.write_card``)."""
    from ..export.card import write_card

    out = ctx.output_dir
    path = write_card(ctx.inputs["export"], recipe=ctx.recipe, ingest_dir=ctx.inputs["ingest"],
                      train_dir=out / "train", audit_dir=out / "audit", generate_dir=out / "generate",
                      evaluate_report=card_view(report))
    return str(path)


# --------------------------------------------------------------------------- stage
def run(ctx: StageContext) -> dict:
    from ..tiles.store import TileStore, TileStoreError

    t_start = time.time()
    cfg = ctx.recipe.evaluate
    work = ctx.workdir
    device = _device(cfg.device)
    try:
        store = TileStore(ctx.inputs["ingest"])
    except TileStoreError as e:
        raise StageError(f"evaluate: cannot read the tile store: {e}") from e
    hf_dir = ctx.inputs["export"] / "hf"
    try:
        syn = SyntheticDataset(hf_dir, cache_dir=work / "hf_cache")
    except EvaluateDataError as e:
        raise StageError(f"evaluate: {e}") from e
    try:
        if syn.classes and syn.classes != store.classes:
            raise StageError(f"evaluate: the exported dataset's classes {syn.classes} ({hf_dir}) differ from the "
                             f"tile store's {store.classes} ({store.root})")
        classes = store.classes
        hp = Hyper(classifier=cfg.classifier, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                   val_fraction=cfg.val_fraction)
        seeds = list(cfg.seeds)
        try:
            space = fid.load_feature_space(cfg.feature_space, cfg.feature_checkpoint, device=device,
                                          image_px=cfg.feature_px)
        except (ValueError, FileNotFoundError) as e:
            raise StageError(f"evaluate.feature_space: {e}") from e
        space_name = cfg.feature_space
        crop_px = cfg.pfid_crop_px or max(8, store.tile_px // 2)

        slide_files = find_slide_files(ctx.inputs["export"], ctx.output_dir / "generate" / "slides")
        slide_levels, slide_errors = [], []
        for p in slide_files:
            try:
                slide_levels.append(read_slide_levels(p, store.levels))
            except EvaluateDataError as e:  # a TIFF OpenSlide cannot read is reported, not fatal
                log.warning("%s", e)
                slide_errors.append(str(e))

        report: dict = {
            "classes": classes,
            "seeds": seeds,
            "ci_method": CI_METHOD,
            "feature_space": {"name": space_name, "label": getattr(space, "label", space_name),
                              "description": fid.SPACE_DESCRIPTIONS[space_name],
                              "checkpoint": str(cfg.feature_checkpoint) if cfg.feature_checkpoint else None,
                              "details": space.describe() if hasattr(space, "describe") else {}},
            "classifier": {"name": hp.classifier, "epochs": hp.epochs, "batch_size": hp.batch_size, "lr": hp.lr,
                           "weight_decay": hp.weight_decay, "val_fraction": hp.val_fraction,
                           "selection": "epoch with the best balanced accuracy on a validation split carved from "
                                        "the training side by patient / synthetic slide; test patients never seen",
                           "augmentation": "random flips and 90-degree rotations",
                           "loss": "class-balanced cross-entropy"},
            "settings": list(cfg.settings),
            "synthetic_dataset": {"path": str(hf_dir), "splits": {k: len(v) for k, v in syn.splits.items()},
                                  "group_column": syn.group_column, "loaded_with": "datasets.load_dataset"},
            "slide_tiffs": [str(p) for p in slide_files],
            "slide_errors": slide_errors,
            "device": str(device),
            "levels": {},
        }
        for li, mpp in enumerate(store.levels):
            name = level_name(mpp)
            col = image_column(mpp)
            t0 = time.time()
            entry: dict = {"mpp": mpp, "column": col}
            real_train = real_split(store, "train", li)
            real_test = real_split(store, "holdout", li)
            try:
                synthetic = syn.level(col)
            except EvaluateDataError as e:
                raise StageError(f"evaluate: {e}") from e
            entry["counts"] = {"real_train": len(real_train), "real_holdout": len(real_test),
                               "synthetic": len(synthetic),
                               "real_holdout_per_class": np.bincount(real_test.labels, minlength=len(classes)).tolist(),
                               "synthetic_per_class": np.bincount(synthetic.labels, minlength=len(classes)).tolist()}
            if len(real_test) == 0:
                entry["utility"] = {"skipped": f"no labelled real holdout tiles at level {name}"}
            else:
                entry["utility"] = utility_for_level(real_train, real_test, synthetic, len(classes), hp, seeds,
                                                     list(cfg.settings), device)
            n_fid = cfg.max_fidelity_samples
            rng = np.random.default_rng(ctx.recipe.seed + li)
            ri = rng.permutation(len(real_test))[:n_fid]
            si = rng.permutation(len(synthetic))[:n_fid]
            entry["fidelity"] = fidelity_for_level(real_test.images[ri], synthetic.images[si], space, space_name,
                                                   seed=ctx.recipe.seed)
            levels_here = [lv[li] for lv in slide_levels if li in lv]
            entry["pfid"] = (pfid_for_level(levels_here, real_test.images, crop_px, n_fid, space, space_name,
                                            seed=ctx.recipe.seed + 100 + li)
                             if levels_here else {"skipped": "no synthetic slide TIFFs found (export.slides: false?)"})
            _level_plots(work, name, entry, real_test, synthetic, classes, seeds, space_name)
            entry["seconds"] = round(time.time() - t0, 2)
            report["levels"][name] = entry
            log.info("evaluate %s: %s", name, _one_line(entry))

        full = [[lv[i] for i in range(len(store.levels))] for lv in slide_levels if len(lv) == len(store.levels)]
        report["cascade"] = (cascade_metrics(full, store.levels, store.tile_px) if full
                             else {"skipped": "no synthetic slide TIFFs with every level"})
        report["headline"] = headline(report)
        report["seconds"] = round(time.time() - t_start, 2)
        plots.metrics_plot(report, work / "metrics.png")
        write_json(work / "report.json", report)
        card_path = _write_card(ctx, report)
    finally:
        syn.close()
    return _summary(report, card_path)


def _level_plots(work: Path, name: str, entry: dict, real_test: Split, synthetic: Split, classes, seeds, space_name):
    tstr = (entry.get("utility") or {}).get("tstr") or {}
    if "confusion_summed_over_seeds" in tstr:
        plots.confusion_plot(tstr["confusion_summed_over_seeds"], classes,
                             f"TSTR {name}: trained on {tstr['n_train_total']} synthetic, tested on "
                             f"{tstr['n_test']} real holdout tiles; summed over seeds {seeds}",
                             work / f"confusion_tstr_{name}.png")
    if len(real_test) or len(synthetic):
        rng = np.random.default_rng(0)
        ri = rng.permutation(len(real_test))[:8]
        si = rng.permutation(len(synthetic))[:8]
        plots.sample_grid(real_test.images[ri], synthetic.images[si],
                          f"{name}: real holdout (n={len(real_test)}) vs synthetic (n={len(synthetic)}), 8 random each",
                          work / f"real_vs_synthetic_{name}.png", real_labels=real_test.labels[ri],
                          synthetic_labels=synthetic.labels[si], classes=classes)


def _one_line(entry: dict) -> str:
    u = entry.get("utility") or {}
    parts = []
    for s in ("tstr", "trtr", "mixed"):
        m = ((u.get(s) or {}).get("summary") or {}).get("balanced_accuracy", {}).get("mean")
        if m is not None:
            parts.append(f"{s} bal.acc {m:.3f}")
    f = (entry.get("fidelity") or {}).get("fid")
    if f is not None:
        parts.append(f"FID {f:.2f}")
    return ", ".join(parts) or "no metrics"


def _summary(report: dict, card_path: str | None) -> dict:
    """The manifest summary: the headline numbers per level."""
    levels = {}
    for name, e in report["levels"].items():
        u = e.get("utility") or {}

        def mean(setting, key):
            return (((u.get(setting) or {}).get("summary") or {}).get(key) or {}).get("mean")

        levels[name] = {
            "tstr_balanced_accuracy": mean("tstr", "balanced_accuracy"),
            "trtr_balanced_accuracy": mean("trtr", "balanced_accuracy"),
            "tstr_trtr_ratio": (u.get("tstr_trtr_ratio") or {}).get("balanced_accuracy"),
            "fid": (e.get("fidelity") or {}).get("fid"),
            "pfid": (e.get("pfid") or {}).get("pfid"),
        }
    return {"feature_space": report["feature_space"]["name"], "seeds": report["seeds"], "levels": levels,
            "card": card_path, "seconds": report["seconds"]}
