"""Exact k-nearest-neighbour search against a device-resident bank, and the memorization
metrics on it.

Search (:class:`NeighbourIndex`). The training bank and its squared norms are moved to the
device ONCE, when the index is built; every later :meth:`NeighbourIndex.search` only uploads
its queries. The audit (holdout calibration, synthetic tiles) and the release filter (every
generation batch) hold one index per feature space and level and reuse it, so a filter call
costs one small matmul against the resident bank, never a re-upload of the bank.

Distances are Euclidean, from ``|q|² + |b|² - 2 q·b``, computed one (query chunk × bank
block) at a time with a matmul, keeping a running top-k per query; memory is bounded by
``block_bytes`` whatever the set sizes. On CUDA the candidate matmul runs in bf16 by default
(``precision="auto"``); the top ``k + rerank_extra`` candidates of every query are then
re-ranked with float32 distances against the bank as stored, so reported distances and the
order of the returned neighbours are float32-exact. On the CPU everything is float32.

Views and parts. A query may come as several *views* ``[Q, V, D]`` (the pixel space's
shifted windows under the 8 dihedral transforms) and a bank row as several *parts*
``[N, P·D]`` (the pixel space's nine half-tile windows, concatenated). The distance from
a query to a bank tile is the smallest over its views and the tile's parts; each bank tile
appears at most once in a query's neighbours, and indices are tile rows. ``parts`` is
inferred as ``bank dim / query dim`` when not given.

Two-stage search (:class:`TwoStageIndex`, the pixel space's index): with ~27k views per
query, comparing every view with every part of every bank tile is too costly, so a coarse
retrieval picks ``candidates`` tiles and a local refinement on the full view grid gives
their distances (see the class).

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
    index: Tensor  # int64 [Q, k] into the base (tile rows)


def _device(device) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as2d(x, name: str) -> Tensor:
    t = torch.as_tensor(x) if not isinstance(x, Tensor) else x
    if t.dim() != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(t.shape)}")
    return t


def _as_views(x) -> Tensor:
    if hasattr(x, "materialise"):  # lazy views (e.g. PixelQueries): every view, for an exhaustive search
        return x.materialise()
    t = torch.as_tensor(x) if not isinstance(x, Tensor) else x
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() != 3:
        raise ValueError(f"queries must be [Q, D] or views [Q, V, D], got shape {tuple(t.shape)}")
    return t



def _no_neighbours(nq: int, k: int) -> tuple[Tensor, Tensor]:
    """The result before any search: ``inf`` distances and index -1 (a column stays so when
    there are fewer than k tiles)."""
    return torch.full((nq, k), float("inf")), torch.full((nq, k), -1, dtype=torch.long)

_CACHE_BYTES = 2 << 20  # distance block of the CPU multi-view search (about one core's L2 cache)


class NeighbourIndex:
    """A bank of vectors resident on ``device`` with its norms, searched many times.

    ``base``: [N, P·D] (``parts`` = P vectors of D per tile; P = 1 for plain features).
    ``precision``: ``"auto"`` (bf16 candidates + fp32 re-rank on CUDA, fp32 elsewhere),
    ``"bf16"`` or ``"fp32"``. ``block_bytes`` bounds the distance block held at once.
    """

    def __init__(self, base, *, parts: int | None = None, device=None, precision: str = "auto",
                 block_bytes: int | None = None, rerank_extra: int = 8):
        b = _as2d(base, "base")
        self.device = _device(device)
        if precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
        self.use_bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.n = int(b.shape[0])
        self.width = int(b.shape[1])
        self.parts = int(parts) if parts is not None else None
        self.rerank_extra = int(rerank_extra)
        self.block_bytes = int(block_bytes or ((1 << 30) if self.device.type == "cuda" else (64 << 20)))
        # the bank as stored (fp16 or fp32) for the exact re-rank, and fp32 norms: once
        self.exact = b.to(self.device)
        if not self.exact.is_floating_point():
            raise ValueError(f"base must be floating point, got {b.dtype}")
        self._mat: Tensor | None = None
        self._norm: Tensor | None = None
        if self.parts is not None:
            self._prepare(self.parts)

    def _prepare(self, parts: int) -> None:
        if parts < 1 or self.width % parts:
            raise ValueError(f"bank rows of width {self.width} cannot hold {parts} parts")
        self.parts = parts
        self.dim = self.width // parts
        flat = self.exact.reshape(self.n * parts, self.dim)
        norms = torch.empty(flat.shape[0], dtype=torch.float32, device=self.device)
        step = max(1, (256 << 20) // max(1, 4 * self.dim))
        for s in range(0, flat.shape[0], step):
            norms[s:s + step] = flat[s:s + step].float().pow(2).sum(1)
        self._norm = norms
        self._aug = None
        if self.use_bf16:
            self._mat = flat.to(torch.bfloat16)
        else:
            self._mat = flat if flat.dtype == torch.float32 else flat.float()

    def _augmented(self) -> Tensor:
        """[N·P, D + 2] float32, built once: the bank parts as ``[-2b, 1, |b|²]``, so
        ``this @ [q, |q|², 1]ᵀ`` is the squared distance matrix in one matmul (no broadcast add
        of the norms over the whole block)."""
        if self._aug is None:
            m = self._mat.float()
            self._aug = torch.cat([-2.0 * m, torch.ones_like(self._norm).unsqueeze(1), self._norm.unsqueeze(1)],
                                  dim=1).contiguous()
        return self._aug

    def _search_views_cpu(self, qv: Tensor, kk: int) -> tuple[Tensor, Tensor]:
        """Squared distances and tile rows [Q, kk] of the kk nearest tiles of multi-view
        queries [Q, V, D] (fp32, CPU): per query tile and cache-sized bank block (``_CACHE_BYTES``
        of distances), one matmul of the augmented vectors, then the smallest over views and
        parts; one top-k over the whole bank per query tile. Same minima as the blocked
        path (up to float rounding of the matmul), ~10x less memory traffic."""
        nq, nv, _ = qv.shape
        P, aug = self.parts, self._augmented()
        bt = max(1, _CACHE_BYTES // (4 * nv * P))  # bank tiles per block: the [bt·P, V] block stays in cache
        out_d = torch.empty(nq, kk)
        out_i = torch.empty(nq, kk, dtype=torch.long)
        tile_d = torch.empty(self.n)
        for i in range(nq):
            q = qv[i].float()
            qa = torch.cat([q, q.pow(2).sum(1, keepdim=True), torch.ones(nv, 1)], dim=1)  # [V, D + 2]
            qt = qa.t().contiguous()
            for ts in range(0, self.n, bt):
                te = min(self.n, ts + bt)
                d2 = torch.mm(aug[ts * P:te * P], qt)  # [bt·P, V]
                tile_d[ts:te] = d2.amin(1).view(te - ts, P).amin(1)
            out_d[i], out_i[i] = torch.topk(tile_d, kk, largest=False)
        return out_d, out_i

    def __len__(self) -> int:
        return self.n

    def search(self, queries, k: int, *, query_chunk: int | None = None) -> Neighbours:
        """k nearest tiles for every query ([Q, D] or views [Q, V, D]); missing columns
        (fewer than k tiles) hold ``inf`` distance and index -1."""
        qv = _as_views(queries)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        nq, nv, d = qv.shape
        if self.parts is None:
            if self.width % d:
                raise ValueError(f"query dim {d} does not divide the bank's row width {self.width}")
            self._prepare(self.width // d)
        if d != self.dim:
            raise ValueError(f"query dim {d} != base dim {self.dim}")
        out_d, out_i = _no_neighbours(nq, k)
        if nq == 0 or self.n == 0:
            return Neighbours(out_d, out_i)
        P, dev = self.parts, self.device
        kk = min(self.n, k + (self.rerank_extra if self.use_bf16 else 0))
        if nv > 1 and dev.type == "cpu" and not self.use_bf16:
            best_d, best_i = self._search_views_cpu(qv, kk)
            mk = min(k, kk)
            out_d[:, :mk] = best_d[:, :mk].clamp_min(0).sqrt()
            out_i[:, :mk] = best_i[:, :mk]
            return Neighbours(out_d, out_i)
        rows = query_chunk or (8192 if dev.type == "cuda" else 2048)
        qc_n = max(1, rows // nv)
        for qs in range(0, nq, qc_n):
            q = qv[qs:qs + qc_n].to(dev, torch.float32)
            b = q.shape[0]
            qf = q.reshape(b * nv, d)
            qn = qf.pow(2).sum(1, keepdim=True)
            qc = qf.to(self._mat.dtype)
            bt = max(1, self.block_bytes // (4 * b * nv * P))  # tiles per block
            best_d = torch.full((b, kk), float("inf"), device=dev)
            best_i = torch.full((b, kk), -1, dtype=torch.long, device=dev)
            for ts in range(0, self.n, bt):
                te = min(self.n, ts + bt)
                m = self._mat[ts * P:te * P]
                d2 = torch.addmm(qn + self._norm[ts * P:te * P].unsqueeze(0), qc, m.t(), beta=1.0, alpha=-2.0) \
                    if not self.use_bf16 else (qn + self._norm[ts * P:te * P].unsqueeze(0)) - 2.0 * (qc @ m.t()).float()
                if nv > 1 or P > 1:
                    d2 = d2.view(b, nv, te - ts, P).amin(dim=(1, 3))
                kc = min(kk, te - ts)
                cd, ci = torch.topk(d2, kc, dim=1, largest=False)
                cat_d = torch.cat([best_d, cd], dim=1)
                cat_i = torch.cat([best_i, ci + ts], dim=1)
                best_d, pos = torch.topk(cat_d, kk, dim=1, largest=False)
                best_i = torch.gather(cat_i, 1, pos)
            if self.use_bf16:
                best_d, best_i = self._rerank(q, best_i)
            mk = min(k, kk)
            out_d[qs:qs + b, :mk] = best_d[:, :mk].clamp_min(0).sqrt().cpu()
            out_i[qs:qs + b, :mk] = best_i[:, :mk].cpu()
        return Neighbours(out_d, out_i)

    def _rerank(self, q: Tensor, cand: Tensor) -> tuple[Tensor, Tensor]:
        """float32 squared distances of queries q [b, V, D] to candidate tiles cand [b, c]
        (smallest over views and parts), sorted ascending."""
        b, nv, d = q.shape
        P = self.parts
        out = torch.empty(cand.shape, dtype=torch.float32, device=q.device)
        sub = max(1, (256 << 20) // max(1, 4 * cand.shape[1] * P * (d + nv)))
        for s in range(0, b, sub):
            c = cand[s:s + sub]
            rows = self.exact[c.clamp_min(0)].float().reshape(c.shape[0], c.shape[1] * P, d)  # [s, c*P, D]
            qs = q[s:s + sub]
            d2 = (qs.pow(2).sum(-1, keepdim=True) + rows.pow(2).sum(-1).unsqueeze(1)
                  - 2.0 * torch.bmm(qs, rows.transpose(1, 2)))  # [s, V, c*P]
            d2 = d2.view(c.shape[0], nv, c.shape[1], P).amin(dim=(1, 3))
            out[s:s + sub] = d2.masked_fill(c < 0, float("inf"))
        out, pos = torch.sort(out, dim=1)
        return out, torch.gather(cand, 1, pos)


def knn(query, base, k: int, *, device=None, query_chunk: int | None = None, base_chunk: int | None = None,
        fast: bool = False, rerank_extra: int = 8, precision: str | None = None) -> Neighbours:
    """Exact k nearest base rows for every query row (Euclidean); a one-off
    :class:`NeighbourIndex` (``base`` may also be an index). ``fast=True`` = bf16 on CUDA."""
    return knn_views(_as2d(query, "query"), base, k, device=device, query_chunk=query_chunk, base_chunk=base_chunk,
                     fast=fast, rerank_extra=rerank_extra, precision=precision)


def knn_views(query_views, base, k: int, *, device=None, query_chunk: int | None = None,
              base_chunk: int | None = None, fast: bool = False, rerank_extra: int = 8,
              precision: str | None = None) -> Neighbours:
    """k nearest bank tiles for queries given as several views [Q, V, D] (or [Q, D]): per
    bank tile the smallest distance over the views (and its parts) counts, and each tile
    appears at most once. ``base`` is a :class:`NeighbourIndex` (reused, nothing uploaded)
    or a tensor [N, P·D] (a one-off index). ``base_chunk`` caps the tiles per block."""
    if isinstance(base, (NeighbourIndex, TwoStageIndex)):
        return base.search(query_views, k, query_chunk=query_chunk)
    prec = precision or ("bf16" if fast and _device(device).type == "cuda" else "fp32")
    block = None
    if base_chunk is not None:
        qv = _as_views(query_views)
        rows = min(qv.shape[0] * qv.shape[1], query_chunk or 2048)
        b = _as2d(base, "base")
        parts = max(1, b.shape[1] // qv.shape[2])
        block = max(1, base_chunk) * 4 * max(1, rows) * parts
    idx = NeighbourIndex(base, device=device, precision=prec, block_bytes=block, rerank_extra=rerank_extra)
    return idx.search(query_views, k, query_chunk=query_chunk)


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


def search_chunks(view_chunks, indexes: list, k: int) -> list[Neighbours]:
    """Search every index with queries that come in chunks (an iterable of [q, V, D] views,
    e.g. embedded a few tiles at a time, so thousands of views per tile never sit in memory
    for a whole batch); one pass over the chunks, results concatenated per index."""
    parts: list[list[Neighbours]] = [[] for _ in indexes]
    for views in view_chunks:
        for out, idx in zip(parts, indexes):
            out.append(idx.search(views, k))
    return [Neighbours(torch.cat([p.dist for p in ps]) if ps else torch.zeros(0, k),
                       torch.cat([p.index for p in ps]) if ps else torch.zeros(0, k, dtype=torch.long))
            for ps in parts]


def closer_to_train_share(syn_views, train, holdout, *, seed: int = 0, repeats: int = 5, device=None,
                          make_index=None) -> dict:
    """Share of synthetic tiles whose nearest training tile is closer than their nearest
    holdout tile, with the training set subsampled to the holdout's size (``repeats``
    draws, averaged) so that 0.5 is what a model that generalises perfectly scores.

    ``syn_views``: the synthetic tiles' query views [Q, V, D], or an iterable of such chunks.
    ``make_index``: builds the search index over a reference tensor (default an exact
    :class:`NeighbourIndex`; the pixel space passes its two-stage index)."""
    tr = _as2d(train, "train")
    ho = _as2d(holdout, "holdout")
    n = min(tr.shape[0], ho.shape[0])
    chunks = [syn_views] if isinstance(syn_views, Tensor) or hasattr(syn_views, "take") else syn_views
    if n == 0 or (isinstance(syn_views, Tensor) and len(syn_views) == 0):
        return {"share": float("nan"), "n_reference": int(n), "repeats": 0}
    build = make_index or (lambda t: NeighbourIndex(t, device=device))
    gen = torch.Generator().manual_seed(seed)
    draws = repeats if tr.shape[0] > n else 1
    subs = [torch.randperm(tr.shape[0], generator=gen)[:n] for _ in range(draws)]
    res = search_chunks(chunks, [build(ho)] + [build(tr[sub]) for sub in subs], 1)
    d_ho = res[0].dist[:, 0]
    if d_ho.numel() == 0:
        return {"share": float("nan"), "n_reference": int(n), "repeats": 0}
    # ties (e.g. both exactly 0) count half
    shares = [float(((r.dist[:, 0] < d_ho).float() + 0.5 * (r.dist[:, 0] == d_ho).float()).mean()) for r in res[1:]]
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
    """The copy rule: d1 <= tau_d and calibrated l2 <= tau_cal. Fails closed: a threshold
    that is missing or not a finite number, or a NaN distance, is an error (never "not a
    copy")."""
    for name, t in (("tau_d1", tau_d), ("tau_calibrated", tau_cal)):
        if t is None or not isinstance(t, (int, float)) or not math.isfinite(float(t)):
            raise ValueError(f"copy threshold {name} is {t!r}; it must be a finite number (fail closed)")
    if bool(torch.isnan(d1).any()) or bool(torch.isnan(cal).any()):
        raise ValueError("a neighbour distance is NaN (non-finite features or images); cannot tell copies apart")
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


# the two-stage index lives in its own module (it uses NeighbourIndex); re-exported here
from .two_stage import DenseViews, TwoStageIndex  # noqa: E402
