"""Exact k-nearest-neighbour search in bounded memory, and the memorization metrics on it.

Search (:func:`knn`): Euclidean distances from ``|q|² + |b|² - 2 q·b``, computed one
(query chunk × base chunk) block at a time with a matmul, keeping a running top-k per query.
Memory is O(query_chunk × base_chunk) whatever the set sizes; the base may live on the
CPU (even as float16) and is moved to the device chunk by chunk. On CUDA the matmul may run
in bf16 (``fast=True``); the top ``k + rerank_extra`` candidates are then re-ranked with
exact float32 distances, so reported distances are float32-exact.

Queries with several views (:func:`knn_views`, shift-tolerant pixel space) are searched per
view; for each base item the smallest distance over views is kept.

Metrics (same level only; the caller splits by level):
- Carlini et al.'s calibrated ℓ2: d1 / mean(d1..dn) over the n nearest training tiles;
- DCR: distance to the closest training record, synthetic→train and holdout→train;
- the share of synthetic tiles closer to train than to holdout, with train subsampled to
  the holdout's size (as SDMetrics' DCR overfitting protection does), so the ideal is 50%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class Neighbours:
    dist: Tensor  # float32 [Q, k], ascending
    index: Tensor  # int64 [Q, k] into the base


def _device(device) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as2d(x, name: str) -> Tensor:
    t = torch.as_tensor(x) if not isinstance(x, Tensor) else x
    if t.dim() != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(t.shape)}")
    return t


def knn(query, base, k: int, *, device=None, query_chunk: int = 4096, base_chunk: int = 65536,
        fast: bool = False, rerank_extra: int = 8) -> Neighbours:
    """Exact k nearest base rows for every query row (Euclidean).

    ``fast=True`` on CUDA uses bf16 matmuls for candidate search, then re-ranks
    ``k + rerank_extra`` candidates in float32. If the base has fewer than ``k`` rows the
    missing columns hold ``inf`` distance and index -1.
    """
    q_all = _as2d(query, "query")
    b_all = _as2d(base, "base")
    if q_all.shape[1] != b_all.shape[1]:
        raise ValueError(f"query dim {q_all.shape[1]} != base dim {b_all.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    dev = _device(device)
    nq, nb = q_all.shape[0], b_all.shape[0]
    use_bf16 = fast and dev.type == "cuda"
    kk = min(nb, k + (rerank_extra if use_bf16 else 0))
    out_d = torch.full((nq, k), float("inf"))
    out_i = torch.full((nq, k), -1, dtype=torch.long)
    if nq == 0 or nb == 0:
        return Neighbours(out_d, out_i)
    cdtype = torch.bfloat16 if use_bf16 else torch.float32
    # base squared norms, once
    bnorm = torch.empty(nb, dtype=torch.float32)
    for s in range(0, nb, base_chunk):
        bnorm[s : s + base_chunk] = b_all[s : s + base_chunk].to(dev, torch.float32).pow(2).sum(1).cpu()
    single_base = nb <= base_chunk
    if single_base:
        b_dev = b_all.to(dev, cdtype)
        bn_dev = bnorm.to(dev)
    for qs in range(0, nq, query_chunk):
        q = q_all[qs : qs + query_chunk].to(dev, torch.float32)
        qn = q.pow(2).sum(1, keepdim=True)
        qc = q.to(cdtype)
        best_d = torch.full((q.shape[0], kk), float("inf"), device=dev)
        best_i = torch.full((q.shape[0], kk), -1, dtype=torch.long, device=dev)
        for bs in range(0, nb, base_chunk):
            if single_base:
                b, bn = b_dev, bn_dev
            else:
                b = b_all[bs : bs + base_chunk].to(dev, cdtype, non_blocking=True)
                bn = bnorm[bs : bs + base_chunk].to(dev, non_blocking=True)
            d2 = (qn + bn.unsqueeze(0)) - 2.0 * (qc @ b.t()).float()
            kc = min(kk, d2.shape[1])
            cd, ci = torch.topk(d2, kc, dim=1, largest=False)
            cat_d = torch.cat([best_d, cd], dim=1)
            cat_i = torch.cat([best_i, ci + bs], dim=1)
            sel_d, pos = torch.topk(cat_d, kk, dim=1, largest=False)
            best_d, best_i = sel_d, torch.gather(cat_i, 1, pos)
        if use_bf16:
            cand = b_all[best_i.clamp_min(0).cpu()].to(dev, torch.float32)  # [q, kk, D]
            best_d = (cand - q.unsqueeze(1)).pow(2).sum(-1)
            best_d, pos = torch.sort(best_d, dim=1)
            best_i = torch.gather(best_i, 1, pos)
        m = min(k, kk)
        out_d[qs : qs + q.shape[0], :m] = best_d[:, :m].clamp_min(0).sqrt().cpu()
        out_i[qs : qs + q.shape[0], :m] = best_i[:, :m].cpu()
    return Neighbours(out_d, out_i)


def knn_views(query_views, base, k: int, **kwargs) -> Neighbours:
    """k nearest base rows for queries given as several views [Q, V, D]: per base item the
    smallest distance over the views counts, and each base item appears at most once."""
    qv = torch.as_tensor(query_views) if not isinstance(query_views, Tensor) else query_views
    if qv.dim() == 2:
        return knn(qv, base, k, **kwargs)
    if qv.dim() != 3:
        raise ValueError(f"query views must be [Q, V, D], got shape {tuple(qv.shape)}")
    nq, nv, d = qv.shape
    nb = knn(qv.reshape(nq * nv, d), base, k, **kwargs)
    dist = nb.dist.reshape(nq, nv * k)
    idx = nb.index.reshape(nq, nv * k)
    # sort by distance, then stably by index: the first of each index group is its minimum
    dist, pos = torch.sort(dist, dim=1)
    idx = torch.gather(idx, 1, pos)
    idx_sorted, pos2 = torch.sort(idx, dim=1, stable=True)
    dist_sorted = torch.gather(dist, 1, pos2)
    dup = torch.zeros_like(idx_sorted, dtype=torch.bool)
    dup[:, 1:] = idx_sorted[:, 1:] == idx_sorted[:, :-1]
    dup |= idx_sorted < 0
    dist_sorted = dist_sorted.masked_fill(dup, float("inf"))
    kk = min(k, dist_sorted.shape[1])
    top_d, p = torch.topk(dist_sorted, kk, dim=1, largest=False)
    top_i = torch.gather(idx_sorted, 1, p).masked_fill(torch.isinf(top_d), -1)
    return Neighbours(top_d, top_i)


# --------------------------------------------------------------------------- metrics
def calibrated_l2(nb: Neighbours, n: int | None = None) -> Tensor:
    """Carlini et al. (2023): d1 / mean(d1..dn). Near 0 = one training tile is far closer than
    the others (memorised); near 1 = the tile sits in a crowd (not a specific copy)."""
    d = nb.dist if n is None else nb.dist[:, :n]
    finite = torch.isfinite(d)
    mean = torch.where(finite, d, torch.zeros_like(d)).sum(1) / finite.sum(1).clamp_min(1)
    return d[:, 0] / mean.clamp_min(1e-12)


def quantile(x: Tensor | np.ndarray, q: float) -> float:
    a = np.asarray(x, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return float("nan")
    return float(np.quantile(a, q))


def closer_to_train_share(syn_views, train, holdout, *, seed: int = 0, repeats: int = 5, device=None) -> dict:
    """Share of synthetic tiles whose nearest training tile is closer than their nearest
    holdout tile, with the training set subsampled to the holdout's size (``repeats``
    draws, averaged) so that 0.5 is what a model that generalises perfectly scores."""
    tr = _as2d(train, "train")
    ho = _as2d(holdout, "holdout")
    n = min(tr.shape[0], ho.shape[0])
    if n == 0 or len(syn_views) == 0:
        return {"share": float("nan"), "n_reference": int(n), "repeats": 0}
    d_ho = knn_views(syn_views, ho, 1, device=device).dist[:, 0]
    gen = torch.Generator().manual_seed(seed)
    shares = []
    for _ in range(repeats if tr.shape[0] > n else 1):
        sub = torch.randperm(tr.shape[0], generator=gen)[:n]
        d_tr = knn_views(syn_views, tr[sub], 1, device=device).dist[:, 0]
        # ties (e.g. both exactly 0) count half
        shares.append(float(((d_tr < d_ho).float() + 0.5 * (d_tr == d_ho).float()).mean()))
    return {"share": float(np.mean(shares)), "n_reference": int(n), "repeats": len(shares)}


@dataclass
class SpaceLevelResult:
    """Memorization statistics of one feature space at one level."""

    syn_d1: Tensor
    syn_cal: Tensor
    syn_nn: Tensor  # nearest training index per synthetic tile
    hold_d1: Tensor
    hold_cal: Tensor
    tau_d: float
    tau_cal: float
    copies: Tensor  # bool per synthetic tile
    closer: dict


def thresholds(hold_nb: Neighbours, n: int, q: float) -> tuple[float, float]:
    """Copy thresholds from the holdout→train neighbours: the ``q`` quantile of d1 and of
    Carlini's calibrated ℓ2. A tile is a copy when it is below both."""
    return quantile(hold_nb.dist[:, 0], q), quantile(calibrated_l2(hold_nb, n), q)


def is_copy(d1: Tensor, cal: Tensor, tau_d: float, tau_cal: float) -> Tensor:
    if math.isnan(tau_d) or math.isnan(tau_cal):
        return torch.zeros_like(d1, dtype=torch.bool)
    return (d1 <= tau_d) & (cal <= tau_cal)


def memorization(syn_views, hold_views, train, holdout, *, n: int, q: float, seed: int = 0,
                 device=None) -> SpaceLevelResult:
    """All neighbour metrics of one space at one level (features already embedded)."""
    nb_s = knn_views(syn_views, train, n, device=device)
    nb_h = knn_views(hold_views, train, n, device=device)
    tau_d, tau_c = thresholds(nb_h, n, q)
    d1, cal = nb_s.dist[:, 0], calibrated_l2(nb_s, n)
    return SpaceLevelResult(
        syn_d1=d1, syn_cal=cal, syn_nn=nb_s.index[:, 0], hold_d1=nb_h.dist[:, 0], hold_cal=calibrated_l2(nb_h, n),
        tau_d=tau_d, tau_cal=tau_c, copies=is_copy(d1, cal, tau_d, tau_c),
        closer=closer_to_train_share(syn_views, train, holdout, seed=seed, device=device),
    )
