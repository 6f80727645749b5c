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
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

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


def gradient_step(grads, units: Sequence, make_rows: Callable[[list], Rows],
                  loss_fn: Callable[[nn.Module, Rows], torch.Tensor]) -> dict:
    """One optimiser step over the logical batch ``units`` (the single code path).

    Returns ``{"loss": mean unit loss, "units": number of units, "stepped": bool}``.
    """
    units = [int(u) for u in units]
    chunks = grads.chunks(units)
    total, count, stepped = 0.0, 0, False
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        if chunk:
            rows = make_rows(chunk)
            row_loss = loss_fn(grads.module, rows)
            grads.accumulate(row_loss, rows, len(chunk), len(units))
            total += float((row_loss.detach() * rows.weight).sum())
            count += len(chunk)
        else:
            grads.empty()
        stepped = grads.apply(last) or stepped
    return {"loss": total / count if count else float("nan"), "units": count, "stepped": stepped}
