"""The two-stage search of the pixel space (:class:`TwoStageIndex`) and the dense query
views it also accepts (:class:`DenseViews`); moved out of :mod:`synthpath.audit.neighbours`,
which re-exports both."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .overhang import partial_distances
from .neighbours import NeighbourIndex, Neighbours, _as2d, _as_views, _device, _no_neighbours


class DenseViews:
    """Query views held as one tensor [Q, V, D], behind the interface that lazy views (e.g.
    :class:`synthpath.pixel_space.PixelQueries`) offer the two-stage search."""

    def __init__(self, views: Tensor):
        self.views = views

    def __len__(self) -> int:
        return int(self.views.shape[0])

    @property
    def dim(self) -> int:
        return int(self.views.shape[2])

    def __getitem__(self, sl: slice) -> "DenseViews":
        return DenseViews(self.views[sl])

    def to(self, device) -> "DenseViews":
        return DenseViews(self.views.to(device, torch.float32))

    def gather_plan(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """(vectors [Q·V, D], rows [Q, ...]): ``take(index) == vectors[rows]``."""
        n, v = self.views.shape[:2]
        rows = index.to(self.views.device) + v * torch.arange(n, device=self.views.device).view(-1, *[1] * (index.dim() - 1))
        return self.views.reshape(n * v, -1), rows

    def take(self, index: Tensor) -> Tensor:
        """[Q, ..., D]: the views ``index`` [Q, ...] of each query."""
        n, d = index.shape[0], self.dim
        flat = index.reshape(n, -1, 1).to(self.views.device)
        return torch.gather(self.views, 1, flat.expand(-1, -1, d)).reshape(*index.shape, d)


def _first_of_each(key: Tensor) -> tuple[Tensor, Tensor]:
    """(distinct keys, the position of the first occurrence of each in ``key``)."""
    uniq, inv = torch.unique(key, return_inverse=True)
    pos = torch.arange(key.numel(), device=key.device)
    first = torch.full((uniq.numel(),), key.numel(), dtype=torch.long, device=key.device)
    return uniq, first.scatter_reduce(0, inv, pos, "amin")


class TwoStageIndex:
    """Coarse retrieval, then exact verification with local refinement, for a space whose
    queries have many views on a regular grid (the pixel space).

    1. Retrieval: a subset of the query's views (``search_views``: the grid every few px),
       made coarse by ``coarse`` (fewer dims), against a coarse bank (``coarse`` of every
       part) -> the ``candidates`` nearest tiles per query.
    2. Selection: coarse distances of the same view subset to every part of each
       candidate; per candidate and part the ``refine_top`` best views are kept.
    3. Refinement: around each kept (view, part) pair, the views of the full grid nearby
       (``neighbours[v]``: same transform and scale, positions within half a grid step)
       against that part, in float32 at full dimension. A candidate's distance is the
       smallest of these fine distances. With an ``overhang`` table (bool [n_views, S], from
       :func:`synthpath.audit.overhang.overhang_table`), the views of those neighbourhoods
       that lie at their map's border are also compared with the part displaced by each
       allowed number of cells across the border, over the cells they share
       (:func:`synthpath.audit.overhang.partial_distances`): a part that a shifted, zoomed
       copy crops is still matched.

    A query costs ``V_sub x P x (N + candidates)`` coarse dot products plus
    ``P x refine_top x R x candidates`` fine ones, instead of ``V x P x N`` fine ones. With at most
    ``candidates`` tiles in the bank, stage 2 runs on all of them. Same interface as
    :class:`NeighbourIndex`; distances and neighbour order are float32-exact for the views
    it compares. Queries may be a tensor [Q, V, D] or lazy views (with ``take`` and ``gather_plan``,
    e.g. :class:`synthpath.pixel_space.PixelQueries`): only the views the stages read are
    then built, with the same distances.
    """

    def __init__(self, base, *, parts: int, coarse, search_views: Tensor, neighbours: Tensor, candidates: int = 32,
                 refine_top: int = 8, device=None, precision: str = "auto", overhang: Tensor | None = None,
                 overhang_cells: int = 0):
        b = _as2d(base, "base")
        if not b.is_floating_point() or parts < 1 or b.shape[1] % parts:
            raise ValueError(f"base must be a float [N, parts*D] tensor with {parts} parts, got {b.dtype} {tuple(b.shape)}")
        self.device = _device(device)
        self.exact = b.to(self.device)  # the bank as stored (fp16), for the fine distances
        self.n, self.parts, self.dim = int(b.shape[0]), int(parts), int(b.shape[1]) // int(parts)
        self.candidates = int(candidates)
        self.refine_top = int(refine_top)
        self._coarse_fn = coarse
        self._sub = search_views.to(self.device, torch.long)
        self._nbr = neighbours.to(self.device, torch.long)
        self._ovh = None if overhang is None or overhang_cells < 1 else overhang.to(self.device, torch.bool)
        self._ovh_cells = int(overhang_cells)
        self._grid = int(round(((self.dim - 1) / 3) ** 0.5))
        self._border_sub = self._ovh[self._sub].any(1) if self._ovh is not None else None  # search views at a border
        self._border_n = int(self._border_sub.sum()) if self._ovh is not None else 0
        if self._ovh is not None and 3 * self._grid ** 2 + 1 != self.dim:
            raise ValueError(f"overhang matching needs views of 3g²+1 dims, got {self.dim}")
        if self._nbr.shape[0] != self._sub.shape[0]:
            raise ValueError(f"neighbours has {self._nbr.shape[0]} rows for {self._sub.shape[0]} search views")
        cb = coarse(self.exact.float().reshape(self.n, parts, self.dim)) if self.n else \
            torch.zeros(0, parts, 1, device=self.device)
        self._cbank = cb.contiguous()  # [N, P, Dc] float32
        self.coarse: NeighbourIndex | None = None
        if self.n > self.candidates:
            self.coarse = NeighbourIndex(cb.reshape(self.n, -1), parts=parts, device=self.device, precision=precision)

    def __len__(self) -> int:
        return self.n

    def _verify_refine(self, q, cq: Tensor, cand: Tensor) -> Tensor:
        """Squared fine distances [b, c] of queries (their views q, ``take``-able, coarse search views
        cq [b, Vs, Dc]) to candidate tiles cand [b, c]: per candidate and part the
        ``refine_top`` best search views by coarse distance, each refined over its
        neighbouring views."""
        b, c = cand.shape
        P, D = self.parts, self.dim
        crows = self._cbank[cand.clamp_min(0)].reshape(b, c * P, -1)
        d2 = (cq.pow(2).sum(-1, keepdim=True) + crows.pow(2).sum(-1).unsqueeze(1)
              - 2.0 * torch.bmm(cq, crows.transpose(1, 2)))  # [b, Vs, c*P]
        vs = cq.shape[1]
        d2 = d2.view(b, vs, c, P).permute(0, 2, 3, 1)  # [b, c, P, Vs]
        r = min(self.refine_top, vs)
        top = torch.topk(d2, r, dim=3, largest=False).indices  # best views of every part
        if self._ovh is not None and self._border_n:
            # and the best views at a border: a part that the border crops matches them poorly at
            # the coarse scale (a whole coarse window against a cropped part), so they are
            # rarely among the best overall
            far = d2.masked_fill(~self._border_sub, float("inf"))
            top = torch.cat([top, torch.topk(far, min(self.refine_top, self._border_n), dim=3, largest=False).indices], 3)
        r = top.shape[3]
        v_sub = top.reshape(b, c, P * r)
        part = torch.arange(P, device=cand.device).repeat_interleave(r).expand(b, c, P * r)
        r = P * r
        nbr = self._nbr[v_sub]  # [b, c, r, R] view indices into q
        vecs, pos = q.gather_plan(nbr)  # the distinct views [U, D], where each entry of nbr is in them
        rows = self.exact[cand.clamp_min(0)].float().view(b, c, P, D)
        ref = torch.gather(rows, 2, part.unsqueeze(-1).expand(-1, -1, -1, D))  # [b, c, r, D]
        fine = torch.empty(b, c, device=cand.device)
        for i in range(b):  # one query at a time: [c, r, R, D] stays small (cache-sized), not [b, c, r, R, D]
            views = vecs.index_select(0, pos[i].flatten()).view(nbr.shape[1:] + (D,))
            fine[i] = (views - ref[i].unsqueeze(2)).pow(2).sum(-1).amin(dim=(1, 2))
            if self._ovh is not None:  # border views: the part displaced across the border, shared cells
                ci, ri, ni, si = self._ovh[nbr[i]].nonzero(as_tuple=True)
                if ci.numel():  # each distinct (candidate, part, view, displacement) once: neighbourhoods overlap
                    n_s = self._ovh.shape[1]
                    key = ((ci * P + part[i, ci, ri]) * self._ovh.shape[0] + nbr[i, ci, ri, ni]) * n_s + si
                    _, first = _first_of_each(key)
                    ci, ri, ni, si = ci[first], ri[first], ni[first], si[first]
                    d2m = partial_distances(views[ci, ri, ni], ref[i, ci, ri], si, self._grid, self._ovh_cells)
                    part_min = torch.full((c,), float("inf"), device=cand.device).scatter_reduce(0, ci, d2m, "amin")
                    fine[i] = torch.minimum(fine[i], part_min)
        return fine.masked_fill(cand < 0, float("inf"))

    def search(self, queries, k: int, *, query_chunk: int | None = None) -> Neighbours:
        lazy = hasattr(queries, "take") and not isinstance(queries, (Tensor, np.ndarray))
        qv = queries if lazy else DenseViews(_as_views(queries))
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        nq, d = len(qv), qv.dim
        if d != self.dim:
            raise ValueError(f"query dim {d} != base dim {self.dim}")
        out_d, out_i = _no_neighbours(nq, k)
        if nq == 0 or self.n == 0:
            return Neighbours(out_d, out_i)
        c = min(self.n, max(self.candidates, k))
        step = max(1, query_chunk or 16)
        for s in range(0, nq, step):
            q = qv[s:s + step].to(self.device)
            b = len(q)
            cq = self._coarse_fn(q.take(self._sub.expand(b, -1)))
            if self.coarse is None:
                cand = torch.arange(self.n, device=self.device).expand(b, self.n).contiguous()
            else:
                cand = self.coarse.search(cq, c).index.to(self.device)
            d2 = self._verify_refine(q, cq, cand)
            d2, pos = torch.sort(d2, dim=1)
            idx = torch.gather(cand, 1, pos)
            m = min(k, c)
            out_d[s:s + b, :m] = d2[:, :m].clamp_min(0).sqrt().cpu()
            out_i[s:s + b, :m] = idx[:, :m].cpu()
        return Neighbours(out_d, out_i)
