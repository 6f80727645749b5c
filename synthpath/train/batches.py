"""Units, unit samplers, and turning a chunk of units into model rows.

A *unit* is what privacy protects and what one clip bound covers: a tile (``unit: tile``
and non-private runs) or a patient (``unit: patient``). A unit becomes rows:

- tile: the tile itself, repeated ``K`` times (K = noise multiplicity; K = 1 without DP);
- patient: ``tiles_per_patient`` of the patient's tiles (drawn without replacement, or with
  replacement and one warning when the patient has fewer), each repeated ``K`` times.

Every row of a unit has weight ``1 / rows_per_unit``, so the weighted sum of row losses is
the unit's mean loss and its gradient is the unit's mean gradient.

All randomness comes from explicit ``torch.Generator`` objects whose states are saved in
the resumable state, so a resumed run draws exactly what the uninterrupted one would.
"""

from __future__ import annotations

import warnings

import torch

from ..models import Cond
from ..models.diffusion import diffusion_loss, drop_conditions
from .augment import Augment
from .engine import Rows


class FixedSizeSampler:
    """Non-private sampling: ``batch_size`` distinct units every step, uniformly, or (with
    ``weights``, one per unit) drawn without replacement in proportion to the weights."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, weights: torch.Tensor | None = None):
        self.n, self.batch_size, self.generator = n, min(batch_size, n), generator
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
            if weights.numel() != n or not bool((weights > 0).all()):
                raise ValueError(f"need one positive weight per unit: {n} units, {weights.numel()} weights")
        self.weights = weights

    def draw(self) -> list[int]:
        if self.weights is not None:
            return torch.multinomial(self.weights, self.batch_size, replacement=False, generator=self.generator).tolist()
        return torch.randperm(self.n, generator=self.generator)[: self.batch_size].tolist()


def level_balanced_weights(levels) -> torch.Tensor:
    """Per-tile sampling weights under which every level present is drawn equally often
    (``train.level_balance``): 1 / (number of tiles at the tile's level)."""
    lv = torch.as_tensor(levels, dtype=torch.long).reshape(-1)
    counts = torch.bincount(lv)
    return 1.0 / counts[lv].double()


class PoissonSampler:
    """Poisson sampling of units with rate ``q`` per step (each unit in independently), through
    Opacus' ``UniformWithReplacementSampler`` driven one step at a time."""

    def __init__(self, n: int, sample_rate: float, generator: torch.Generator, steps: int):
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        self.n, self.sample_rate = n, sample_rate
        self._it = iter(UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate,
                                                      generator=generator, steps=max(1, steps)))

    def draw(self) -> list[int]:
        try:
            return [int(i) for i in next(self._it)]
        except StopIteration:  # the planned steps are spent: drawing more would exceed the budget
            raise RuntimeError("the Poisson sampler has drawn every planned step; training past the privacy "
                               "budget is not allowed") from None


class RowMaker:
    """Builds :class:`Rows` for a chunk of units from a :class:`~synthpath.tiles.dataset.TileDataset`."""

    def __init__(self, dataset, *, unit: str, noise_multiplicity: int, tiles_per_patient: int,
                 num_classes: int, device: torch.device, generator: torch.Generator, augment: str = "none"):
        if unit not in ("tile", "patient"):
            raise ValueError(f"unit must be 'tile' or 'patient', got {unit!r}")
        self.dataset = dataset
        self.unit = unit
        self.k = int(noise_multiplicity)
        self.t = int(tiles_per_patient)
        self.num_classes = num_classes
        self.device = device
        self.generator = generator
        self.augment = Augment(augment, generator)  # per tile, before the rows are repeated
        self.groups = dataset.patient_groups() if unit == "patient" else None
        self.messages: list[str] = []
        if self.groups is not None:
            few = {dataset.patients[p]: len(v) for p, v in self.groups.items() if 0 < len(v) < self.t}
            if few:
                name, n = next(iter(few.items()))
                msg = (f"{len(few)} patient(s) have fewer training tiles than privacy.tiles_per_patient={self.t} "
                       f"(e.g. {name!r} has {n}); their tiles are drawn with replacement")
                self.messages.append(msg)
                warnings.warn(msg, stacklevel=2)

    @property
    def rows_per_unit(self) -> int:
        return self.k * (self.t if self.unit == "patient" else 1)

    def tiles_of(self, patient: int) -> list[int]:
        """``tiles_per_patient`` tile indices of one patient."""
        items = self.groups[patient]
        n = len(items)
        if n == 0:
            raise ValueError(f"patient {self.dataset.patients[patient]!r} has no training tiles")
        if n >= self.t:
            pick = torch.randperm(n, generator=self.generator)[: self.t]
        else:
            pick = torch.randint(0, n, (self.t,), generator=self.generator)
        return [items[int(j)] for j in pick]

    def __call__(self, units: list[int]) -> Rows:
        if self.unit == "patient":
            tiles, owner = [], []
            for u_local, p in enumerate(units):
                ts = self.tiles_of(p)
                tiles += ts
                owner += [u_local] * len(ts)
        else:
            tiles, owner = list(units), list(range(len(units)))
        items = [self.dataset[i] for i in tiles]
        batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "parent", "has_parent", "log_mpp", "label")}
        batch = {k: v.to(self.device) for k, v in batch.items()}
        cond = Cond.from_batch(batch, self.num_classes)
        x0, cond = self.augment(batch["image"], cond)  # tile, parent crop, known pixels, mask alike
        unit = torch.tensor(owner, dtype=torch.long, device=self.device)
        if self.k > 1:
            cond, x0, unit = cond.repeat(self.k), x0.repeat_interleave(self.k, dim=0), unit.repeat_interleave(self.k)
        weight = torch.full((x0.shape[0],), 1.0 / self.rows_per_unit, device=self.device)
        return Rows(x0=x0, cond=cond, unit=unit, weight=weight)


class DiffusionLoss:
    """The per-row training loss: condition dropout, then the model's diffusion objective."""

    def __init__(self, *, p_label: float, p_parent: float, p_known: float, generator: torch.Generator):
        self.p_label, self.p_parent, self.p_known = p_label, p_parent, p_known
        self.generator = generator

    def __call__(self, module, rows: Rows) -> torch.Tensor:
        cond = drop_conditions(rows.cond, self.p_label, self.p_parent, self.p_known, generator=self.generator)
        return diffusion_loss(module, rows.x0, cond, generator=self.generator)
