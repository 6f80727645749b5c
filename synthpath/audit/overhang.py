"""Masked matching of partly covered reference parts (the pixel space's refinement stage).

A copy that is shifted by up to half a tile AND zoomed in (scale 0.9) keeps only ~26 px of
its source tile along an axis, so no half-tile (32 px) reference part lies wholly inside it:
every part is cropped by the copy's border by up to ~6 px, i.e. up to two 4-px cells. The
refinement stage then also compares a query window *at the border of its (transformed,
rescaled) map* with a reference part displaced by ``(my, mx)`` cells across that border:
only the cells the two share (``(g - |my|) x (g - |mx|)``) are compared, each side
re-standardised per colour channel over the shared cells and L2-normalised, exactly as a
whole window is. Because standardisation is a per-channel affine map, re-standardising the
shared cells of an already standardised window equals standardising its raw cells (up to
the clamp on near-constant channels, applied identically to both sides), so the shared
cells can be cut from the ordinary views and parts: the dense and the lazy query views give
the same distances.

A displacement is tried only where the reference's cells beyond the shared block would lie
outside the query map (the window is within one search step of that border): the search
does not trade a fully visible part for a partial one, it only adds the partial overlaps a
border crop leaves. The audit calibrates its thresholds on these same distances (the
holdout tiles go through the same search), so the false-positive rate stays calibrated.
"""

from __future__ import annotations

import torch
from torch import Tensor


def shifts(cells: int) -> list[tuple[int, int]]:
    """The displacements (my, mx) in cells, each in -cells..cells, without (0, 0)."""
    r = range(-int(cells), int(cells) + 1)
    return [(a, b) for a in r for b in r if (a, b) != (0, 0)]


def overhang_table(space) -> Tensor | None:
    """bool [n_views, len(shifts)]: which displacement each query view of the pixel space
    ``space`` may be compared at (the reference part crossing the map's border there);
    ``None`` when ``space.overhang_cells`` is 0."""
    cells = int(getattr(space, "overhang_cells", 0) or 0)
    if cells < 1:
        return None
    table, _ = space._view_table()
    r = space.substeps
    per_map = torch.tensor([space._positions_at(sc) for sc in space.scales for _ in space.transforms])
    p = per_map[table[:, 0]]
    i, j = table[:, 1], table[:, 2]
    near = {"top": i < r, "bottom": i >= p - r, "left": j < r, "right": j >= p - r}
    cols = []
    for my, mx in shifts(cells):
        ok_y = torch.ones_like(i, dtype=torch.bool) if my == 0 else (near["top"] if my > 0 else near["bottom"])
        ok_x = torch.ones_like(j, dtype=torch.bool) if mx == 0 else (near["left"] if mx > 0 else near["right"])
        cols.append(ok_y & ok_x)
    return torch.stack(cols, dim=1)


def _restandardise(x: Tensor, full_std: Tensor) -> Tensor:
    """[M, 3, h, w] cells -> [M, 3hw]: per-channel standardised over the cells (a channel's
    std is clamped at a quarter of its std over the whole window, so a near-constant strip is
    not blown up), then L2-normalised."""
    c = x - x.mean(dim=(-2, -1), keepdim=True)
    sd = c.square().mean(dim=(-2, -1)).sqrt()
    sd = torch.maximum(sd, 0.25 * full_std).clamp_min(1e-8)
    v = (c / sd[..., None, None]).flatten(1)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)


def partial_distances(q: Tensor, z: Tensor, shift: Tensor, grid: int, cells: int) -> Tensor:
    """Squared distances [M] between query views ``q`` [M, 3g²+1] and reference parts ``z``
    [M, 3g²+1] displaced by ``shifts(cells)[shift[m]]`` (query cell row a <-> part row
    a + my, columns alike), over the cells they share. The textureless marker (last
    coordinate) counts as in a whole-window distance."""
    g = int(grid)
    out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    if not q.shape[0]:
        return out
    qb = q[:, :-1].float().view(-1, 3, g, g)
    zb = z[:, :-1].float().view(-1, 3, g, g)
    q_std = qb.flatten(2).std(dim=2, unbiased=False)
    z_std = zb.flatten(2).std(dim=2, unbiased=False)
    marker = (q[:, -1].float() - z[:, -1].float()).square()
    for s, (my, mx) in enumerate(shifts(cells)):
        sel = (shift == s).nonzero(as_tuple=True)[0]
        if not sel.numel():
            continue
        a0, a1 = max(0, -my), min(g, g - my)
        b0, b1 = max(0, -mx), min(g, g - mx)
        vq = _restandardise(qb[sel, :, a0:a1, b0:b1], q_std[sel])
        vz = _restandardise(zb[sel, :, a0 + my:a1 + my, b0 + mx:b1 + mx], z_std[sel])
        out[sel] = (vq - vz).square().sum(1) + marker[sel]
    return out
