"""The samplers on a Gaussian oracle: data N(0, 0.15^2) per pixel and, as the "model", the
exact v-prediction of that data. A sampler that integrates the probability-flow ODE to
(nearly) zero noise reproduces the data's standard deviation; one that stops early and
returns the x0 prediction there returns the posterior mean, which is blurred (too small)."""

from __future__ import annotations

import math

import pytest
import torch

from synthpath.models import Cond
from synthpath.models.diffusion import alpha_sigma, logsnr
from synthpath.models.samplers import (SIGMA_OVER_ALPHA_MIN, _grid, initial_noise, sample_ddim, sample_dpmpp_2m,
                                       time_grid, zoom_start)

STD = 0.15


class GaussianOracle(torch.nn.Module):
    """Exact v-prediction for x0 ~ N(0, STD^2): E[x0 | x_t] = a STD^2 x_t / (a^2 STD^2 + s^2)."""

    def __init__(self, tile_px: int):
        super().__init__()
        self.config = {"tile_px": tile_px, "num_classes": 2, "logsnr_shift": 2.0 * math.log(64 / tile_px)}
        self.calls = 0
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, cond):
        self.calls += 1
        a, s = alpha_sigma(t, self.config["logsnr_shift"])
        a, s = a[:, None, None, None], s[:, None, None, None]
        x0 = a * STD**2 * x / (a * a * STD**2 + s * s)
        return (a * x - x0) / s  # x0 = a x_t - s v


def _run(sampler, steps, px=256, n=8, grid=None, t_start=1.0):
    model = GaussianOracle(px)
    cond = Cond.unconditional(n, 16, 2, 0.0, label=0)
    if t_start == 1.0:
        x = initial_noise((n, 3, 16, 16), list(range(n)))
    else:  # zoom-in: a "parent" that is itself a draw of the data, noised to t_start
        parent = STD * initial_noise((n, 3, 16, 16), [10_000 + i for i in range(n)])
        x = zoom_start(parent, t_start, list(range(n)), model=model)
    out = sampler(model, x, cond, steps=steps, guidance=1.0, t_start=t_start, grid=grid)
    return float(out.std()), model.calls


@pytest.mark.parametrize("px", [64, 256])
def test_dpmpp_2m_25_steps_matches_data_std(px):
    std, calls = _run(sample_dpmpp_2m, 25, px=px)
    assert calls == 25  # 25 model evaluations, the last one's x0 is the sample
    assert abs(std - STD) / STD < 0.05, std


def test_ddim_100_steps_within_5_percent_and_25_steps_within_20():
    std100, _ = _run(sample_ddim, 100)
    std25, _ = _run(sample_ddim, 25)
    assert abs(std100 - STD) / STD < 0.05, std100
    assert abs(std25 - STD) / STD < 0.20, std25


def test_zoom_from_half_keeps_data_std():
    std, calls = _run(sample_dpmpp_2m, 13, t_start=0.5)
    assert calls == 13
    assert abs(std - STD) / STD < 0.05, std


def test_old_uniform_t_grid_was_blurred():
    """The grid this replaces (uniform in t, stopping at t = 1/steps) shrinks the std: the
    oracle test above is able to fail."""
    std, _ = _run(sample_dpmpp_2m, 25, grid=_grid(25, 1.0))
    assert std < 0.8 * STD, std


def test_time_grid_reaches_sigma_over_alpha_002():
    shift = 0.0
    ts = time_grid(25, 1.0, shift)
    assert len(ts) == 25 and ts[0] == 1.0 and all(a > b for a, b in zip(ts, ts[1:]))
    lam = logsnr(torch.tensor(ts), shift)
    assert math.isclose(float(torch.exp(-lam[-1] / 2)), SIGMA_OVER_ALPHA_MIN, rel_tol=1e-3)
    steps = (lam[2:] - lam[1:-1]).tolist()  # uniform in log-SNR after the first point
    assert max(steps) - min(steps) < 1e-3
    assert time_grid(1, 0.5) == [0.5]
    with pytest.raises(ValueError):
        time_grid(0, 1.0)
