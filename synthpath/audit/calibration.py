"""Steps 1-4 of the audit: the feature spaces (training and vetting the learned encoder),
training features, holdout-to-train distances, the copy thresholds calibrated on them, and
the release filter saved from them. Also the copy rule's false-positive rate on real
holdout tiles, which the copy gate tests against."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthpath.features import EfficientNetSpace, FeatureSpace, FeatureSpaceError, PixelSpace, resolve_device
from synthpath.pipeline import StageError

from .filter import FILTER_DIR, ReleaseFilter, bank_index, search_images
from .neighbours import calibrated_l2, quantile
from .stats import binomial_excess

log = logging.getLogger("synthpath.audit")

# --------------------------------------------------------------------------- helpers

def _decode(pngs: list[bytes]) -> np.ndarray:
    from synthpath.tiles.store import decode_png

    return np.stack([decode_png(b) for b in pngs])


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def build_spaces(cfg, tile_px: int, store, work: Path, device, seed: int) -> tuple[dict[str, FeatureSpace], dict]:
    """The audit's feature spaces by name, plus training info for the learned encoder."""
    from .encoder import LearnedSpace, retrieval_check, save_encoder, train_encoder

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
            space = LearnedSpace(enc, device=device, batch_size=max(bs, 64), info={"training": info})
            ho_ids = idx.column("tile_id").to_numpy(zero_copy_only=False)[split == "holdout"]
            ho_ids = ho_ids[rng.permutation(len(ho_ids))[:256]].tolist()
            info["retrieval"] = retrieval_check(space, store.read_images(ho_ids), seed=seed, alpha=cfg.alpha)
            if not info["retrieval"]["usable"]:
                info["disabled"] = ("the learned space was not used: it cannot tell held-out tiles apart well enough "
                                    f"to find copies ({info['retrieval']['reason']}); raise audit.encoder_steps")
                log.warning("audit: %s", info["disabled"])
                continue
            save_encoder(enc, work / FILTER_DIR, extra={"training": info})
            space.info = {"training": info}
            spaces[name] = space
    if not spaces:
        if info.get("disabled"):
            raise StageError(f"audit.feature_spaces: no usable feature space is left; {info['disabled']}, or add "
                             "'pixel' to audit.feature_spaces")
        raise StageError("audit.feature_spaces is empty: name at least one of pixel, learned, efficientnet, checkpoint")
    return spaces, info


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


def calibrate(store, cfg, work: Path | str, *, device=None, seed: int = 0, binding: dict | None = None) -> Calibration:
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
    indexes = {key: bank_index(f, dev, spaces[key[0]]) for key, f in train_features.items()}

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
                ho_base[(s, k)].append(spaces[s].embed(imgs[sel]))
                if train_features[(s, k)].shape[0]:
                    nb = search_images(spaces[s], indexes[(s, k)], imgs[sel], n)
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

    # a learned space that calls pure noise a copy of a training tile cannot be trusted
    for s in [x for x in names if x == "learned"]:
        probe = noise_probe(spaces[s], train_features, thresholds[s], n, px, n_levels, dev, seed, indexes=indexes)
        hf = [((cat(ho_d1[(s, k)]) <= thresholds[s][k]["d1"]) & (cat(ho_cal[(s, k)]) <= thresholds[s][k]["cal"]))
              for k in range(n_levels) if cat(ho_d1[(s, k)]).numel()]
        real_rate = float(torch.cat(hf).float().mean()) if hf else q
        probe.update(binomial_excess(probe["flagged"], probe["n"], max(real_rate, q), float(cfg.alpha)))
        probe["holdout_flag_rate"] = real_rate
        enc_info["noise_probe"] = probe
        if probe["reject"]:
            enc_info["disabled"] = (f"the learned space was not used: it called {probe['flagged']} of {probe['n']} "
                                    f"pure-noise tiles copies of training tiles, significantly more often than real "
                                    f"unseen tiles ({real_rate:.3f}; p = {probe['p_value']:.2g}): an undertrained "
                                    "encoder; raise audit.encoder_steps")
            log.warning("audit: %s", enc_info["disabled"])
            names.remove(s)
            for d in (spaces, thresholds):
                d.pop(s)
            for key in [key for key in train_features if key[0] == s]:
                train_features.pop(key)
    if not names:
        raise StageError(f"no usable audit feature space is left: {enc_info.get('disabled')}; or add 'pixel' to "
                         "audit.feature_spaces")

    # 4. release filter
    flt = ReleaseFilter.build(work, spaces, train_features, thresholds, n=n, levels=levels, device=dev,
                              meta={"holdout_quantile": q, "seed": seed,
                                    **({"binding": binding} if binding is not None else {})},
                              indexes={key: indexes[key] for key in train_features})

    return Calibration(spaces=spaces, names=names, train_features=train_features, train_ids=tr_ids,
                       holdout_base=ho_base, holdout_d1=ho_d1, holdout_cal=ho_cal, thresholds=thresholds, filter=flt,
                       notes=notes, encoder_info=enc_info)



def noise_tiles(n: int, px: int, seed: int) -> np.ndarray:
    """Pure noise tiles (uint8 [n, px, px, 3]): per-pixel colour noise and smooth blobs at
    a few scales, around H&E-like and random mean colours, as an untrained model draws."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, px, px, 3), dtype=np.uint8)
    for i in range(n):
        cell = int(rng.choice([1, 2, 4, 8]))
        side = max(1, px // cell)
        base = rng.normal(0, 1, size=(side, side, 3))
        base = np.kron(base, np.ones((cell, cell, 1)))[:px, :px]
        if base.shape[0] < px:
            base = np.pad(base, ((0, px - base.shape[0]), (0, px - base.shape[1]), (0, 0)), mode="edge")
        mean = rng.uniform(60, 230, size=3) if i % 2 else np.array([200.0, 150.0, 190.0])
        out[i] = np.clip(mean + base * rng.uniform(10, 70), 0, 255).astype(np.uint8)
    return out


def noise_probe(space: FeatureSpace, train_features: dict, thresholds: dict, n: int, px: int, n_levels: int,
                device, seed: int, n_probe: int = 64, indexes: dict | None = None) -> dict:
    """How many pure-noise tiles the copy rule of ``space`` flags as copies, over all levels
    (searching the resident ``indexes`` of the calibration where given, not new uploads)."""
    imgs = noise_tiles(n_probe, px, seed)
    flagged = 0
    for k in range(n_levels):
        bank = train_features[(space.name, k)] if (space.name, k) in train_features else None
        if bank is None or not bank.shape[0]:
            continue
        index = (indexes or {}).get((space.name, k)) or bank_index(bank, device, space)
        nb = search_images(space, index, imgs, n)
        th = thresholds[k]
        flagged += int(((nb.dist[:, 0] <= th["d1"]) & (calibrated_l2(nb, n) <= th["cal"])).sum())
    return {"flagged": flagged, "n": n_probe * n_levels}


def holdout_false_positive_rate(cal: Calibration) -> dict:
    """Share of holdout tiles the copy rule (copy in any space) flags against the training
    tiles: the rule's false-positive rate on real tiles the model never saw."""
    flagged, total = 0, 0
    n_levels = max((k for _, k in cal.holdout_d1), default=-1) + 1
    for k in range(n_levels):
        any_flag = None
        for s in cal.names:
            d1, c = _cat(cal.holdout_d1[(s, k)]), _cat(cal.holdout_cal[(s, k)])
            if not d1.numel():
                continue
            th = cal.thresholds[s][k]
            f = (d1 <= th["d1"]) & (c <= th["cal"])
            any_flag = f if any_flag is None else (any_flag | f)
        if any_flag is not None:
            flagged += int(any_flag.sum())
            total += int(any_flag.numel())
    return {"flagged": flagged, "n": total, "rate": flagged / total if total else 0.0}
