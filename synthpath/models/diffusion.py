"""Noise schedule and training objective.

Choice: a continuous-time variance-preserving (VP) process with the *cosine* schedule
written in log-SNR, ``x_t = alpha_t x0 + sigma_t eps`` with ``alpha_t^2 = sigmoid(l(t))``,
``sigma_t^2 = sigmoid(-l(t))``, ``l(t) = -2 log tan(pi t / 2)`` clipped to [-15, 15] and
shifted by ``2 ln(64 / tile_px)`` (simple diffusion's resolution shift; zero at 64 px),
trained with **v-prediction** (``v = alpha eps - sigma x0``).

Why:
- Continuous t in [0, 1] lets any sampler pick any time grid (few-step DPM-Solver++,
  DDIM, and ZoomLDM's "start at t=0.5" zoom) without retraining.
- The cosine schedule spends its steps evenly in log-SNR, so it is stable at every noise
  level and gives few-step solvers well-spaced steps.
- v-prediction stays well-posed at both ends (eps-prediction blows up x0 at high noise,
  x0-prediction is ill-conditioned at low noise), and its target has unit variance at
  every t, so per-sample losses are on one scale. That matters for DP-SGD: clipping each
  sample's gradient at one norm C treats all timesteps alike, and the membership-inference
  audit can compare raw losses across t.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .conditioning import Cond
from .unet import model_config

LOGSNR_MIN = -15.0
LOGSNR_MAX = 15.0
_T_MIN = math.atan(math.exp(-0.5 * LOGSNR_MAX))
_T_MAX = math.atan(math.exp(-0.5 * LOGSNR_MIN))


def logsnr(t: Tensor, shift: float = 0.0) -> Tensor:
    """log(alpha^2 / sigma^2) at continuous time ``t`` in [0, 1] (1 = pure noise)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return -2.0 * torch.log(torch.tan(_T_MIN + t.float() * (_T_MAX - _T_MIN))) + shift


def time_at_logsnr(lam: float | Tensor, shift: float = 0.0) -> Tensor:
    """The inverse of :func:`logsnr`: the time t in [0, 1] with ``logsnr(t, shift) = lam``
    (clamped to the schedule's range)."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    t = (torch.atan(torch.exp(-0.5 * (lam - shift))) - _T_MIN) / (_T_MAX - _T_MIN)
    return t.clamp(0.0, 1.0).float()


def alpha_sigma(t: Tensor, shift: float = 0.0) -> tuple[Tensor, Tensor]:
    """Signal and noise scales at time ``t`` (same shape as ``t``)."""
    lam = logsnr(t, shift)
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def schedule_shift(model: torch.nn.Module) -> float:
    """The model's log-SNR shift (stored in its config; depends on tile_px)."""
    return float(model_config(model).get("logsnr_shift", 0.0))


def _bcast(v: Tensor) -> Tensor:
    return v[:, None, None, None]


def _time(t: Tensor | float, b: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    return t.expand(b).clone() if t.dim() == 0 else t.reshape(b)


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, shift: float = 0.0) -> Tensor:
    """Noise clean images ``x0`` to time ``t``."""
    a, s = alpha_sigma(t.to(x0.device), shift)
    return _bcast(a) * x0 + _bcast(s) * noise


def predict_v(model: torch.nn.Module, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
    """One forward pass; bf16 autocast on CUDA, fp32 elsewhere; returns fp32."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x_t.device.type == "cuda"):
        out = model(x_t, t, cond)
    return out.float()


def diffusion_loss(
    model: torch.nn.Module,
    x0: Tensor,
    cond: Cond,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample v-prediction MSE, shape [B].

    ``t`` (default: uniform in [0,1]) and ``noise`` (default: standard normal) are drawn from
    ``generator`` when not given, so a loss can be reproduced exactly (the membership
    attack evaluates the same (t, noise) for every tile).
    """
    b, device = x0.shape[0], x0.device
    gdev = generator.device if generator is not None else device
    if t is None:
        t = torch.rand(b, generator=generator, device=gdev).to(device)
    t = _time(t, b, device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=gdev).to(device)
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match x0 {tuple(x0.shape)}")
    shift = schedule_shift(model)
    a, s = alpha_sigma(t, shift)
    x_t = _bcast(a) * x0 + _bcast(s) * noise
    target = _bcast(a) * noise - _bcast(s) * x0
    pred = predict_v(model, x_t, t, cond)
    return F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)


def border_masks(
    b: int, px: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """Random known-border masks [B,1,px,px]: strips along random sides of the tile, as
    already-generated neighbours would provide. Each side is on with probability 1/2 (at
    least one side), with a width drawn from [px/8, px/2]: whole-slide synthesis overlaps
    neighbouring tiles by px/4 to px/2 depending on the slide size."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    on = torch.rand(b, 4, generator=generator, device=gdev) < 0.5
    forced = torch.randint(0, 4, (b,), generator=generator, device=gdev)
    none = ~on.any(1)
    on[none, forced[none]] = True
    lo, hi = max(1, px // 8), max(1, px // 2)
    width = torch.randint(lo, hi + 1, (b, 4), generator=generator, device=gdev) * on
    width = width.to(device)
    ys = torch.arange(px, device=device)[None, :, None]
    xs = torch.arange(px, device=device)[None, None, :]
    w = width[:, :, None, None]
    m = (xs < w[:, 0]) | (ys < w[:, 1]) | (xs >= px - w[:, 2]) | (ys >= px - w[:, 3])
    return m[:, None].float()


def drop_conditions(
    cond: Cond,
    p_label: float,
    p_parent: float,
    p_known: float,
    generator: torch.Generator | None = None,
) -> Cond:
    """Training-time condition dropout, so one network learns every task.

    - with probability ``p_label`` the label becomes the null label (classifier-free guidance);
    - with probability ``p_parent`` the parent crop is removed (zeros, ``has_parent`` False);
    - with probability ``p_known`` a random border mask reveals strips of ``cond.known``
      (which :meth:`Cond.from_batch` fills with the clean tile), else the mask is all zero.
      ``known`` is zeroed outside the mask either way.
    """
    for name, p in (("p_label", p_label), ("p_parent", p_parent), ("p_known", p_known)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    b, px, device = cond.batch_size, cond.tile_px, cond.label.device
    gdev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(b, 3, generator=generator, device=gdev).to(device)
    label = torch.where(u[:, 0] < p_label, torch.full_like(cond.label, cond.num_classes), cond.label)
    has_parent = cond.has_parent & ~(u[:, 1] < p_parent)
    parent = cond.parent * has_parent.to(cond.parent.dtype)[:, None, None, None]
    use_known = (u[:, 2] < p_known).float()[:, None, None, None]
    mask = border_masks(b, px, generator, device) * use_known
    return cond.replace(label=label, has_parent=has_parent, parent=parent, known=cond.known * mask, mask=mask)


def denoise(
    model: torch.nn.Module,
    x_t: Tensor,
    t: Tensor | float,
    cond: Cond,
    guidance: float = 1.0,
    *,
    clip: bool = True,
    guided: bool | None = None,
) -> Tensor:
    """The model's estimate of x0 at time ``t``, with classifier-free guidance on the label.

    ``guidance`` = 1 is plain conditional sampling; > 1 extrapolates away from the null-label
    prediction (conditional and null-label passes share one batched forward). Samples that
    already carry the null label are not guided (their two passes agree). ``clip`` clamps x0
    to the pixel range. ``guided`` (samplers decide it once per call) skips the host read
    that checks whether any sample carries a real label.
    """
    b, device = x_t.shape[0], x_t.device
    t = _time(t, b, device)
    shift = schedule_shift(model)
    if guided is None:
        guided = guidance != 1.0 and bool((cond.label != cond.num_classes).any())
    if guided and guidance != 1.0:
        both = Cond.cat([cond, cond.with_null_label()])
        v_c, v_u = predict_v(model, torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        v = v_u + guidance * (v_c - v_u)
    else:
        v = predict_v(model, x_t, t, cond)
    a, s = alpha_sigma(t, shift)
    x0 = _bcast(a) * x_t - _bcast(s) * v
    return x0.clamp(-1.0, 1.0) if clip else x0


__all__ = [
    "LOGSNR_MIN",
    "LOGSNR_MAX",
    "logsnr",
    "time_at_logsnr",
    "alpha_sigma",
    "schedule_shift",
    "q_sample",
    "predict_v",
    "diffusion_loss",
    "border_masks",
    "drop_conditions",
    "denoise",
]
