"""Loss-based membership inference against the trained diffusion model.

The attack (Carlini et al. 2023; Matsumoto et al. 2023): a model fits its training tiles
better, so their denoising error is lower. For each tile the v-prediction error of
:func:`synthpath.models.diffusion.diffusion_loss` is measured at the fixed timesteps
``recipe.audit.mia_timesteps`` with fixed, per-tile seeded noise (the same noise a tile
would get whatever set it is in). Losses are standardised per timestep over all scored
tiles (no labels used), averaged, and negated: the higher the score, the more "member".

Members are training tiles, non-members holdout-patient tiles, balanced per level (equal
counts of each at every level, so level difficulty cannot pose as a signal).

Metrics: ROC AUC (Mann-Whitney, ties count half), TPR at 1% and 0.1% FPR (linearly
interpolated on the ROC), each with a note when there are too few non-members for the FPR
to be resolved (fewer than 1/FPR), and per-timestep AUCs for information.
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


def attack_scores(losses: Tensor) -> Tensor:
    """Member score per tile: minus the mean over timesteps of per-timestep z-scored losses."""
    mu = losses.mean(0, keepdim=True)
    sd = losses.std(0, keepdim=True).clamp_min(1e-12)
    return -((losses - mu) / sd).mean(1)


def run_attack(model: torch.nn.Module, members: dict, nonmembers: dict, num_classes: int, timesteps: Sequence[float],
               *, seed: int = 0, batch_size: int = 64, device=None) -> dict:
    """Score member and non-member tiles and compute the attack metrics.

    ``members`` / ``nonmembers`` are collated TileDataset-style batches (``image``,
    ``parent``, ``has_parent``, ``log_mpp``, ``label``, and ``noise_seed`` int list or tensor).
    Returns the metrics plus ``scores_members``/``scores_nonmembers`` lists.
    """
    from synthpath.models.conditioning import Cond

    if len(timesteps) == 0:
        raise ValueError("audit.mia_timesteps is empty: give at least one timestep in (0, 1)")
    bad = [t for t in timesteps if not 0.0 < float(t) < 1.0]
    if bad:
        raise ValueError(f"audit.mia_timesteps must lie in (0, 1), got {bad}")
    losses = []
    for batch in (members, nonmembers):
        cond = Cond.from_batch(batch, num_classes)
        seeds = [int(s) for s in torch.as_tensor(batch["noise_seed"]).tolist()]
        losses.append(denoising_losses(model, batch["image"], cond, timesteps, seeds, batch_size=batch_size,
                                       device=device))
    n_m = losses[0].shape[0]
    all_losses = torch.cat(losses)
    scores = attack_scores(all_losses)
    s_m, s_n = scores[:n_m].numpy(), scores[n_m:].numpy()
    res = attack_metrics(s_m, s_n)
    res["per_timestep_auc"] = {f"{t:g}": roc_auc(-all_losses[:n_m, j].numpy(), -all_losses[n_m:, j].numpy())
                               for j, t in enumerate(timesteps)}
    res["mean_loss"] = {"members": float(losses[0].mean()), "nonmembers": float(losses[1].mean())}
    res["timesteps"] = [float(t) for t in timesteps]
    res["scores_members"] = s_m.tolist()
    res["scores_nonmembers"] = s_n.tolist()
    return res


def plot_roc(result: dict, path: Path | str, title: str = "Membership inference (loss attack)") -> None:
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
