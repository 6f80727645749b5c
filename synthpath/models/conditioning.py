"""The conditions one synthpath model is given, bundled in a :class:`Cond`.

One network does layout, zoom-in, outpainting and unconditional sampling, so every call
carries the same set of conditions and "absent" is encoded explicitly:

- ``log_mpp`` [B] float: natural log of the level's µm/px (the magnification);
- ``label`` [B] long: class index, where ``num_classes`` is the *null label* (no label,
  used for classifier-free guidance and for unlabelled tiles);
- ``parent`` [B,3,H,W] in [-1,1]: the parent tile's crop upsampled to the tile size;
  ``has_parent`` [B] bool says whether it is real (False at the coarsest level);
- ``known`` [B,3,H,W] in [-1,1] and ``mask`` [B,1,H,W] (1 = known pixel): pixels already
  fixed by neighbouring tiles. The network only ever sees ``known * mask``, so ``known``
  may hold a whole clean tile while the mask is zero (that is how :meth:`Cond.from_batch`
  hands training tiles to :func:`synthpath.models.diffusion.drop_conditions`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

_TENSOR_FIELDS = ("log_mpp", "label", "parent", "has_parent", "known", "mask")


@dataclass
class Cond:
    log_mpp: Tensor
    label: Tensor
    parent: Tensor
    has_parent: Tensor
    known: Tensor
    mask: Tensor
    num_classes: int

    def __post_init__(self) -> None:
        b = self.label.shape[0]
        for name in _TENSOR_FIELDS:
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"Cond.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.shape[0] != b:
                raise ValueError(f"Cond.{name} has batch size {t.shape[0]}, but label has {b}")
        if self.parent.dim() != 4 or self.parent.shape[1] != 3:
            raise ValueError(f"Cond.parent must be [B,3,H,W], got {tuple(self.parent.shape)}")
        if self.known.shape != self.parent.shape:
            raise ValueError(f"Cond.known must match parent's shape {tuple(self.parent.shape)}, got {tuple(self.known.shape)}")
        if self.mask.shape != (b, 1, *self.parent.shape[2:]):
            raise ValueError(f"Cond.mask must be [B,1,H,W], got {tuple(self.mask.shape)}")
        if self.num_classes < 1:
            raise ValueError(f"Cond.num_classes must be at least 1, got {self.num_classes}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def unconditional(
        cls,
        batch: int,
        tile_px: int,
        num_classes: int,
        log_mpp: float | Tensor = 0.0,
        *,
        label: int | Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> "Cond":
        """A batch with no parent, no known pixels and (unless ``label`` is given) the null label."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        lm = torch.as_tensor(log_mpp, dtype=torch.float32, device=device)
        lm = lm.expand(batch).clone() if lm.dim() == 0 else lm.reshape(batch)
        if label is None:
            lab = torch.full((batch,), num_classes, dtype=torch.long, device=device)
        else:
            lab = torch.as_tensor(label, dtype=torch.long, device=device)
            lab = lab.expand(batch).clone() if lab.dim() == 0 else lab.reshape(batch)
        zeros = torch.zeros(batch, 3, tile_px, tile_px, device=device)
        return cls(
            log_mpp=lm,
            label=lab,
            parent=zeros,
            has_parent=torch.zeros(batch, dtype=torch.bool, device=device),
            known=zeros.clone(),
            mask=torch.zeros(batch, 1, tile_px, tile_px, device=device),
            num_classes=num_classes,
        )

    @classmethod
    def from_batch(cls, batch: dict, num_classes: int) -> "Cond":
        """Build conditions from a collated :class:`synthpath.tiles.dataset.TileDataset` batch.

        Unlabelled tiles (label -1) get the null label. ``known`` is set to the clean image
        with an all-zero mask, ready for :func:`~synthpath.models.diffusion.drop_conditions`
        to reveal random border strips of it.
        """
        for key in ("image", "parent", "has_parent", "log_mpp", "label"):
            if key not in batch:
                raise KeyError(f"tile batch is missing {key!r} (has {sorted(batch)})")
        image = batch["image"].float()
        label = batch["label"].long().clone()
        bad = (label >= num_classes) | (label < -1)
        if bool(bad.any()):
            raise ValueError(f"tile labels {sorted(set(label[bad].tolist()))} are outside 0..{num_classes - 1} (or -1)")
        label[label < 0] = num_classes
        b, _, h, w = image.shape
        return cls(
            log_mpp=batch["log_mpp"].float().reshape(b),
            label=label.reshape(b),
            parent=batch["parent"].float(),
            has_parent=batch["has_parent"].bool().reshape(b),
            known=image,
            mask=torch.zeros(b, 1, h, w, device=image.device),
            num_classes=num_classes,
        )

    # ------------------------------------------------------------------ helpers
    @property
    def batch_size(self) -> int:
        return self.label.shape[0]

    @property
    def tile_px(self) -> int:
        return self.parent.shape[-1]

    def to(self, device: torch.device | str) -> "Cond":
        return replace(self, **{n: getattr(self, n).to(device) for n in _TENSOR_FIELDS})

    def index(self, idx: Tensor | slice | Sequence[int]) -> "Cond":
        """Select samples (a slice, index list, or bool/long tensor)."""
        if isinstance(idx, Sequence) and not isinstance(idx, Tensor):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        if isinstance(idx, Tensor):
            idx = idx.to(self.label.device)
        return replace(self, **{n: getattr(self, n)[idx] for n in _TENSOR_FIELDS})

    def repeat(self, n: int) -> "Cond":
        """Each sample repeated ``n`` times in a row (sample-major), e.g. for noise multiplicity."""
        return replace(self, **{n_: getattr(self, n_).repeat_interleave(n, dim=0) for n_ in _TENSOR_FIELDS})

    def with_null_label(self) -> "Cond":
        return replace(self, label=torch.full_like(self.label, self.num_classes))

    def replace(self, **changes) -> "Cond":
        return replace(self, **changes)

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        if not conds:
            raise ValueError("Cond.cat needs at least one Cond")
        k = {c.num_classes for c in conds}
        if len(k) != 1:
            raise ValueError(f"cannot concatenate conditions with different num_classes {sorted(k)}")
        return Cond(**{n: torch.cat([getattr(c, n) for c in conds]) for n in _TENSOR_FIELDS}, num_classes=k.pop())


def log_mpp(mpp: float) -> float:
    """Natural log of a resolution in µm/px (the level coordinate the model sees)."""
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    return math.log(mpp)


__all__ = ["Cond", "log_mpp"]
