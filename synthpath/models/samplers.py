"""Samplers: pure functions sharing one k-diffusion-style signature.

``sampler(model, x, cond, *, steps, guidance=1.0, t_start=1.0) -> x0``: ``x`` is the state at
time ``t_start`` (pure noise at 1.0, or a noised upsampled parent for ZoomLDM's zoom-in),
and the time grid runs uniformly in t from ``t_start`` to 0 (the cosine schedule makes this
uniform-ish in log-SNR). Both solvers are deterministic, so a sample is fixed by its starting
noise, and :func:`initial_noise` draws each sample's noise from its own seed, independent of
which other samples share the batch.

Known pixels (``cond.mask`` = 1): at every step the model's data prediction is replaced by
the known pixels there before the update (RePaint's replacement, done in the data-prediction
form so it needs no extra noise draws). The final step returns that prediction, so known
pixels come out exactly and the region around them was denoised in agreement with them.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch
from torch import Tensor

from .conditioning import Cond
from .diffusion import alpha_sigma, denoise, logsnr, schedule_shift


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


def _grid(steps: int, t_start: float) -> list[float]:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    return [t_start * (1 - i / steps) for i in range(steps + 1)]


def _with_known(d: Tensor, cond: Cond) -> Tensor:
    m = cond.mask.to(d.dtype)
    return d if not bool(m.any()) else m * cond.known.to(d.dtype) + (1 - m) * d


@torch.no_grad()
def sample_ddim(
    model: torch.nn.Module, x: Tensor, cond: Cond, *, steps: int, guidance: float = 1.0, t_start: float = 1.0
) -> Tensor:
    """Deterministic DDIM (eta = 0) from ``t_start`` to 0; returns x0 in [-1, 1]."""
    shift = schedule_shift(model)
    ts = _grid(steps, t_start)
    b = x.shape[0]
    x = x.float()
    for i in range(steps):
        t_cur = torch.full((b,), ts[i], device=x.device)
        d_raw = denoise(model, x, t_cur, cond, guidance)
        d = _with_known(d_raw, cond)
        if i == steps - 1:
            return d
        a, s = alpha_sigma(t_cur[:1], shift)
        eps = (x - a * d_raw) / s
        a_n, s_n = alpha_sigma(torch.tensor([ts[i + 1]], device=x.device), shift)
        x = a_n * d + s_n * eps
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: torch.nn.Module, x: Tensor, cond: Cond, *, steps: int, guidance: float = 1.0, t_start: float = 1.0
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in the data-prediction form on the schedule's
    half-log-SNR ``lambda = log(alpha / sigma)``; first-order on the first step, returns the
    data prediction on the last. Returns x0 in [-1, 1]."""
    shift = schedule_shift(model)
    ts = _grid(steps, t_start)
    b = x.shape[0]
    x = x.float()
    tt = torch.tensor(ts, device=x.device)
    alphas, sigmas = alpha_sigma(tt, shift)
    lams = 0.5 * logsnr(tt, shift)
    d_prev, h_prev = None, None
    for i in range(steps):
        d = _with_known(denoise(model, x, torch.full((b,), ts[i], device=x.device), cond, guidance), cond)
        if i == steps - 1:
            return d
        h = lams[i + 1] - lams[i]
        if d_prev is None:
            d_hat = d
        else:
            r = h_prev / h
            d_hat = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
        x = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * torch.expm1(-h) * d_hat
        d_prev, h_prev = d, h
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


__all__ = ["SAMPLERS", "get_sampler", "sample", "sample_ddim", "sample_dpmpp_2m", "initial_noise", "zoom_start", "derive_seed"]
