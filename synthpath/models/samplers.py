"""Samplers: pure functions sharing one k-diffusion-style signature.

``sampler(model, x, cond, *, steps, guidance=1.0, t_start=1.0) -> x0``: ``x`` is the state at
time ``t_start`` (pure noise at 1.0, or a noised upsampled parent for ZoomLDM's zoom-in).

Time grid (:func:`time_grid`). ``steps`` model evaluations at times uniform in log-SNR from
``t_start`` down to sigma/alpha = :data:`SIGMA_OVER_ALPHA_MIN` (0.002, or the schedule's end
if it stops earlier), and the last evaluation's x0 prediction is returned (the "final x0
step"). Stopping far from zero noise (the old grid was uniform in t and stopped at
t = 1/steps, sigma/alpha ~ 0.25 with the 256 px shift) returns the posterior *mean* there,
which is blurred: on a Gaussian oracle it gave half the true standard deviation.

Both solvers are deterministic, so a sample is fixed by its starting noise, and
:func:`initial_noise` draws each sample's noise from its own seed, independent of which
other samples share the batch. The step loop has no host synchronisation (nothing reads a
device tensor back), so it can run ahead of a GPU and be captured by CUDA graphs.

Known pixels (``cond.mask`` = 1): at every step the model's data prediction is replaced by
the known pixels there (weighted by ``replace_mask`` when given) before the update (RePaint's replacement, done in the data-prediction
form so it needs no extra noise draws). The final step returns that prediction, so known
pixels come out exactly and the region around them was denoised in agreement with them.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from .conditioning import Cond
from .diffusion import LOGSNR_MAX, alpha_sigma, denoise, logsnr, schedule_shift, time_at_logsnr

#: where the time grid ends: sigma/alpha = 0.002, i.e. log-SNR = 2 ln 500 ~ 12.4
SIGMA_OVER_ALPHA_MIN = 0.002


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (e.g. slide seed, level, tile, attempt), stable across runs."""
    h = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def initial_noise(shape: Sequence[int], seeds: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """Standard normal noise [B,...] where row i depends only on ``seeds[i]`` (drawn on the CPU,
    so it is also the same on every device)."""
    shape = tuple(int(s) for s in shape)
    seeds = [int(s) for s in seeds]
    if len(seeds) != shape[0]:
        raise ValueError(f"need one seed per sample: shape {shape} has {shape[0]} samples, got {len(seeds)} seeds")
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(s & ((1 << 63) - 1))
        rows.append(torch.randn(shape[1:], generator=g))
    out = torch.stack(rows) if rows else torch.zeros(shape)
    return out.to(device) if device is not None else out


def zoom_start(
    parent_up: Tensor,
    t_start: float,
    seeds: Sequence[int],
    *,
    model: torch.nn.Module | None = None,
    known: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """ZoomLDM's zoom-in start: the upsampled parent noised to ``t_start`` with per-sample
    seeded noise. Pass ``model`` so its schedule shift (it depends on tile_px) is used. Where a
    ``mask`` is given, the known pixels are noised instead of the parent."""
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    shift = schedule_shift(model) if model is not None else 0.0
    eps = initial_noise(parent_up.shape, seeds, parent_up.device)
    base = parent_up
    if mask is not None and known is not None:
        base = mask * known + (1 - mask) * parent_up
    a, s = alpha_sigma(torch.tensor(float(t_start)), shift)
    return a.to(base.device) * base + s.to(base.device) * eps


def time_grid(steps: int, t_start: float = 1.0, shift: float = 0.0,
              sigma_over_alpha_min: float = SIGMA_OVER_ALPHA_MIN) -> list[float]:
    """``steps`` evaluation times, uniform in log-SNR from ``t_start`` down to
    ``sigma / alpha = sigma_over_alpha_min`` (clamped to the schedule's end at t = 0).
    One step evaluates only at ``t_start`` (its x0 prediction is the sample)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    if not 0.0 < sigma_over_alpha_min < 1.0:
        raise ValueError(f"sigma_over_alpha_min must be in (0, 1), got {sigma_over_alpha_min}")
    lam0 = float(logsnr(torch.tensor(t_start), shift))
    lam1 = min(-2.0 * math.log(sigma_over_alpha_min), LOGSNR_MAX + shift)
    if steps == 1 or lam1 <= lam0:  # one step, or t_start already below the grid's end
        return [float(t_start)]
    lams = [lam0 + (lam1 - lam0) * i / (steps - 1) for i in range(steps)]
    ts = [float(t_start)] + [float(time_at_logsnr(l, shift)) for l in lams[1:]]
    return ts


def _grid(steps: int, t_start: float) -> list[float]:
    """The old grid, uniform in t and stopping at t_start/steps (kept for comparison in tests
    and benchmarks; it returns blurred samples)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    return [t_start * (1 - i / steps) for i in range(steps)]


def _with_known(d: Tensor, cond: Cond, replace_mask: Tensor | None = None) -> Tensor:
    """The data prediction with the known pixels put in, weighted by ``replace_mask`` (default
    ``cond.mask``; a soft mask that falls to 0 at the known region's inner edge feathers the
    seam). A no-op where the weight is 0; no host sync (no ``mask.any()`` test)."""
    m = (cond.mask if replace_mask is None else replace_mask).to(d.dtype)
    return torch.lerp(d, cond.known.to(d.dtype), m)


def _is_guided(cond: Cond, guidance: float) -> bool:
    """Whether classifier-free guidance needs the null-label pass: decided once per sampling
    call (one host read before the loop, none inside it)."""
    return guidance != 1.0 and bool((cond.label != cond.num_classes).any())


def _setup(model: torch.nn.Module, x: Tensor, cond: Cond, steps: int, guidance: float, t_start: float,
           grid: Sequence[float] | None) -> tuple[Tensor, Tensor, Tensor, Tensor, bool, float]:
    """What every sampler starts from: x as float32, the evaluation times (``grid`` or
    :func:`time_grid`) as a tensor on x's device, their alpha and sigma, whether guidance
    needs the null-label pass, and the model's schedule shift."""
    shift = schedule_shift(model)
    ts = list(grid) if grid is not None else time_grid(steps, t_start, shift)
    x = x.float()
    tt = torch.tensor(ts, device=x.device)
    alphas, sigmas = alpha_sigma(tt, shift)
    return x, tt, alphas, sigmas, _is_guided(cond, guidance), shift


@torch.no_grad()
def sample_ddim(
    model: torch.nn.Module, x: Tensor, cond: Cond, *, steps: int, guidance: float = 1.0, t_start: float = 1.0,
    grid: Sequence[float] | None = None, replace_mask: Tensor | None = None,
) -> Tensor:
    """Deterministic DDIM (eta = 0) from ``t_start`` on :func:`time_grid` (or an explicit
    ``grid`` of evaluation times); returns the final x0 prediction in [-1, 1]."""
    x, tt, alphas, sigmas, guided, _ = _setup(model, x, cond, steps, guidance, t_start, grid)
    b = x.shape[0]
    for i in range(len(tt)):
        t_cur = tt[i].expand(b)
        d_raw = denoise(model, x, t_cur, cond, guidance, guided=guided)
        d = _with_known(d_raw, cond, replace_mask)
        if i == len(tt) - 1:
            return d
        eps = (x - alphas[i] * d_raw) / sigmas[i]
        x = alphas[i + 1] * d + sigmas[i + 1] * eps
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: torch.nn.Module, x: Tensor, cond: Cond, *, steps: int, guidance: float = 1.0, t_start: float = 1.0,
    grid: Sequence[float] | None = None, replace_mask: Tensor | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in the data-prediction form on the schedule's
    half-log-SNR ``lambda = log(alpha / sigma)``, on :func:`time_grid` (or an explicit
    ``grid``); first-order on the first step, returns the data prediction at the last
    evaluation. Returns x0 in [-1, 1]."""
    x, tt, alphas, sigmas, guided, shift = _setup(model, x, cond, steps, guidance, t_start, grid)
    b = x.shape[0]
    lams = 0.5 * logsnr(tt, shift)
    hs = lams[1:] - lams[:-1]
    d_prev = None
    for i in range(len(tt)):
        d = _with_known(denoise(model, x, tt[i].expand(b), cond, guidance, guided=guided), cond, replace_mask)
        if i == len(tt) - 1:
            return d
        h = hs[i]
        if d_prev is None:
            d_hat = d
        else:
            r = hs[i - 1] / h
            d_hat = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
        x = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * torch.expm1(-h) * d_hat
        d_prev = d
    return x


Sampler = Callable[..., Tensor]
SAMPLERS: dict[str, Sampler] = {"ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; samplers are {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample(
    model: torch.nn.Module,
    cond: Cond,
    seeds: Sequence[int],
    *,
    name: str = "dpmpp_2m",
    steps: int = 25,
    guidance: float = 1.0,
) -> Tensor:
    """Convenience: fresh samples from pure noise, one per seed, for the conditions ``cond``."""
    px = cond.tile_px
    x = initial_noise((len(seeds), 3, px, px), seeds, cond.label.device)
    return get_sampler(name)(model, x, cond, steps=steps, guidance=guidance, t_start=1.0)


__all__ = ["SAMPLERS", "get_sampler", "sample", "sample_ddim", "sample_dpmpp_2m", "initial_noise", "zoom_start", "derive_seed",
           "time_grid", "SIGMA_OVER_ALPHA_MIN"]
