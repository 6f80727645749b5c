"""The audit's own learned feature space: a small CNN trained self-supervised on the
*training* tiles only, and never released.

Why this objective: a copy detector must map a tile and its slightly altered copies
(shifted, cropped, flipped, rotated by 90°, recoloured, blurred) to nearly the same point,
while keeping different tiles apart. SimCLR's NT-Xent contrastive loss trains exactly that
invariance: two random augmentations of one tile are the positive pair, every other tile in
the batch a negative. Pretrained weights cannot be downloaded here, and an encoder fitted to
the training tiles knows their stain and texture statistics, so it separates them finely.

Architecture: Conv(3x3, stride 2) + GroupNorm + SiLU blocks (no BatchNorm, so embeddings
do not depend on the batch), global average pooling, a 128-d embedding (L2-normalised), and
a 2-layer projection head used only for the loss (SimCLR's choice: the space before the
head keeps more information). Tiles are resized to ``input_px`` (at most 64) first.

Saved as ``encoder.safetensors`` + ``encoder.json`` in the audit folder.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from synthpath.atomic import write_json
from synthpath.features import FeatureSpace, FeatureSpaceError, as_model_images

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_CONFIG = "encoder.json"


def _groups(ch: int) -> int:
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


class AuditEncoder(nn.Module):
    """Small GroupNorm CNN: image [-1,1] [N,3,P,P] -> embedding [N, dim]."""

    def __init__(self, width: int = 16, dim: int = 128, input_px: int = 64, proj_dim: int = 64):
        super().__init__()
        self.config = {"width": width, "dim": dim, "input_px": input_px, "proj_dim": proj_dim}
        chans = [width, width * 2, width * 4, width * 4]
        layers: list[nn.Module] = []
        cin = 3
        for c in chans:
            layers += [nn.Conv2d(cin, c, 3, stride=2, padding=1), nn.GroupNorm(_groups(c), c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(_groups(c), c), nn.SiLU()]
            cin = c
        self.body = nn.Sequential(*layers)
        self.embed = nn.Linear(cin, dim)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, proj_dim))
        self.input_px = input_px

    def resize(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.input_px or x.shape[-2] != self.input_px:
            x = F.interpolate(x, size=(self.input_px, self.input_px), mode="bilinear", align_corners=False,
                              antialias=True)
        return x

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(self.resize(x)).mean(dim=(2, 3))
        return self.embed(h)

    def project(self, x: Tensor) -> Tensor:
        return self.head(self.forward(x))


# --------------------------------------------------------------------------- augmentations
def augment(x: Tensor, generator: torch.Generator, *, max_shift: float = 0.08, min_scale: float = 0.7) -> Tensor:
    """Random copy-like alterations of a batch in [-1,1] (batched, per-sample parameters).

    Crop-and-resize (scale ``min_scale``..1, shift up to ``max_shift`` of the side), flips,
    90° rotations, brightness/contrast/saturation jitter and a light blur half the time.
    """
    n, _, h, w = x.shape
    dev = x.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator).to(dev)

    scale = min_scale + (1 - min_scale) * rand(n)
    room = (1 - scale).clamp_min(0) + max_shift
    tx = (rand(n) * 2 - 1) * room
    ty = (rand(n) * 2 - 1) * room
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0)
    k = torch.floor(rand(n) * 4)
    ang = k * (math.pi / 2)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = scale * cos * flip
    theta[:, 0, 1] = -scale * sin
    theta[:, 1, 0] = scale * sin * flip
    theta[:, 1, 1] = scale * cos
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # colour jitter in [0,1]
    y = (y + 1) / 2
    b = (rand(n, 1, 1, 1) * 2 - 1) * 0.15
    c = 1 + (rand(n, 1, 1, 1) * 2 - 1) * 0.2
    s = 1 + (rand(n, 1, 1, 1) * 2 - 1) * 0.25
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * c + mean + b
    gray = y.mean(dim=1, keepdim=True)
    y = (y - gray) * s + gray
    blur = rand(n) < 0.5
    if bool(blur.any()):
        yb = F.avg_pool2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        y = torch.where(blur.view(n, 1, 1, 1), yb, y)
    return (y.clamp(0, 1) * 2 - 1).contiguous()


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> Tensor:
    """SimCLR's normalised-temperature cross entropy over the 2N views of a batch."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


# --------------------------------------------------------------------------- training
def one_cycle(steps: int, warmup_share: float = 0.1, start: float = 1 / 25, end: float = 1 / 25e4,
              beta1: tuple[float, float] = (0.95, 0.85)) -> Callable[[int], tuple[float, float]]:
    """(learning-rate factor, Adam beta1) per step: the one-cycle schedule (cosine warm-up
    from ``start`` to 1 over ``warmup_share`` of the steps while beta1 falls from 0.95 to
    0.85, then cosine decay to ``end`` while beta1 climbs back), defined for every
    ``steps >= 1``: torch's OneCycleLR divides by zero when its warm-up phase is shorter
    than one step (``audit.encoder_steps: 10``)."""
    warm = max(1.0, warmup_share * steps - 1)
    decay = max(1.0, steps - 1 - warm)

    def cos(a: float, b: float, frac: float) -> float:
        return b + (a - b) / 2 * (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))

    def at(step: int) -> tuple[float, float]:
        if step <= warm:
            f = step / warm
            return cos(start, 1.0, f), cos(beta1[0], beta1[1], f)
        f = (step - warm) / decay
        return cos(1.0, end, f), cos(beta1[1], beta1[0], f)

    return at


def train_encoder(images: Tensor | np.ndarray, steps: int, *, seed: int = 0, batch_size: int = 64,
                  lr: float = 2e-3, device=None, width: int = 16, dim: int = 128,
                  log: Callable[[int, float], None] | None = None) -> tuple[AuditEncoder, list[float]]:
    """Train an :class:`AuditEncoder` with NT-Xent on ``images`` (uint8 [N,H,W,3] or [-1,1]
    [N,3,H,W]); returns the encoder (eval mode, on ``device``) and the loss per step."""
    from synthpath.features import resolve_device

    device = resolve_device(device)
    # keep a uint8 pool as it is (4x smaller); batches are converted one at a time
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.dim() != 4:
        raise FeatureSpaceError(f"audit encoder training images must be 4-D, got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise FeatureSpaceError(f"the audit encoder needs at least 2 training tiles, got {x.shape[0]}")
    side = x.shape[1] if x.dtype == torch.uint8 else x.shape[-1]
    torch.manual_seed(seed)
    enc = AuditEncoder(width=width, dim=dim, input_px=min(64, side)).to(device)
    opt = torch.optim.AdamW(enc.parameters(), lr=lr, weight_decay=1e-4)
    schedule = one_cycle(steps)
    gen = torch.Generator().manual_seed(seed)
    bs = min(batch_size, x.shape[0])
    losses: list[float] = []
    enc.train()
    for step in range(steps):
        factor, beta1 = schedule(step)
        for group in opt.param_groups:
            group["lr"] = lr * factor
            group["betas"] = (beta1, group["betas"][1])
        idx = torch.randperm(x.shape[0], generator=gen)[:bs]
        xb = as_model_images(x[idx], device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            z1 = enc.project(augment(xb, gen))
            z2 = enc.project(augment(xb, gen))
            loss = nt_xent(z1.float(), z2.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(enc.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(step, losses[-1])
    return enc.eval(), losses


def save_encoder(enc: AuditEncoder, folder: Path | str, extra: dict | None = None) -> None:
    """Write ``encoder.safetensors`` and ``encoder.json`` atomically into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (ENCODER_WEIGHTS + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in enc.state_dict().items()}, str(tmp))
    os.replace(tmp, folder / ENCODER_WEIGHTS)
    cfg = {"config": enc.config, **(extra or {})}
    write_json(folder / ENCODER_CONFIG, cfg)


def load_encoder(folder: Path | str, device=None) -> AuditEncoder:
    folder = Path(folder)
    w, c = folder / ENCODER_WEIGHTS, folder / ENCODER_CONFIG
    for p in (w, c):
        if not p.is_file():
            raise FeatureSpaceError(f"audit encoder file missing: {p} (re-run `synthpath audit`)")
    cfg = json.loads(c.read_text())["config"]
    enc = AuditEncoder(**cfg)
    enc.load_state_dict(load_file(str(w)), strict=True)
    from synthpath.features import resolve_device

    return enc.eval().to(resolve_device(device))


class LearnedSpace(FeatureSpace):
    """The trained :class:`AuditEncoder` as a feature space (L2-normalised 128-d)."""

    name = "learned"
    label = "learned (self-supervised audit encoder)"

    def __init__(self, encoder: AuditEncoder, device=None, batch_size: int = 256, info: dict | None = None):
        super().__init__(device, batch_size)
        self.encoder = encoder.eval().to(self.device)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.info = dict(info or {})

    @classmethod
    def load(cls, folder: Path | str, device=None) -> "LearnedSpace":
        folder = Path(folder)
        info = json.loads((folder / ENCODER_CONFIG).read_text()) if (folder / ENCODER_CONFIG).is_file() else {}
        return cls(load_encoder(folder, device), device=device, info=info)

    @property
    def dim(self) -> int:
        return int(self.encoder.config["dim"])

    def _embed(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def describe(self) -> dict:
        d = super().describe()
        d.update(objective="SimCLR NT-Xent (crops, shifts, flips, 90° rotations, colour jitter, blur)",
                 trained_on="training tiles only; never released", **{k: v for k, v in self.info.items()
                                                                       if k != "config"})
        return d


# --------------------------------------------------------------------------- is it any good?
def retrieval_check(space: FeatureSpace, images: np.ndarray, *, seed: int = 0, alpha: float = 0.05) -> dict:
    """Can the space tell held-out tiles apart? Each tile (uint8 [N,H,W,3], tiles the encoder
    never saw) is altered as a copy would be (:func:`augment`: crop/shift, flip, rotation,
    colour jitter, blur) and looked up among the N originals; ``accuracy`` is the share whose
    nearest original is its own source. The space is ``usable`` when the accuracy is
    significantly above chance (1/N, one-sided exact binomial test at ``alpha``). An
    undertrained encoder maps every tile to nearly the same point: its nearest neighbours
    are noise, so it would call unrelated tiles copies. (The audit also probes each learned
    space with pure-noise tiles: :func:`synthpath.audit.calibration.noise_probe`.)"""
    from .stats import binomial_excess

    n = int(images.shape[0])
    if n < 2:
        return {"usable": False, "n": n, "accuracy": None, "reason": f"only {n} held-out tile(s) to test the encoder on"}
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    alt = augment(x, gen, max_shift=0.05, min_scale=0.85)
    alt_u8 = ((alt + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    ref = space.embed(images).float()
    q = space.embed(alt_u8).float()
    nn_idx = torch.cdist(q, ref).argmin(dim=1)
    hits = int((nn_idx == torch.arange(n)).sum())
    test = binomial_excess(hits, n, 1.0 / n, alpha)
    acc = hits / n
    usable = test["reject"]
    out = {"usable": bool(usable), "n": n, "hits": hits, "accuracy": acc, "chance": 1.0 / n,
           "p_value": test["p_value"], "interval": test["interval"],
           "test": "altered held-out tiles retrieved among the originals (top-1)"}
    if not usable:
        out["reason"] = (f"retrieves {hits} of {n} altered held-out tiles ({acc:.0%}; chance {1 / n:.1%}), not "
                         f"significantly better than chance (p = {test['p_value']:.2g})")
    return out
