"""Calibrated loss-based membership inference against the trained diffusion model.

The attack (Carlini et al. 2023; Matsumoto et al. 2023; difficulty calibration after
Watson et al. 2022): a model fits its training tiles better, so their denoising error is
lower. For each tile the v-prediction error of
:func:`synthpath.models.diffusion.diffusion_loss` is measured at each of the candidate
timesteps ``recipe.audit.mia_timesteps``, averaged over ``audit.mia_noise_draws`` seeded
noise draws (the same noise a tile would get whatever set it is in).

*Difficulty calibration.* A raw loss mostly says how hard a tile is (flat tissue is easy,
dense nuclei hard), which hides membership at low false-positive rates. Each tile's loss is
therefore taken relative to the mean loss of its ``CALIBRATION_K`` most similar *non-member*
tiles at the same level (nearest by a difficulty descriptor: colour mean and spread and
gradient energy), never counting a tile as its own reference. Members score
``reference - loss``: positive when the model fits a tile better than similar unseen ones.

*Timesteps chosen by power, honestly.* Tiles are split in two folds (balanced); the timestep
whose calibrated score has the highest AUC on one fold scores the other (cross-fitting), so
the choice never sees the tiles it is judged on.

Members are training tiles, non-members holdout-patient tiles, balanced per level. Metrics:
ROC AUC (Mann-Whitney), TPR at 1% and 0.1% FPR, each with a percentile bootstrap interval
(members and non-members resampled separately), the raw (uncalibrated) AUC for comparison,
and per-timestep AUCs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


# --------------------------------------------------------------------------- metrics
def roc_auc(scores_members: Sequence[float], scores_nonmembers: Sequence[float]) -> float:
    """P(score of a random member > score of a random non-member), ties counting half."""
    m = np.asarray(scores_members, dtype=np.float64)
    n = np.asarray(scores_nonmembers, dtype=np.float64)
    if m.size == 0 or n.size == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([m, n]))
    r_m = ranks[: m.size].sum()
    return float((r_m - m.size * (m.size + 1) / 2) / (m.size * n.size))


def roc_curve(scores_members, scores_nonmembers) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0,0) to (1,1); ties move together."""
    m = np.asarray(scores_members, dtype=np.float64)
    n = np.asarray(scores_nonmembers, dtype=np.float64)
    s = np.concatenate([m, n])
    y = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp = np.cumsum(y)[last]
    fp = np.cumsum(1 - y)[last]
    tpr = np.r_[0.0, tp / max(m.size, 1)]
    fpr = np.r_[0.0, fp / max(n.size, 1)]
    return fpr, tpr


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """TPR at a given FPR, linearly interpolated between ROC points (highest TPR at ties)."""
    # np.interp needs increasing x; for repeated fpr values take the last (highest tpr)
    keep = np.r_[np.diff(fpr) != 0, True]
    return float(np.interp(target, fpr[keep], tpr[keep]))


def attack_metrics(scores_members, scores_nonmembers, fprs: Sequence[float] = (0.01, 0.001)) -> dict:
    fpr, tpr = roc_curve(scores_members, scores_nonmembers)
    n_non = len(scores_nonmembers)
    out = {"auc": roc_auc(scores_members, scores_nonmembers), "n_members": len(scores_members),
           "n_nonmembers": n_non, "tpr_at_fpr": {}}
    for f in fprs:
        entry = {"fpr": f, "tpr": tpr_at_fpr(fpr, tpr, f)}
        if n_non * f < 1:
            entry["note"] = (f"only {n_non} non-members: FPR {f:g} is below one false positive "
                             f"(needs at least {int(np.ceil(1 / f))}), so this TPR is interpolated, not measured")
        out["tpr_at_fpr"][f"{f:g}"] = entry
    return out


# --------------------------------------------------------------------------- scores
@torch.no_grad()
def denoising_losses(model: torch.nn.Module, images: Tensor, cond, timesteps: Sequence[float], noise_seeds: Sequence[int],
                     *, batch_size: int = 64, device=None) -> Tensor:
    """Per-tile loss at each timestep, float32 [N, T]. ``noise_seeds[i]`` seeds tile i's noise
    (one noise image per tile, reused at every timestep)."""
    from synthpath.models.diffusion import diffusion_loss
    from synthpath.models.samplers import initial_noise

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    n = images.shape[0]
    if len(noise_seeds) != n:
        raise ValueError(f"need one noise seed per tile: {n} tiles, {len(noise_seeds)} seeds")
    out = torch.zeros(n, len(timesteps))
    for s in range(0, n, batch_size):
        x0 = images[s : s + batch_size].to(dev).float()
        c = cond.index(slice(s, s + batch_size)).to(dev)
        noise = initial_noise(x0.shape, list(noise_seeds[s : s + batch_size]), dev)
        for j, t in enumerate(timesteps):
            tt = torch.full((x0.shape[0],), float(t), device=dev)
            out[s : s + x0.shape[0], j] = diffusion_loss(model, x0, c, t=tt, noise=noise).float().cpu()
    return out


CALIBRATION_K = 8
N_BOOTSTRAP = 1000


def difficulty_descriptor(images: Tensor) -> np.ndarray:
    """Per-tile difficulty features of images in [-1, 1] [N,3,H,W]: channel means and spreads
    and the mean absolute gradient (texture), standardised over the given tiles."""
    x = images.float()
    mean = x.mean(dim=(2, 3))
    sd = x.std(dim=(2, 3))
    g = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3)) + (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))
    d = torch.cat([mean, sd, g[:, None]], dim=1).numpy().astype(np.float64)
    return (d - d.mean(0)) / np.maximum(d.std(0), 1e-9)


def calibrate_losses(losses: np.ndarray, desc: np.ndarray, group: np.ndarray, is_member: np.ndarray,
                     k: int = CALIBRATION_K) -> np.ndarray:
    """``reference - loss`` per tile and timestep ([N, T]): the reference is the mean loss of
    the ``k`` non-members nearest in ``desc`` within the same ``group`` (level), the tile itself
    excluded. A tile without any reference in its group keeps the group's mean non-member loss
    (or 0 offset when there is none)."""
    out = np.zeros_like(losses, dtype=np.float64)
    for gval in np.unique(group):
        sel = np.flatnonzero(group == gval)
        ref = sel[~is_member[sel]]
        for i in sel:
            pool = ref[ref != i]
            if pool.size == 0:
                out[i] = 0.0
                continue
            d = ((desc[pool] - desc[i]) ** 2).sum(1)
            near = pool[np.argsort(d, kind="stable")[: min(k, pool.size)]]
            out[i] = losses[near].mean(0) - losses[i]
    return out


def cross_fit_scores(cal: np.ndarray, is_member: np.ndarray, seed: int) -> tuple[np.ndarray, list[int]]:
    """Final member score per tile: fold A is scored at the timestep with the best AUC on
    fold B and vice versa. Returns (scores, chosen timestep index per fold)."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(cal), dtype=np.int64)
    for val in (True, False):
        idx = np.flatnonzero(is_member == val)
        fold[idx[rng.permutation(len(idx))[: len(idx) // 2]]] = 1
    scores = np.zeros(len(cal))
    chosen = []
    for f in (0, 1):
        pick_on = fold != f
        m, n = pick_on & is_member, pick_on & ~is_member
        aucs = [roc_auc(cal[m, j], cal[n, j]) if m.any() and n.any() else 0.5 for j in range(cal.shape[1])]
        j = int(np.nanargmax(aucs)) if not np.all(np.isnan(aucs)) else 0
        chosen.append(j)
        scores[fold == f] = cal[fold == f, j]
    return scores, chosen


def bootstrap_intervals(s_m: np.ndarray, s_n: np.ndarray, fprs: Sequence[float], *, seed: int,
                        n_boot: int = N_BOOTSTRAP, level: float = 0.95) -> dict:
    """Percentile bootstrap intervals of the AUC and of TPR at each FPR (members and
    non-members resampled separately)."""
    rng = np.random.default_rng(seed)
    aucs, tprs = [], {f: [] for f in fprs}
    for _ in range(n_boot):
        bm = s_m[rng.integers(0, len(s_m), len(s_m))]
        bn = s_n[rng.integers(0, len(s_n), len(s_n))]
        aucs.append(roc_auc(bm, bn))
        fpr, tpr = roc_curve(bm, bn)
        for f in fprs:
            tprs[f].append(tpr_at_fpr(fpr, tpr, f))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100

    def iv(v):
        return [float(np.percentile(v, lo)), float(np.percentile(v, hi))]

    return {"auc": iv(aucs), "tpr_at_fpr": {f"{f:g}": iv(tprs[f]) for f in fprs}, "level": level,
            "n_bootstrap": n_boot, "method": "percentile bootstrap, members and non-members resampled separately"}


def run_attack(model: torch.nn.Module, members: dict, nonmembers: dict, num_classes: int, timesteps: Sequence[float],
               *, seed: int = 0, batch_size: int = 64, device=None, noise_draws: int = 1) -> dict:
    """Score member and non-member tiles with the calibrated attack and compute its metrics.

    ``members`` / ``nonmembers`` are collated TileDataset-style batches (``image``,
    ``parent``, ``has_parent``, ``log_mpp``, ``label``, and ``noise_seed`` int list or tensor).
    Returns the metrics plus ``scores_members``/``scores_nonmembers`` lists.
    """
    from synthpath.models.conditioning import Cond
    from synthpath.models.samplers import derive_seed

    if len(timesteps) == 0:
        raise ValueError("audit.mia_timesteps is empty: give at least one timestep in (0, 1)")
    bad = [t for t in timesteps if not 0.0 < float(t) < 1.0]
    if bad:
        raise ValueError(f"audit.mia_timesteps must lie in (0, 1), got {bad}")
    if noise_draws < 1:
        raise ValueError(f"audit.mia_noise_draws must be at least 1, got {noise_draws}")
    losses, images, groups = [], [], []
    for batch in (members, nonmembers):
        cond = Cond.from_batch(batch, num_classes)
        seeds = [int(s) for s in torch.as_tensor(batch["noise_seed"]).tolist()]
        draws = [denoising_losses(model, batch["image"], cond, timesteps,
                                  seeds if d == 0 else [derive_seed("mia-draw", s, d) for s in seeds],
                                  batch_size=batch_size, device=device) for d in range(noise_draws)]
        losses.append(torch.stack(draws).mean(0))
        images.append(batch["image"])
        groups.append(torch.as_tensor(batch["log_mpp"]).float().numpy().round(6))
    n_m = losses[0].shape[0]
    raw = torch.cat(losses).numpy().astype(np.float64)
    is_member = np.r_[np.ones(n_m, bool), np.zeros(losses[1].shape[0], bool)]
    desc = difficulty_descriptor(torch.cat(images))
    cal = calibrate_losses(raw, desc, np.concatenate(groups), is_member)
    scores, chosen = cross_fit_scores(cal, is_member, seed)
    s_m, s_n = scores[:n_m], scores[n_m:]
    fprs = (0.01, 0.001)
    res = attack_metrics(s_m, s_n, fprs)
    res["intervals"] = bootstrap_intervals(s_m, s_n, fprs, seed=seed)
    z = (raw - raw.mean(0)) / np.maximum(raw.std(0), 1e-12)
    res["uncalibrated_auc"] = roc_auc(-z[:n_m].mean(1), -z[n_m:].mean(1))
    res["per_timestep_auc"] = {f"{t:g}": roc_auc(cal[:n_m, j], cal[n_m:, j]) for j, t in enumerate(timesteps)}
    res["chosen_timesteps"] = [float(timesteps[j]) for j in chosen]
    res["mean_loss"] = {"members": float(losses[0].mean()), "nonmembers": float(losses[1].mean())}
    res["timesteps"] = [float(t) for t in timesteps]
    res["noise_draws"] = int(noise_draws)
    res["calibration"] = {"reference": "mean loss of the nearest non-members at the same level (self excluded)",
                          "k": CALIBRATION_K, "descriptor": "colour mean/spread and gradient energy",
                          "timestep_choice": "cross-fitted over two folds by AUC"}
    res["scores_members"] = s_m.tolist()
    res["scores_nonmembers"] = s_n.tolist()
    return res


def plot_roc(result: dict, path: Path | str, title: str = "Membership inference (calibrated loss attack)") -> None:
    """Log-log ROC curve PNG with the chance diagonal, AUC and TPR@FPR in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr = roc_curve(result["scores_members"], result["scores_nonmembers"])
    floor = 1.0 / max(4 * max(result["n_nonmembers"], result["n_members"], 1), 1000)
    fig, ax = plt.subplots(figsize=(4.5, 4.2), dpi=120)
    ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), lw=1.8, label=f"attack (AUC {result['auc']:.3f})")
    g = np.logspace(np.log10(floor), 0, 50)
    ax.plot(g, g, "k--", lw=0.8, label="chance")
    for key, e in result["tpr_at_fpr"].items():
        ax.plot([e["fpr"]], [max(e["tpr"], floor)], "o", ms=4, label=f"TPR {e['tpr']:.3f} @ FPR {key}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1.05)
    ax.set_xlabel("false positive rate (holdout tiles called members)")
    ax.set_ylabel("true positive rate (training tiles found)")
    ax.set_title(f"{title}\n{result['n_members']} members vs {result['n_nonmembers']} non-members", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    import os

    os.replace(tmp, path)
