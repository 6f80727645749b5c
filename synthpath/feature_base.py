"""The feature-space interface shared by every space (:mod:`synthpath.features` lists them):
input conversion, L2 normalisation, device choice and the :class:`FeatureSpace` base class."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


class FeatureSpaceError(ValueError):
    """A feature space cannot be built or used (missing file, missing package, bad input)."""


# --------------------------------------------------------------------------- inputs
def as_model_images(images: Any, device: torch.device | str | None = None) -> Tensor:
    """Any accepted image batch -> float32 [N, 3, H, W] in [-1, 1] on ``device``.

    Accepted: uint8 numpy/torch ``[N, H, W, 3]`` (tile-store layout) or a float tensor
    ``[N, 3, H, W]`` in [-1, 1] (model layout). A single image gets a batch axis.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.array(images, copy=not images.flags.writeable or not images.flags.c_contiguous))
    if not isinstance(images, Tensor):
        raise FeatureSpaceError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    x = images
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise FeatureSpaceError(f"images must be 4-D, got shape {tuple(images.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] != 3:
            raise FeatureSpaceError(f"uint8 images must be [N,H,W,3], got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    else:
        if x.shape[1] != 3:
            raise FeatureSpaceError(f"float images must be [N,3,H,W] in [-1,1], got shape {tuple(x.shape)}")
        x = x.float()
    if device is not None:
        x = x.to(device)
    return x.contiguous()


def l2_normalize(x: Tensor, eps: float = 1e-8) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA, a no-op elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------- interface
class FeatureSpace:
    """Base class: subclasses implement :meth:`_embed` on [-1,1] float images on ``device``."""

    name: str = "base"
    label: str = "base"
    l2: bool = True
    parts: int = 1  # vectors per reference row (embed -> [N, parts * view_dim])
    shift_tolerance_px: int = 0  # largest shift of a copy the space is built to catch

    def __init__(self, device: torch.device | str | None = None, batch_size: int = 256):
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)

    def _embed(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} does not implement _embed")

    @torch.no_grad()
    def embed(self, images: Any) -> Tensor:
        """float32 [N, D] on the CPU (L2-normalised when ``self.l2``)."""
        x = as_model_images(images)
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            xb = x[i : i + self.batch_size].to(self.device)
            with _autocast(self.device):
                f = self._embed(xb)
            f = f.float()
            if self.l2:
                f = l2_normalize(f)
            out.append(f.cpu())
        if not out:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        return torch.cat(out)

    def embed_views(self, images: Any) -> Tensor:
        """float32 [N, V, D]: the query views (V = 1 unless the space needs shifted views)."""
        return self.embed(images).unsqueeze(1)

    def query_views(self, images: Any):
        """The query views as the neighbour search takes them: :meth:`embed_views` here; a space
        with many views may return them lazily (see :class:`synthpath.pixel_space.PixelQueries`)."""
        return self.embed_views(images)

    @property
    def dim(self) -> int:
        raise TypeError(f"{type(self).__name__} does not define dim")

    @property
    def view_dim(self) -> int:
        """Width of one query view (= ``dim`` unless a reference row holds several parts)."""
        return self.dim // self.parts

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label, "dim": self.dim, "l2_normalised": self.l2}
