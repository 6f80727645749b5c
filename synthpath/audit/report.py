"""The ``audit`` stage: memorization + membership-inference audit, report and release gate.

What it does, in order (:func:`run_audit`):

1. Builds the feature spaces of ``recipe.audit.feature_spaces``; the ``learned`` encoder is
   trained here on (a sample of) the training tiles only.
2. Embeds every training tile (streamed from the tile store) per level and space.
3. Streams the holdout tiles (patient-disjoint) and records their distance to the nearest
   training tile and Carlini's calibrated ℓ2; the copy thresholds of each space and level
   are the ``holdout_quantile`` quantiles of those (:mod:`synthpath.audit.neighbours`).
4. Saves the release filter (training features + thresholds) in ``filter/``.
5. Draws ``n_synthetic`` tiles with the trained model, split evenly over the levels, as the
   generator would make them: the coarsest level from noise; every finer level zoomed in
   (ZoomLDM's start from the noised upsampled parent at ``sampler.zoom_start``) from a crop
   of a *synthetic* tile one level up, never from a real parent (a real parent would pull
   the child toward the real child tile and mimic a copy).
6. Runs the release filter on them: copies per space and level, and the share of synthetic
   tiles closer to train than to holdout (train subsampled to the holdout's size).
7. Membership inference (:mod:`synthpath.audit.mia`) on balanced train/holdout tiles.
8. Writes ``report.json``, ``report.md``, ``contact_sheet.png`` and ``roc.png``.

The gate (:func:`run`): the audit fails when the copy share exceeds ``max_copy_fraction``,
when any space's closer-to-train share exceeds ``max_closer_to_train``, or when the attack's
AUC exceeds ``max_mia_auc``. A failed audit raises :class:`~synthpath.pipeline.ReleaseBlocked`
after copying its report to ``<output_dir>/audit_failed/`` (the stage folder is not
finalised on error), unless ``--allow-failed-audit`` (or ``export.allow_failed_audit``) is
set; then ``report.json`` has ``"allowed_failed": true``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from synthpath.features import EfficientNetSpace, FeatureSpace, FeatureSpaceError, PixelSpace, resolve_device
from synthpath.atomic import write_text
from synthpath.pipeline import ReleaseBlocked, StageContext, StageError

from .filter import FILTER_DIR, ReleaseFilter, bank_index
from .neighbours import closer_to_train_share, knn_views, calibrated_l2, quantile

log = logging.getLogger("synthpath.audit")

FAILED_DIR = "audit_failed"
REPORT_FILES = ("report.json", "report.md", "contact_sheet.png", "roc.png")


# --------------------------------------------------------------------------- helpers

def _decode(pngs: list[bytes]) -> np.ndarray:
    from synthpath.tiles.store import decode_png

    return np.stack([decode_png(b) for b in pngs])


def _embed_pair(space: FeatureSpace, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference embedding [N,D], query views [N,V,D]); one pass for view-free spaces."""
    if isinstance(space, PixelSpace):
        return space.embed(images), space.embed_views(images)
    e = space.embed(images)
    return e, e.unsqueeze(1)


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def build_spaces(cfg, tile_px: int, store, work: Path, device, seed: int) -> tuple[dict[str, FeatureSpace], dict]:
    """The audit's feature spaces by name, plus training info for the learned encoder."""
    from .encoder import LearnedSpace, save_encoder, train_encoder

    spaces: dict[str, FeatureSpace] = {}
    info: dict[str, Any] = {}
    bs = cfg.batch_size
    for name in dict.fromkeys(cfg.feature_spaces):
        if name == "pixel":
            spaces[name] = PixelSpace(tile_px, device=device, batch_size=max(bs, 64))
        elif name == "efficientnet":
            spaces[name] = EfficientNetSpace(image_px=cfg.efficientnet_px, l2=True, device=device, batch_size=bs)
        elif name == "checkpoint":
            from synthpath.features import CheckpointSpace

            try:
                spaces[name] = CheckpointSpace(cfg.encoder_checkpoint, l2=True, device=device, batch_size=bs)
            except FeatureSpaceError as e:
                raise StageError(f"audit.encoder_checkpoint: {e}") from None
        elif name == "learned":
            idx = store.index
            split = idx.column("split").to_numpy(zero_copy_only=False)
            ids = idx.column("tile_id").to_numpy(zero_copy_only=False)[split == "train"]
            rng = np.random.default_rng(seed)
            pool_ids = ids[rng.permutation(len(ids))[:2048]].tolist()
            pool = store.read_images(pool_ids)
            t0 = time.time()
            enc, losses = train_encoder(pool, cfg.encoder_steps, seed=seed, batch_size=min(64, len(pool)), device=device)
            info = {"steps": cfg.encoder_steps, "pool_tiles": len(pool_ids), "loss_first": losses[0],
                    "loss_last": float(np.mean(losses[-10:])), "seconds": round(time.time() - t0, 2)}
            save_encoder(enc, work / FILTER_DIR, extra={"training": info})
            spaces[name] = LearnedSpace(enc, device=device, batch_size=max(bs, 64), info={"training": info})
    if not spaces:
        raise StageError("audit.feature_spaces is empty: name at least one of pixel, learned, efficientnet, checkpoint")
    return spaces, info


# --------------------------------------------------------------------------- synthetic tiles
def draw_synthetic(model, levels: list[float], tile_px: int, num_classes: int, n_per_level: list[int],
                   label_pool: np.ndarray, sampler_cfg, seed: int, device, batch_size: int = 64) -> list[np.ndarray]:
    """Synthetic tiles per level (uint8 [n_k, H, W, 3]): level 0 from noise with labels drawn
    from ``label_pool`` (model label indices); level k zoomed in from a random quadrant of a
    random synthetic level k-1 tile, with that tile's label."""
    from synthpath.models.conditioning import Cond
    from synthpath.models.samplers import derive_seed, get_sampler, initial_noise, zoom_start

    solve = get_sampler(sampler_cfg.name)
    rng = np.random.default_rng(seed)
    dev = torch.device(device)
    out: list[np.ndarray] = []
    prev_imgs, prev_labels = None, None
    for k, mpp in enumerate(levels):
        n = int(n_per_level[k])
        if k == 0:
            labels = rng.choice(label_pool, size=n) if len(label_pool) else np.full(n, num_classes)
            parents = np.zeros((n, tile_px, tile_px, 3), dtype=np.uint8)
        else:
            f = int(round(levels[k - 1] / mpp))
            which = rng.integers(0, len(prev_imgs), size=n)
            cells = rng.integers(0, f, size=(n, 2))
            labels = prev_labels[which]
            parents = np.empty((n, tile_px, tile_px, 3), dtype=np.uint8)
            s = tile_px / f
            for i, (j, (cy, cx)) in enumerate(zip(which, cells)):
                box = (cx * s, cy * s, (cx + 1) * s, (cy + 1) * s)
                parents[i] = np.asarray(Image.fromarray(prev_imgs[j]).resize((tile_px, tile_px), Image.BICUBIC, box=box))
        imgs = np.empty((n, tile_px, tile_px, 3), dtype=np.uint8)
        t_start = 1.0 if k == 0 else float(sampler_cfg.zoom_start)
        for s0 in range(0, n, batch_size):
            b = min(batch_size, n - s0)
            seeds = [derive_seed("synthpath-audit", seed, k, s0 + i) for i in range(b)]
            parent_t = (torch.from_numpy(parents[s0 : s0 + b]).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
            cond = Cond(
                log_mpp=torch.full((b,), math.log(mpp), device=dev),
                label=torch.as_tensor(labels[s0 : s0 + b], dtype=torch.long, device=dev),
                parent=parent_t if k else torch.zeros_like(parent_t),
                has_parent=torch.full((b,), bool(k), dtype=torch.bool, device=dev),
                known=torch.zeros_like(parent_t),
                mask=torch.zeros(b, 1, tile_px, tile_px, device=dev),
                num_classes=num_classes,
            )
            if k == 0:
                x = initial_noise((b, 3, tile_px, tile_px), seeds, dev)
            else:
                x = zoom_start(parent_t, t_start, seeds, model=model)
            with torch.no_grad():
                x0 = solve(model, x, cond, steps=int(sampler_cfg.steps), guidance=float(sampler_cfg.guidance_scale),
                           t_start=t_start)
            imgs[s0 : s0 + b] = ((x0.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out.append(imgs)
        prev_imgs, prev_labels = imgs, labels
    return out


def split_counts(n: int, n_levels: int) -> list[int]:
    """``n`` split as evenly as possible over the levels (extra to the finer ones), at least 1 each."""
    base, extra = divmod(n, n_levels)
    return [max(1, base + (1 if k >= n_levels - extra else 0)) for k in range(n_levels)]


# --------------------------------------------------------------------------- membership inference
def mia_batches(store, seed: int, max_tiles: int) -> tuple[dict, dict, dict]:
    """Balanced member (train) / non-member (holdout) batches, equal counts per level."""
    from synthpath.models.samplers import derive_seed
    from synthpath.tiles.dataset import TileDataset

    ds = {s: TileDataset(store, split=s) for s in ("train", "holdout")}
    lv = {s: d.item_levels for s, d in ds.items()}
    n_levels = len(store.levels)
    per_level = max(1, max_tiles // n_levels)
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[int]] = {"train": [], "holdout": []}
    counts = {}
    for k in range(n_levels):
        tr = np.flatnonzero(lv["train"] == k)
        ho = np.flatnonzero(lv["holdout"] == k)
        m = min(len(tr), len(ho), per_level)
        counts[str(k)] = int(m)
        if m == 0:
            continue
        chosen["train"] += rng.choice(tr, size=m, replace=False).tolist()
        chosen["holdout"] += rng.choice(ho, size=m, replace=False).tolist()
    out = {}
    for s in ("train", "holdout"):
        items = [ds[s][i] for i in chosen[s]]
        if not items:
            out[s] = None
            continue
        batch = {key: torch.stack([it[key] for it in items]) for key in items[0]}
        batch["noise_seed"] = torch.tensor([derive_seed("synthpath-mia", seed, ds[s].tile_ids[i]) for i in chosen[s]],
                                           dtype=torch.long)
        out[s] = batch
    return out["train"], out["holdout"], counts


# --------------------------------------------------------------------------- the audit
@dataclass
class Calibration:
    """Everything the audit learns from the real tiles: feature spaces, training features,
    holdout distances, calibrated thresholds and the release filter built from them."""

    spaces: dict
    names: list
    train_features: dict
    train_ids: dict
    holdout_base: dict
    holdout_d1: dict
    holdout_cal: dict
    thresholds: dict
    filter: ReleaseFilter
    notes: list
    encoder_info: dict


def _cat(v: list) -> torch.Tensor:
    return torch.cat(v) if v else torch.zeros(0)


def calibrate(store, cfg, work: Path | str, *, device=None, seed: int = 0) -> Calibration:
    """Steps 1-4 of the audit: build the spaces (training the learned encoder), embed the
    training tiles, measure holdout→train distances, calibrate the thresholds and save the
    release filter in ``<work>/filter/``. ``cfg`` is a recipe's ``audit`` section."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device if device is not None else cfg.device)
    levels = list(store.levels)
    n_levels = len(levels)
    px = store.tile_px
    n = int(cfg.k_neighbours)
    q = float(cfg.holdout_quantile)
    # 1. feature spaces
    spaces, enc_info = build_spaces(cfg, px, store, work, dev, seed)
    names = list(spaces)
    log.info("audit: feature spaces %s", names)

    # 2. training features, streamed
    tr_feats: dict[tuple[str, int], list[torch.Tensor]] = {(s, k): [] for s in names for k in range(n_levels)}
    tr_ids: dict[int, list[str]] = {k: [] for k in range(n_levels)}
    for rb in store.iter_batches(cfg.batch_size, columns=["tile_id", "level", "image"], filter={"split": "train"}):
        lv = np.asarray(rb.column(1).to_numpy(), dtype=np.int64)
        ids = rb.column(0).to_pylist()
        imgs = _decode(rb.column(2).to_pylist())
        for k in np.unique(lv):
            sel = np.flatnonzero(lv == k)
            tr_ids[int(k)] += [ids[i] for i in sel]
            for s in names:
                tr_feats[(s, int(k))].append(spaces[s].embed(imgs[sel]))
    train_features = {key: (torch.cat(v) if v else torch.zeros(0, spaces[key[0]].dim)) for key, v in tr_feats.items()}
    # the banks go to the device once; the holdout search and the release filter reuse them
    indexes = {key: bank_index(f, dev) for key, f in train_features.items()}

    # 3. holdout: nearest training tiles (calibration) and reference features
    ho_base: dict[tuple[str, int], list[torch.Tensor]] = {(s, k): [] for s in names for k in range(n_levels)}
    ho_d1: dict[tuple[str, int], list[torch.Tensor]] = {(s, k): [] for s in names for k in range(n_levels)}
    ho_cal: dict[tuple[str, int], list[torch.Tensor]] = {(s, k): [] for s in names for k in range(n_levels)}
    for rb in store.iter_batches(cfg.batch_size, columns=["level", "image"], filter={"split": "holdout"}):
        lv = np.asarray(rb.column(0).to_numpy(), dtype=np.int64)
        imgs = _decode(rb.column(1).to_pylist())
        for k in np.unique(lv):
            k = int(k)
            sel = np.flatnonzero(lv == k)
            for s in names:
                base, views = _embed_pair(spaces[s], imgs[sel])
                ho_base[(s, k)].append(base)
                if train_features[(s, k)].shape[0]:
                    nb = knn_views(views, indexes[(s, k)], n, device=dev)
                    ho_d1[(s, k)].append(nb.dist[:, 0])
                    ho_cal[(s, k)].append(calibrated_l2(nb, n))
    cat = _cat

    # thresholds per space and level; a level without holdout tiles borrows the strictest
    # (smallest) threshold of the space's other levels
    thresholds: dict[str, dict[int, dict[str, float]]] = {}
    notes: list[str] = []
    for s in names:
        per: dict[int, dict[str, float]] = {}
        for k in range(n_levels):
            d1, cal = cat(ho_d1[(s, k)]), cat(ho_cal[(s, k)])
            if d1.numel():
                per[k] = {"d1": quantile(d1, q), "cal": quantile(cal, q), "n_holdout": int(d1.numel()),
                          "source": "holdout quantile"}
                if d1.numel() * q < 1:
                    notes.append(f"{s} L{k}: only {d1.numel()} holdout tiles, so the {q:g} quantile is interpolated "
                                 "between the smallest holdout distances")
        known = [v for v in per.values()]
        for k in range(n_levels):
            if k not in per:
                if not known:
                    raise StageError(f"feature space {s!r}: no level has holdout tiles with training tiles at the same "
                                     "level, so no copy threshold can be calibrated")
                per[k] = {"d1": min(v["d1"] for v in known), "cal": min(v["cal"] for v in known), "n_holdout": 0,
                          "source": "no holdout tiles at this level: strictest threshold of the other levels"}
                notes.append(f"{s} L{k}: no holdout tiles; borrowed the strictest threshold of the other levels")
        thresholds[s] = per

    # 4. release filter
    flt = ReleaseFilter.build(work, spaces, train_features, thresholds, n=n, levels=levels, device=dev,
                              meta={"holdout_quantile": q, "seed": seed}, indexes=indexes)

    return Calibration(spaces=spaces, names=names, train_features=train_features, train_ids=tr_ids,
                       holdout_base=ho_base, holdout_d1=ho_d1, holdout_cal=ho_cal, thresholds=thresholds, filter=flt,
                       notes=notes, encoder_info=enc_info)


def run_audit(store, model, recipe, work: Path | str, *, device=None) -> dict:
    """Run every check and write the report files and the release filter into ``work``.

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

    cal = calibrate(store, cfg, work, device=dev, seed=seed)
    spaces, names, flt, thresholds = cal.spaces, cal.names, cal.filter, cal.thresholds
    train_features, tr_ids, ho_base, ho_d1, notes, enc_info = (cal.train_features, cal.train_ids, cal.holdout_base,
                                                                cal.holdout_d1, cal.notes, cal.encoder_info)
    cat = _cat

    # 5. synthetic tiles
    label_pool = label_col[(split == "train") & (level_col == 0)]
    label_pool = np.where(label_pool < 0, num_classes, label_pool)
    counts = split_counts(int(cfg.n_synthetic), n_levels)
    t0 = time.time()
    synth = draw_synthetic(model, levels, px, num_classes, counts, label_pool, recipe.sampler, seed, dev,
                           batch_size=cfg.batch_size)
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
                closer = closer_to_train_share(spaces[s].embed_views(imgs) if isinstance(spaces[s], PixelSpace)
                                               else spaces[s].embed(imgs).unsqueeze(1),
                                               train_features[(s, k)], hb, seed=seed, device=dev)
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
                     batch_size=cfg.batch_size, device=dev)
    mia["seconds"] = round(time.time() - t0, 2)
    mia["per_level_pairs"] = mia_counts
    plot_roc(mia, work / "roc.png")

    # 8. checks
    copy_fraction = copy_any_total / max(n_syn_total, 1)
    closer_space = {s: (sum(a * w for a, w in v) / sum(w for _, w in v) if v else None) for s, v in closer_by_space.items()}
    closer_vals = [v for v in closer_space.values() if v is not None]
    closer_max = max(closer_vals) if closer_vals else None
    checks = {
        "copy_fraction": {
            "value": copy_fraction, "threshold": cfg.max_copy_fraction, "passed": copy_fraction <= cfg.max_copy_fraction,
            "copies": copy_any_total, "n_synthetic": n_syn_total, "per_space": copies_by_space,
            "rule": "a tile is a copy in a space when d1 <= tau_d1 and calibrated l2 <= tau_calibrated; "
                    "copy_fraction counts tiles that are copies in any space",
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
            "tpr_at_fpr": mia["tpr_at_fpr"],
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
                      "seconds": round(synth_seconds, 2),
                      "method": "level 0 from noise; finer levels zoomed in from crops of synthetic parents"},
        "thresholds": {"holdout_quantile": q, "k_neighbours": n},
        "notes": notes,
        "filter": {"dir": FILTER_DIR, "rule": "copy in any space"},
        "seconds": round(time.time() - t_start, 2),
        "device": str(dev),
    }
    worst.sort(key=lambda w: (w["ratio"], w["cal"]))
    write_contact_sheet(store, synth, tr_ids, worst, thresholds, work / "contact_sheet.png")
    write_report(report, work)
    return report


# --------------------------------------------------------------------------- outputs
def write_report(report: dict, work: Path) -> None:
    write_text(work / "report.json", json.dumps(report, indent=2, default=str))
    write_text(work / "report.md", render_markdown(report))


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
    return str(v)


def render_markdown(report: dict) -> str:
    c = report["checks"]
    lines = ["# synthpath audit report", ""]
    if report.get("allowed_failed"):
        lines += ["**The audit FAILED and the release was allowed anyway (--allow-failed-audit).**", ""]
    lines += [f"**Result: {'PASSED' if report['passed'] else 'FAILED'}**"
              + (f" (failed: {', '.join(report['failed_checks'])})" if report["failed_checks"] else ""), "",
              "| check | value | threshold | passed |", "|---|---|---|---|"]
    for name, ch in c.items():
        lines.append(f"| {name} | {_fmt(ch['value'])} | {_fmt(ch['threshold'])} | {_fmt(ch['passed'])} |")
    lines += ["", f"Synthetic tiles: {report['synthetic']['n']} ({report['synthetic']['method']}); "
              f"copies in any space: {c['copy_fraction']['copies']}.", "",
              "## Memorization per level and feature space", "",
              f"Copy thresholds are the {report['thresholds']['holdout_quantile']:g} quantiles of the holdout→train "
              f"distances (d1) and of Carlini's calibrated ℓ2 (d1 / mean of {report['thresholds']['k_neighbours']} "
              "nearest); a copy is below both.", "",
              "| level | space | n syn / train / holdout | τ d1 | τ cal | copies | d1 median syn / holdout | "
              "min d1 syn | closer to train |", "|---|---|---|---|---|---|---|---|---|"]
    for k, e in report["per_level"].items():
        for s, r in e["spaces"].items():
            label = report["spaces"][s]["label"]
            lines.append(f"| L{k} ({report['levels_mpp'][int(k)]:g} µm/px) | {label} | {e['n_synthetic']} / "
                         f"{e['n_train']} / {e['n_holdout']} | {_fmt(r['tau_d1'])} | {_fmt(r['tau_calibrated'])} | "
                         f"{r['copies']} | {_fmt(r['synthetic_d1_median'])} / {_fmt(r['holdout_d1_median'])} | "
                         f"{_fmt(r['synthetic_d1_min'])} | {_fmt(r['closer_to_train'])} |")
    m = report["mia"]
    lines += ["", "## Membership inference (loss attack)", "",
              f"Denoising error at t = {', '.join(f'{t:g}' for t in m['timesteps'])} (z-scored per t, averaged) "
              f"on {m['n_members']} training vs {m['n_nonmembers']} holdout-patient tiles, balanced per level.", "",
              f"- ROC AUC: **{m['auc']:.3f}** (threshold {c['mia_auc']['threshold']:g}; 0.5 = chance)"]
    for key, e in m["tpr_at_fpr"].items():
        lines.append(f"- TPR at {key} FPR: {e['tpr']:.3f}" + (f" ({e['note']})" if "note" in e else ""))
    lines.append("- per-timestep AUC: " + ", ".join(f"t={t}: {a:.3f}" for t, a in m["per_timestep_auc"].items()))
    lines += ["", "## Feature spaces", ""]
    for s, d in report["spaces"].items():
        lines.append(f"- **{d['label']}** (`{s}`, {d['dim']}-d)")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {x}" for x in report["notes"]]
    lines += ["", "Files: `report.json`, `contact_sheet.png` (worst synthetic tiles beside their nearest training "
              "tiles), `roc.png`; the release filter is in `filter/` (never exported).", ""]
    return "\n".join(lines)


def write_contact_sheet(store, synth: list[np.ndarray], tr_ids: dict[int, list[str]], worst: list[dict],
                        thresholds: dict, path: Path, rows: int = 8) -> None:
    """Worst synthetic tiles (smallest d1 relative to the copy threshold, one row per
    (tile, space)) beside their nearest training tile, labelled with space and distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen: set[tuple[int, int]] = set()
    pick = []
    for w in worst:
        key = (w["level"], w["i"])
        if key in seen or w["nn"] < 0:
            continue
        seen.add(key)
        pick.append(w)
        if len(pick) >= rows:
            break
    fig, axes = plt.subplots(max(len(pick), 1), 2, figsize=(5.2, 2.4 * max(len(pick), 1)), dpi=110, squeeze=False)
    labels = {"pixel": "pixels", "learned": "learned encoder", "efficientnet": "EfficientNet-Lite0 (ImageNet)",
              "checkpoint": "checkpoint"}
    for r, w in enumerate(pick):
        syn = synth[w["level"]][w["i"]]
        real = store.read_images([tr_ids[w["level"]][w["nn"]]])[0]
        tau = thresholds[w["space"]][w["level"]]["d1"]
        axes[r][0].imshow(syn)
        axes[r][0].set_title(f"synthetic L{w['level']} #{w['i']}" + ("  COPY" if w["copy"] else ""), fontsize=7,
                             color="red" if w["copy"] else "black")
        axes[r][1].imshow(real)
        axes[r][1].set_title(f"nearest train ({labels.get(w['space'], w['space'])})\n"
                             f"d={w['d1']:.3f} (τ={tau:.3f}), cal={w['cal']:.2f}", fontsize=7)
    if not pick:
        axes[0][0].text(0.5, 0.5, "no synthetic tiles", ha="center")
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("worst synthetic tiles vs nearest training tiles", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- stage
def _gate_message(report: dict) -> str:
    parts = []
    for name in report["failed_checks"]:
        ch = report["checks"][name]
        v, t = ch["value"], ch["threshold"]
        over = f"{v:.3f} > {t:.3f} (by {v - t:.3f})"
        if name == "copy_fraction":
            parts.append(f"copy_fraction {over}: {ch['copies']} of {ch['n_synthetic']} synthetic tiles are near-copies "
                         f"of training tiles (per space: {ch['per_space']})")
        elif name == "closer_to_train":
            parts.append(f"closer_to_train {over} (per space: "
                         + ", ".join(f"{s}={_fmt(x)}" for s, x in ch["per_space"].items()) + ", ideal 0.5)")
        else:
            parts.append(f"mia_auc {over} (audit.max_mia_auc)")
    return "; ".join(parts)


def run(ctx: StageContext) -> dict:
    """Stage entry: audit the trained model against the tile store; gate the release."""
    from synthpath.models.checkpoint import load_model
    from synthpath.tiles.store import TileStore

    recipe = ctx.recipe
    dev = resolve_device(recipe.audit.device)
    store = TileStore(ctx.inputs["ingest"])
    try:
        model = load_model(ctx.inputs["train"], dev, ema=True)
    except (FileNotFoundError, ValueError) as e:
        raise StageError(f"cannot load the trained model from {ctx.inputs['train']}: {e}") from None
    work = Path(ctx.workdir)
    report = run_audit(store, model, recipe, work, device=dev)
    allowed = bool(ctx.options.get("allow_failed_audit")) or bool(recipe.export.allow_failed_audit)
    if not report["passed"]:
        msg = _gate_message(report)
        if not allowed:
            failed_dir = recipe.output_dir / FAILED_DIR
            if failed_dir.exists():
                shutil.rmtree(failed_dir)
            tmp = recipe.output_dir / (FAILED_DIR + ".tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            for f in REPORT_FILES:
                if (work / f).is_file():
                    shutil.copy2(work / f, tmp / f)
            os.replace(tmp, failed_dir)
            raise ReleaseBlocked(f"the audit failed, so nothing is released: {msg}. The report is in "
                                 f"{failed_dir}/report.md. Train with DP (privacy.enabled) or a smaller ε, more data or "
                                 "fewer steps, or pass --allow-failed-audit (the dataset card then says so first).")
        report["allowed_failed"] = True
        report["allowed_failed_reason"] = msg
        write_report(report, work)
        log.warning("audit FAILED but --allow-failed-audit is set: %s", msg)
    elif (recipe.output_dir / FAILED_DIR).exists():
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
        "feature_spaces": list(report["spaces"]),
        "report": "report.json",
    }
    if summary["allowed_failed"]:
        summary["warning"] = "AUDIT FAILED; released anyway because --allow-failed-audit was set"
    return summary
