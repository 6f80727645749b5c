"""The pixel near-copy space (:class:`PixelSpace`, ``pixel``) and its lazy query views
(:class:`PixelQueries`).

A query tile has ~27k views (every half-tile window of 8 dihedral transforms at 3 scales), but
the two-stage search (:class:`synthpath.audit.neighbours.TwoStageIndex`) reads only the views
every ``cell`` px plus the small neighbourhoods it refines. :meth:`PixelSpace.query_views`
therefore keeps only the pooled maps of each transform and scale (~1 MB per 64-px tile instead
of ~20 MB of views) and builds and normalises a view when the search asks for it
(:meth:`PixelQueries.take`); :meth:`PixelSpace.embed_views` still materialises every view
(same vectors; the tests compare both paths).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .feature_base import FeatureSpace, FeatureSpaceError, as_model_images, l2_normalize


def _gaussian_kernel(sigma: float) -> Tensor:
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


_DIHEDRAL = tuple((flip, rot) for flip in (False, True) for rot in range(4))


def dihedral(x: Tensor, flip: bool, rot: int) -> Tensor:
    """One of the 8 symmetries of the square on the last two axes: an optional horizontal
    flip, then ``rot`` quarter turns."""
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, rot, dims=(-2, -1)) if rot else x


class PixelSpace(FeatureSpace):
    """Pixel near-copy space that the 8 dihedral transforms, shifts up to half a tile, small
    scale changes, colour/stain jitter, JPEG and blur do not fool.

    A tile is area-pooled over ``cell``-px cells (``g = grid``; ``cell = tile_px / 2 / g``)
    every ``cell / substeps`` px (1 px by default). Each *part* or *view* is a ``g x g``-cell
    window of that map (half a tile per side), standardised per colour channel (so a
    per-channel gain and offset, i.e. a stain or colour shift, cancels) and L2-normalised.
    There is no blur by default (``blur_sigma = 0``): a blur would mix the tissue around a
    window into its edge cells, so a quadrant copied next to *other* tissue would no longer
    match its reference, while pure cell averaging keeps a window's value a function of its
    own pixels only.

    - Reference (training) tiles: ``layout x layout`` half-tile windows at offsets 0, T/4 and
      T/2 on each axis (default 3x3 = 9 parts: the 4 quadrants, the 4 edge centres and the
      centre; ``embed`` -> [N, 9·D]).
    - Queries: every window position (every ``cell / substeps`` px) of each of the 8
      dihedral transforms of the map, at each scale (``embed_views`` -> [N, n_views, D]).

    Why this catches a half-tile shift: if a training tile sits in the query moved by
    (dy, dx) with ``|dy|, |dx| <= tile_px / 2`` (the rest being any other tissue), one of its
    quadrants lies wholly inside the query, at an offset that the 1-px window grid meets
    within half a pixel (a 2-px grid, half a pixel more, lost up to 10% of random sub-pixel
    shifts). A zoomed-in copy (scale 0.9) crops every quadrant but keeps the centre window;
    the edge-centre windows cover a shift along one axis combined with a zoom. Scale changes:
    the query is also viewed resized by each of ``scales`` (default 0.9, 1 and 1.1, for
    copies within ±10%). For a dihedral copy, one of the 8 transforms of the query undoes it.

    Search (:class:`synthpath.audit.neighbours.TwoStageIndex`, built by
    ``synthpath.audit.filter.bank_index``): comparing all ~27k views with 9 parts of every
    training tile would cost ~50 MFLOP per (query, training tile), so the search is coarse to
    fine: the views every ``cell`` px, made coarse by :meth:`coarse` (2x2 cells pooled,
    49-d), retrieve ``candidates`` training tiles; per candidate the best (view, part) pairs
    by coarse distance are refined over the full 1-px grid around them, and the smallest fine
    distance is the tile's distance. The audit's thresholds are calibrated on exactly these
    distances. The search takes the lazy :meth:`query_views` (pooled maps; only the views it
    reads are built, about half of them); :meth:`embed_views` materialises them all.

    Windows with (almost) no texture (largest channel std below ``min_std`` in [-1, 1]
    units, e.g. blank glass) say nothing about copying: they are moved far away (an extra
    coordinate of +3 in references, -3 in queries), so they never match anything.
    """

    name = "pixel"
    label = "pixels (blurred, pooled; dihedral, half-tile-shift tolerant)"
    parts = 9

    def __init__(self, tile_px: int, *, grid: int = 8, blur_sigma: float | None = None, min_std: float = 0.03,
                 substeps: int = 4, scales: tuple[float, ...] = (0.9, 1.0, 1.1), dihedral_views: bool = True, device=None,
                 batch_size: int = 256, layout: int = 3, candidates: int = 32, overhang_cells: int = 2):
        super().__init__(device, batch_size)
        if tile_px < 8:
            raise FeatureSpaceError(f"pixel space needs tiles of at least 8 px, got {tile_px}")
        self.tile_px = int(tile_px)
        half = self.tile_px // 2
        self.grid = int(max(2, min(grid, half)))
        self.cell = half // self.grid
        self.span = 2 * self.grid * self.cell  # the pooled part of the tile (its centre)
        self.margin = (self.tile_px - self.span) // 2
        self.substeps = int(max(1, min(substeps, self.cell)))
        while self.cell % self.substeps:
            self.substeps -= 1
        self.step = self.cell // self.substeps  # window stride in px
        self.blur_sigma = float(0.0 if blur_sigma is None else blur_sigma)
        self._kernel = _gaussian_kernel(self.blur_sigma) if self.blur_sigma > 0 else None
        self.min_std = float(min_std)
        self.scales = tuple(float(v) for v in scales)
        if not self.scales or any(not 0.5 <= v <= 2.0 for v in self.scales):
            raise FeatureSpaceError(f"pixel space scales must be in 0.5..2, got {scales}")
        self.dihedral_views = bool(dihedral_views)
        self.transforms = _DIHEDRAL if self.dihedral_views else _DIHEDRAL[:1]
        self.layout = int(layout)
        last = self.grid * self.substeps
        if self.layout < 2 or last % (self.layout - 1):
            raise FeatureSpaceError(f"pixel space layout must be >= 2 and divide the window grid ({last}), got {layout}")
        self.part_at = [i * last // (self.layout - 1) for i in range(self.layout)]
        self.parts = self.layout * self.layout
        self.candidates = int(candidates)
        if self.candidates < 1:
            raise FeatureSpaceError(f"pixel space candidates must be at least 1, got {candidates}")
        self.overhang_cells = int(max(0, min(overhang_cells, self.grid // 2 - 1)))  # partial parts at map borders
        self.l2 = False  # each part is L2-normalised on its own in _embed

    @property
    def view_dim(self) -> int:
        return 3 * self.grid * self.grid + 1

    @property
    def dim(self) -> int:
        return self.parts * self.view_dim

    @property
    def positions(self) -> int:
        """Window positions per axis."""
        return self.grid * self.substeps + 1

    def _side_at(self, scale: float) -> int:
        """Side (px) of the query resized by ``scale`` (at least one window)."""
        return self.tile_px if scale == 1.0 else max(self.grid * self.cell, int(round(self.tile_px * scale)))

    def _positions_at(self, scale: float) -> int:
        side = self._side_at(scale) - (2 * self.margin if scale == 1.0 else 0)
        fine = (side - self.cell) // self.step + 1
        return fine - (self.grid - 1) * self.substeps

    @property
    def n_views(self) -> int:
        return len(self.transforms) * sum(self._positions_at(s) ** 2 for s in self.scales)

    @property
    def shift_tolerance_px(self) -> int:
        """Largest shift (px, per axis) of a copied training tile this space is built to catch."""
        return self.tile_px // 2

    # ---------------------------------------------------------------- coarse stage
    @property
    def has_coarse(self) -> bool:
        """Whether the two-stage search can use a coarse version of this space (an even grid)."""
        return self.grid % 2 == 0 and self.grid >= 4

    @property
    def coarse_dim(self) -> int:
        return 3 * (self.grid // 2) ** 2 + 1

    def coarse(self, v: Tensor) -> Tensor:
        """Fine part/view vectors [..., 3g²+1] -> coarse ones [..., 3(g/2)²+1]: the same window
        with 2x2 cells pooled into one, re-standardised per channel and L2-normalised; the
        textureless marker (the last coordinate) is kept, so a blank window stays far away.
        Pooling standardised cells equals standardising pooled cells up to a per-channel affine
        map, so this is the coarse embedding of the same pixels."""
        g, h = self.grid, self.grid // 2
        lead = v.shape[:-1]
        body = v[..., :-1].float().reshape(-1, 3, h, 2, h, 2).mean(dim=(3, 5))
        mean = body.mean(dim=(-2, -1), keepdim=True)
        std = body.std(dim=(-2, -1), keepdim=True, unbiased=False)
        z = l2_normalize(((body - mean) / std.clamp_min(1e-6)).flatten(1))
        return torch.cat([z.reshape(*lead, 3 * h * h), v[..., -1:].float()], dim=-1)

    def _grid_views(self):
        """(search view indices, their neighbour table): the search views are the window
        positions every ``cell`` px (``substeps`` grid positions) of every transform at every
        scale; each one's neighbours are the positions within half that step (same transform
        and scale), so the refinement reaches every position of the full grid."""
        sub, nbr, start, r = [], [], 0, self.substeps
        h = r // 2
        offs = range(-h, r - h + (1 if r > 1 else 0))
        for sc in self.scales:
            p = self._positions_at(sc)
            keep = [(i, j) for i in range(0, p, r) for j in range(0, p, r)]
            near = [[min(max(i + a, 0), p - 1) * p + min(max(j + b, 0), p - 1) for a in offs for b in offs]
                    for i, j in keep]
            for _ in self.transforms:
                sub += [start + i * p + j for i, j in keep]
                nbr += [[start + v for v in row] for row in near]
                start += p * p
        return torch.tensor(sub, dtype=torch.long), torch.tensor(nbr, dtype=torch.long)

    def search_views(self) -> Tensor:
        """Indices of the query views the retrieval and verification stages compare."""
        return self._grid_views()[0]

    def view_neighbours(self) -> Tensor:
        """[len(search_views), substeps²]: for each search view, the views of the full grid
        that the refinement stage tries around it."""
        return self._grid_views()[1]

    def _blur(self, x: Tensor) -> Tensor:
        if self._kernel is None:
            return x
        k = self._kernel.to(x.device, x.dtype)
        r = k.numel() // 2
        c = x.shape[1]
        mode = "reflect" if r < min(x.shape[-2:]) else "replicate"
        x = F.pad(x, (r, r, r, r), mode=mode)
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.tile_px or x.shape[-2] != self.tile_px:
            raise FeatureSpaceError(f"pixel space was built for {self.tile_px} px tiles, got {tuple(x.shape[-2:])}")

    def _map(self, x: Tensor, scale: float = 1.0) -> Tensor:
        """[N, 3, M, M]: the blurred tile (resized by ``scale`` first) pooled over ``cell``-px
        cells every ``step`` px (at scale 1, M = (2g - 1)·substeps + 1; cells ``substeps``
        apart tile the pooled span)."""
        self._check(x)
        x = x.float()
        m = self.margin
        if scale != 1.0:
            side = self._side_at(scale)
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
            m = 0
        x = self._blur(x)
        x = x[:, :, m:x.shape[-2] - m, m:x.shape[-1] - m]
        return F.avg_pool2d(x, self.cell, stride=self.step) if self.cell > 1 else x

    def _windows(self, m: Tensor, at: list[int] | None = None) -> Tensor:
        """[N, W, 3, g, g]: g x g cell windows of a map, at fine positions ``at`` (both axes;
        default every position)."""
        g, r = self.grid, self.substeps
        if at is not None:
            span = (g - 1) * r + 1
            return torch.stack([m[:, :, i:i + span:r, j:j + span:r] for i in at for j in at], dim=1)
        L = (g - 1) * r + 1
        win = m.unfold(2, L, 1).unfold(3, L, 1)[..., ::r, ::r]  # [n, 3, P, P, g, g]
        p = win.shape[2]
        return win.permute(0, 2, 3, 1, 4, 5).reshape(m.shape[0], p * p, 3, g, g)

    def _normalise(self, w: Tensor, sign: float) -> Tensor:
        """Windows [..., 3, g, g] -> vectors [..., 3g²+1]: per-channel standardised, L2-normalised;
        textureless windows become the far point ``sign * 3`` on the extra axis. The L2 norm
        comes from the channel variances (sum of g²·var/s² over channels) and the result is
        written in one pass (no host sync); equal to standardising, then normalising, up to
        float rounding."""
        lead, cells = w.shape[:-3], w.shape[-2] * w.shape[-1]
        x = w.reshape(-1, w.shape[-3], cells)
        c = x - x.mean(dim=-1, keepdim=True)
        var = c.square().mean(dim=-1, keepdim=True)  # [M, 3, 1]
        std = var.sqrt()
        s2 = std.clamp_min(self.min_std / 4).square()
        norm = (var / s2).sum(dim=1, keepdim=True).mul(cells).sqrt().clamp_min(1e-8)  # [M, 1, 1]
        flat = std.amax(dim=(1, 2)) < self.min_std  # [M]
        scale = torch.where(flat[:, None, None], torch.zeros_like(norm), 1.0 / (s2.sqrt() * norm))
        extra = torch.where(flat, 3.0 * sign, 0.0).to(c.dtype).unsqueeze(-1)
        return torch.cat([(c * scale).flatten(1), extra], dim=-1).reshape(*lead, -1)

    def _embed(self, x: Tensor) -> Tensor:
        quads = self._windows(self._map(x), self.part_at)  # the layout x layout parts [N,P,3,g,g]
        return self._normalise(quads, +1.0).flatten(1)

    def _transformed_maps(self, xb: Tensor):
        """The pooled map of a batch at every scale, under every transform, in view order
        (scale, then transform): what both the materialised and the lazy query views cut."""
        for sc in self.scales:
            m = self._map(xb, sc)
            for flip, rot in self.transforms:
                yield dihedral(m, flip, rot)

    @torch.no_grad()
    def embed_views(self, images: Any) -> Tensor:
        """float32 [N, n_views, 3g²+1]: every half-tile window (every ``cell / substeps`` px) of
        every dihedral transform at every scale."""
        x = as_model_images(images)
        self._check(x)
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            views = [self._windows(m) for m in self._transformed_maps(x[i:i + self.batch_size].to(self.device))]
            out.append(self._normalise(torch.cat(views, dim=1), -1.0).float().cpu())
        if not out:
            return torch.zeros(0, self.n_views, self.view_dim)
        return torch.cat(out)

    # ---------------------------------------------------------------- lazy query views
    def _view_table(self) -> tuple[Tensor, int]:
        """([n_views, 3] (map, row, column) of every view's first cell, padded map side), in the
        order of :meth:`embed_views` (scale, then transform, then row-major position)."""
        if getattr(self, "_table", None) is None:
            g, r = self.grid, self.substeps
            side = max(self._positions_at(sc) + (g - 1) * r for sc in self.scales)  # largest map side
            rows, k = [], 0
            for sc in self.scales:
                p = self._positions_at(sc)
                i, j = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
                for _ in self.transforms:
                    rows.append(torch.stack([torch.full((p * p,), k), i.flatten(), j.flatten()], 1))
                    k += 1
            self._table = (torch.cat(rows), side)
        return self._table

    @torch.no_grad()
    def query_views(self, images: Any) -> "PixelQueries":
        """The query views of ``images``, lazily (:class:`PixelQueries`): the pooled map of
        every transform and scale, computed once per tile; a view is built and normalised only
        when :meth:`PixelQueries.take` asks for it. Same vectors as :meth:`embed_views`."""
        x = as_model_images(images)
        self._check(x)
        table, side = self._view_table()
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            maps = [F.pad(m, (0, side - m.shape[-1], 0, side - m.shape[-2]))
                    for m in self._transformed_maps(x[i:i + self.batch_size].to(self.device))]
            out.append(torch.stack(maps, 1))  # [n, K, 3, side, side]
        k = len(self.scales) * len(self.transforms)
        maps = torch.cat(out).float().contiguous() if out else torch.zeros(0, k, 3, side, side, device=self.device)
        return PixelQueries(self, maps, table.to(maps.device))

    def describe(self) -> dict:
        d = super().describe()
        d.update(tile_px=self.tile_px, grid=self.grid, cell_px=self.cell, window_step_px=self.step, blur_sigma=round(self.blur_sigma, 4),
                 min_std=self.min_std, scales=list(self.scales), parts=self.parts, view_dim=self.view_dim, n_views=self.n_views,
                 l2_normalised="per part / per view", shift_tolerance_px=self.shift_tolerance_px,
                 layout=self.layout, overhang_cells=self.overhang_cells, part_offsets_px=[i * self.step for i in self.part_at], candidates=self.candidates,
                 search_views=int(self.search_views().numel()), coarse_dim=self.coarse_dim if self.has_coarse else None,
                 search="two-stage: coarse retrieval of `candidates` training tiles with the views every cell px "
                        "(2x2-pooled cells), then the best (view, part) pairs per candidate refined on the full "
                        "window grid; distance = smallest fine distance",
                 invariance="8 dihedral transforms (query views), shifts up to half a tile (3x3 half-tile parts x "
                            "1-px window grid), zoom +-10% (query scales; the centre part survives a zoom-in), "
                            "per-channel gain/offset (standardisation), blur/JPEG (pooling)")
        return d


class PixelQueries:
    """Lazy query views of a batch of tiles for :class:`PixelSpace`: the pooled maps of every
    dihedral transform and scale (``maps`` [N, K, 3, side, side], zero-padded to one side);
    view ``v`` of a tile is the ``g x g`` cell window of map ``table[v, 0]`` whose first cell
    is at ``table[v, 1:]``, standardised and normalised when asked for.

    The interface the neighbour search uses (a dense [N, V, D] tensor is wrapped in
    :class:`synthpath.audit.neighbours.DenseViews` with the same one): ``len``, ``dim``,
    ``n_views``, slicing by tiles, ``to(device)``, ``take(index)``, ``gather_plan(index)`` and
    ``materialise()``.
    """

    def __init__(self, space: PixelSpace, maps: Tensor, table: Tensor):
        self.space, self.maps, self.table = space, maps, table

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    @property
    def dim(self) -> int:
        return self.space.view_dim

    @property
    def n_views(self) -> int:
        return int(self.table.shape[0])

    @property
    def device(self) -> torch.device:
        return self.maps.device

    def __getitem__(self, sl: slice) -> "PixelQueries":
        if not isinstance(sl, slice):
            raise TypeError("PixelQueries are sliced by tiles (a slice), e.g. q[0:16]")
        return PixelQueries(self.space, self.maps[sl].contiguous(), self.table)

    def to(self, device) -> "PixelQueries":
        return PixelQueries(self.space, self.maps.to(device), self.table.to(device))

    def vectors(self, tiles: Tensor, views: Tensor) -> Tensor:
        """float32 [U, D]: view ``views[u]`` of tile ``tiles[u]``."""
        n, k, _, side, _ = self.maps.shape
        g, r = self.space.grid, self.space.substeps
        t = self.table[views]
        first = ((tiles * k + t[:, 0]) * 3 * side + t[:, 1]) * side + t[:, 2]  # the window's first cell
        cell = torch.arange(g, device=self.device) * r
        window = ((torch.arange(3, device=self.device) * side * side)[:, None, None] + cell[:, None] * side + cell)
        w = self.maps.reshape(-1).index_select(0, (first[:, None] + window.flatten()).flatten())  # only these windows
        return self.space._normalise(w.view(-1, 3, g, g), -1.0)

    def gather_plan(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """(vectors [U, D], rows [N, ...]) with ``take(index) == vectors[rows]``: each distinct
        (tile, view) of ``index`` [N, ...] is built once, however often ``index`` repeats it
        (the refinement neighbourhoods overlap); one host sync (the number of distinct views)."""
        n = index.shape[0]
        flat = index.reshape(n, -1).to(self.device)
        need = torch.zeros(n, self.n_views, dtype=torch.bool, device=self.device)
        need.scatter_(1, flat, True)
        tiles, views = need.nonzero(as_tuple=True)
        row = torch.zeros(n, self.n_views, dtype=torch.long, device=self.device)
        row[tiles, views] = torch.arange(tiles.shape[0], device=self.device)
        return self.vectors(tiles, views), row.gather(1, flat).view(index.shape)

    def take(self, index: Tensor) -> Tensor:
        """float32 [N, ..., D]: the views ``index`` [N, ...] (view numbers) of each tile."""
        vecs, rows = self.gather_plan(index)
        return vecs.index_select(0, rows.flatten()).reshape(*index.shape, -1)

    def materialise(self) -> Tensor:
        """float32 [N, n_views, D] on the CPU: every view (what :meth:`PixelSpace.embed_views` returns)."""
        n = len(self)
        if n == 0:
            return torch.zeros(0, self.n_views, self.dim)
        tiles = torch.arange(n, device=self.device).repeat_interleave(self.n_views)
        views = torch.arange(self.n_views, device=self.device).repeat(n)
        return self.vectors(tiles, views).reshape(n, self.n_views, -1).float().cpu()
