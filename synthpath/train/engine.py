"""The one training step, private or not.

:func:`gradient_step` is the only place where a logical batch of *units* (tiles, or
patients) becomes an optimiser update. It splits the batch into physical chunks, turns each
chunk into rows (tiles x noise draws, :mod:`synthpath.train.batches`), computes the per-row
loss with the shared ``loss_fn``, and hands the rows to a gradient *wrapper*:

- :class:`PlainGradients`: no privacy. ``sum_rows(w * loss) / B`` is backpropagated and
  accumulated over chunks; the update is clipped by global norm and applied.
- :class:`PrivateGradients`: the Opacus wrapper. The same weighted row losses are
  backpropagated through a ``GradSampleModule``; per-row gradients are folded into one per
  unit; Opacus' ``DPOptimizer`` clips each unit, accumulates across chunks (the chunking is
  Opacus' ``BatchSplittingSampler``, the core of ``BatchMemoryManager``), and on the last
  chunk adds noise, divides by the expected batch and steps its accountant.

With ``sigma = 0`` and a clip norm no unit reaches, both wrappers give the same update for
the same units (tests check this), so the privacy wrapper is the only difference.

- :class:`GhostGradients` (``privacy.clipping: ghost``): the same mechanism as
  :class:`PrivateGradients` -- per-unit clip, sum, Gaussian noise once per logical step
  drawn from the same generator in the same parameter order, division by ``q*n``, the
  accountant's step -- with the per-unit norms and clipped sums from
  :mod:`synthpath.train.ghost` (no per-sample gradients, no Opacus hooks), so a DP step costs
  about one extra activation backward and a weight-gradient pass over a non-DP one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from . import privacy as P
from .ghost import GhostClipper
from .privacy import empty_grad_samples, fold_grad_samples


@dataclass
class Rows:
    """One physical chunk ready for the model: ``x0`` [R,3,H,W], conditions for R rows, the
    chunk-local unit of each row and its weight (1 / rows of that unit)."""

    x0: torch.Tensor
    cond: object
    unit: torch.Tensor
    weight: torch.Tensor


class PlainGradients:
    """Non-private gradients: mean over the batch's units, global-norm clip, optimiser step."""

    private = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, max_units: int,
                 grad_clip: float | None, module: nn.Module | None = None):
        self.model = model
        self.module = module if module is not None else model  # what the loss calls (maybe compiled)
        self.optimizer = optimizer
        self.max_units = max(1, int(max_units))
        self.grad_clip = grad_clip
        self.last_grad_norm = float("nan")
        self.reduce = None  # set by the data-parallel trainer: sums gradients over ranks

    def chunks(self, units: list) -> list[list]:
        m = self.max_units
        return [units[i:i + m] for i in range(0, len(units), m)] or [[]]

    def accumulate(self, row_loss: torch.Tensor, rows: Rows, n_units: int, batch_units: int) -> None:
        ((row_loss * rows.weight).sum() / max(batch_units, 1)).backward()

    def empty(self) -> None:
        """A batch with no units: nothing to add."""

    def apply(self, last: bool) -> bool:
        if not last:
            return False
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.reduce is not None:  # data-parallel: every rank's share of the batch mean, summed
            summed = self.reduce([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
            for p, g in zip(params, summed):
                p.grad = g
        if self.grad_clip is not None:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True


class PrivateGradients:
    """DP-SGD through Opacus: per-unit clipping of folded per-row gradients, then noise."""

    private = True

    def __init__(self, gsm: nn.Module, dp_optimizer, accountant, *, max_units: int):
        self.module = gsm
        self.model = gsm._module
        self.optimizer = dp_optimizer
        self.accountant = accountant
        self.max_units = max(1, int(max_units))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.last_grad_norm = float("nan")

    def chunks(self, units: list) -> list[list]:
        from opacus.utils.batch_memory_manager import BatchSplittingSampler

        splitter = BatchSplittingSampler(sampler=[list(units)], max_batch_size=self.max_units, optimizer=self.optimizer)
        return [list(c) for c in splitter]  # signals DPOptimizer which chunks end the logical batch

    def accumulate(self, row_loss: torch.Tensor, rows: Rows, n_units: int, batch_units: int) -> None:
        with warnings.catch_warnings():
            # the model's inputs need no gradient; Opacus' full backward hooks still fire correctly
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            (row_loss * rows.weight).sum().backward()
        fold_grad_samples(self.params, rows.unit, n_units)

    def empty(self) -> None:
        empty_grad_samples(self.params)

    def apply(self, last: bool) -> bool:
        self.optimizer.step()  # clip+accumulate; on the batch's last chunk also noise, scale, account, step
        stepped = not self.optimizer._is_last_step_skipped
        self.optimizer.zero_grad(set_to_none=True)
        return stepped


class _Capturing(nn.Module):
    """What the loss calls under ghost clipping: the model, with layer inputs recorded."""

    def __init__(self, model: nn.Module, clipper: GhostClipper):
        super().__init__()
        self._module = model
        self._clipper = [clipper]  # a list: not a submodule

    def forward(self, *args, **kwargs):
        with self._clipper[0].capture():
            return self._module(*args, **kwargs)


class GhostGradients:
    """DP-SGD with ghost clipping: per-unit norms by :class:`~synthpath.train.ghost.GhostClipper`,
    clipped sums accumulated over chunks, noise ``N(0, (sigma C)^2)`` added once per logical
    step, the sum divided by the expected units ``q*n``, then the plain optimiser steps and
    the accountant records ``(sigma, q, 1)``.

    ``reduce``, when given, is called with the list of summed gradients before noise (the
    data-parallel all-reduce, :mod:`synthpath.train.distributed`); ``add_noise`` says whether
    this process draws the noise (exactly one process does)."""

    private = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, accountant, *, sigma: float,
                 max_grad_norm: float, expected_units: float, sample_rate: float,
                 noise_generator: torch.Generator | None, max_units: int, reduce=None, add_noise: bool = True):
        self.model = model
        self.clipper = GhostClipper(model, max_grad_norm)
        self.module = _Capturing(model, self.clipper)
        self.optimizer = optimizer
        self.accountant = accountant
        self.sigma, self.max_grad_norm = float(sigma), float(max_grad_norm)
        self.expected_units, self.sample_rate = float(expected_units), float(sample_rate)
        self.generator = noise_generator
        self.max_units = max(1, int(max_units))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.reduce = reduce
        self.add_noise = add_noise
        self.last_grad_norm = float("nan")

    def chunks(self, units: list) -> list[list]:
        m = self.max_units
        return [units[i:i + m] for i in range(0, len(units), m)] or [[]]

    def accumulate(self, row_loss: torch.Tensor, rows: Rows, n_units: int, batch_units: int) -> None:
        self.clipper.clip_and_accumulate(row_loss * rows.weight, rows.unit, n_units)

    def empty(self) -> None:
        """A Poisson draw with no units still steps: noise only."""

    def apply(self, last: bool) -> bool:
        if not last:
            return False
        summed = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        std = self.sigma * self.max_grad_norm
        if self.add_noise and std > 0:  # one process only: the noise enters the all-reduce once
            summed = [s + torch.normal(mean=0.0, std=std, size=s.shape, device=s.device, generator=self.generator)
                      for s in summed]
        if self.reduce is not None:
            summed = self.reduce(summed)
        for p, s in zip(self.params, summed):
            p.grad = s / self.expected_units
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.accountant is not None:
            self.accountant.step(noise_multiplier=self.sigma, sample_rate=self.sample_rate)
        return True


def plan_tile_privacy(pcfg, *, n_tiles: int, batch_size: int, steps: int, prior=()) -> P.PrivacyPlan:
    """Tile-level plan as Opacus' ``make_private_with_epsilon`` computes it: Poisson rate
    ``q = 1 / ceil(n / batch_size)``, sigma for the target epsilon over ``steps`` steps."""
    import math

    from ..pipeline import StageError

    delta = P.resolve_delta(pcfg.delta, n_tiles)
    n_batches = math.ceil(n_tiles / batch_size)
    if n_batches <= 1:
        raise StageError(f"privacy: train.batch_size={batch_size} covers all {n_tiles} training tiles, so the "
                         f"sampling rate would be 1; lower train.batch_size")
    q = 1.0 / n_batches
    sigma = P.calibrate_sigma(target_epsilon=pcfg.target_epsilon, delta=delta, sample_rate=q, steps=steps,
                              accountant=pcfg.accountant, n_units=n_tiles, unit="tile",
                              prior=tuple(tuple(p) for p in prior))
    return P.PrivacyPlan(
        unit="tile", n_units=n_tiles, sample_rate=q, expected_units=q * n_tiles, sigma=sigma, delta=delta,
        target_epsilon=pcfg.target_epsilon, steps=steps, max_grad_norm=pcfg.max_grad_norm,
        noise_multiplicity=pcfg.noise_multiplicity, tiles_per_patient=None, accountant=pcfg.accountant,
        secure_mode=pcfg.secure_mode, delta_rule=P.delta_rule(pcfg.delta, "tile"),
        warnings=P.unit_warnings("tile", n_tiles), prior=[list(p) for p in prior])


def ghost_privacy(recipe, model: nn.Module, optimizer, dataset, noise_gen, prior=(), *, reduce=None,
                  add_noise=True):
    """``(plan, GhostGradients, accountant)`` for ``privacy.clipping: ghost`` at either unit."""
    from opacus.accountants import create_accountant

    tcfg, pcfg = recipe.train, recipe.privacy
    if pcfg.unit == "tile":
        plan = plan_tile_privacy(pcfg, n_tiles=len(dataset), batch_size=tcfg.batch_size, steps=tcfg.steps,
                                 prior=prior)
    else:
        plan = P.plan_patient_privacy(pcfg, n_patients=len(dataset.patients), batch_size=tcfg.batch_size,
                                      steps=tcfg.steps, prior=prior)
    accountant = create_accountant(mechanism=pcfg.accountant)
    grads = GhostGradients(model, optimizer, accountant, sigma=plan.sigma, max_grad_norm=plan.max_grad_norm,
                           expected_units=plan.expected_units, sample_rate=plan.sample_rate,
                           noise_generator=noise_gen, max_units=1, reduce=reduce, add_noise=add_noise)
    return plan, grads, accountant


def gradient_step(grads, units: Sequence, make_rows: Callable[[list], Rows],
                  loss_fn: Callable[[nn.Module, Rows], torch.Tensor], *, dist=None,
                  reseed: Callable[[int], None] | None = None) -> dict:
    """One optimiser step over the logical batch ``units`` (the single code path).

    ``dist`` (:class:`~synthpath.train.distributed.DistContext`): run only this rank's chunks
    (chunk ``j`` on rank ``j mod W``); the wrapper's ``reduce`` sums over ranks. ``reseed(j)``
    is called before chunk ``j`` is built (per-chunk public row randomness).

    Returns ``{"loss": mean unit loss, "units": number of units, "stepped": bool}`` (over all ranks).
    """
    units = [int(u) for u in units]
    chunks = grads.chunks(units)
    mine = dist.my_chunks(chunks) if dist is not None and dist.active else list(enumerate(chunks))
    mine = mine or [(-1, [])]  # a rank without chunks still takes part in the step's all-reduce
    total, count, stepped = 0.0, 0, False
    for i, (j, chunk) in enumerate(mine):
        last = i == len(mine) - 1
        if chunk:
            if reseed is not None:
                reseed(j)
            rows = make_rows(chunk)
            row_loss = loss_fn(grads.module, rows)
            grads.accumulate(row_loss, rows, len(chunk), len(units))
            total += float((row_loss.detach() * rows.weight).sum())
            count += len(chunk)
        else:
            grads.empty()
        stepped = grads.apply(last) or stepped
    if dist is not None and dist.active:
        total, count = (float(v) for v in dist.all_reduce_sum([torch.tensor([total, float(count)])])[0])
        count = int(round(count))
    return {"loss": total / count if count else float("nan"), "units": count, "stepped": stepped}
