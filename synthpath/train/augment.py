"""Training-time augmentation of the rows a step trains on (``train.augment``).

``dihedral``: each training tile gets one of the 8 symmetries of the square (the 4 rotations
by 90 degrees, each with or without a left-right flip), drawn uniformly and independently per
tile. H&E sections have no preferred orientation, so every transformed tile is as real as
the original; a small store (the demo's public model sees one 5x tile per 256-px case) is
worth eight times as many distinct tiles to the model.

The same transform is applied to everything that is spatially tied to the tile: the tile
``x0``, its parent crop (``cond.parent``: the part of the parent that covers the tile, so it
stays aligned with it), the known pixels (``cond.known``) and their mask (``cond.mask``).
Label, level and ``has_parent`` are unchanged.

Privacy: the transform of a tile is drawn from the public rows stream and applied to that
tile alone, before its rows are repeated for noise multiplicity, so every row of a unit stays
a function of that unit only. Per-unit clipping and the accounting do not change (the
augmentation is part of the per-unit loss). It is applied only to the rows a training step
sees: the audit's membership attack and every other reader of the tile store see the tiles
as stored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models import Cond

MODES = ("none", "dihedral")
N_DIHEDRAL = 8


def dihedral(x: Tensor, k: int) -> Tensor:
    """Symmetry ``k`` (0-7) of the square on the last two dims: rotate by ``k % 4`` quarter
    turns (counter-clockwise), then flip left-right when ``k >= 4``. ``k = 0`` is the identity."""
    if not 0 <= int(k) < N_DIHEDRAL:
        raise ValueError(f"dihedral transform index must be in 0..7, got {k}")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"dihedral transforms need square images, got {tuple(x.shape[-2:])}")
    y = torch.rot90(x, int(k) % 4, dims=(-2, -1))
    return torch.flip(y, dims=(-1,)) if k >= 4 else y


def apply_dihedral(x0: Tensor, cond: Cond, ks: Tensor) -> tuple[Tensor, Cond]:
    """Tile ``i`` of ``x0`` [B,3,H,W] and its parent crop, known pixels and mask transformed
    by symmetry ``ks[i]``."""
    ks = torch.as_tensor(ks, dtype=torch.long).reshape(-1)
    if ks.numel() != x0.shape[0] or cond.batch_size != x0.shape[0]:
        raise ValueError(f"need one transform per tile: {x0.shape[0]} tiles, {ks.numel()} transforms, "
                         f"{cond.batch_size} conditions")
    ks = ks.to(x0.device)
    fields = {"parent": cond.parent, "known": cond.known, "mask": cond.mask}
    x_out = x0.clone()
    out = {n: t.clone() for n, t in fields.items()}
    for k in torch.unique(ks).tolist():
        if k == 0:
            continue
        sel = ks == k
        x_out[sel] = dihedral(x0[sel], k)
        for n, t in fields.items():
            out[n][sel] = dihedral(t[sel], k)
    return x_out, cond.replace(**out)


class Augment:
    """Draws and applies the per-tile augmentation of ``train.augment`` (``none``: identity)."""

    def __init__(self, mode: str, generator: torch.Generator | None):
        if mode not in MODES:
            raise ValueError(f"train.augment must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.generator = generator

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def draw(self, n: int) -> Tensor:
        """One symmetry index per tile (from the rows stream, so a resumed run draws the same)."""
        gdev = self.generator.device if self.generator is not None else torch.device("cpu")
        return torch.randint(0, N_DIHEDRAL, (n,), generator=self.generator, device=gdev)

    def __call__(self, x0: Tensor, cond: Cond) -> tuple[Tensor, Cond]:
        if not self.active or x0.shape[0] == 0:
            return x0, cond
        return apply_dihedral(x0, cond, self.draw(x0.shape[0]))
