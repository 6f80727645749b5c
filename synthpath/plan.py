"""The compute plan of a recipe: what training and generation cost, before anything runs.

``synthpath plan recipe.yaml`` (and ``synthpath validate``) prints it:

- **training**: rows per step (non-DP: ``batch_size`` tiles; tile-level DP: the expected
  ``batch_size`` tiles x K noise draws; patient-level DP: ``batch_size`` patients x
  ``tiles_per_patient`` x K), FLOPs per row from the model registry (3x a forward), the DP
  step overhead of the chosen clipping, total FLOPs, GPU-hours at the recipe's stated
  sustained TFLOP/s, and wall-clock days on ``compute.gpus`` accelerators;
- **generation**: every tile of every synthetic slide's pyramid (the overlapping tile grid
  of :mod:`synthpath.generate.synthesis`), times solver steps (full at the coarsest level,
  ``zoom_start`` of them above it), times 2 forwards under classifier-free guidance.

Each part is checked against ``compute.train_budget_days`` / ``generate_budget_days``.
Data-parallel scaling is taken as linear (the all-reduce of one gradient per logical step
is small next to thousands of rows of compute); release-filter retries are not counted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .models.registry import DP_STEP_OVERHEAD, TRAIN_FLOPS_PER_FORWARD, model_cost


@dataclass
class ComputePlan:
    model_size: str
    tile_px: int
    gflops_forward: float
    rows_per_step: int
    rows_description: str
    steps: int
    dp_overhead: float
    train_flops_per_step: float
    train_flops: float
    train_gpu_hours: float
    train_days: float
    train_budget_days: float | None
    generate_tiles: int
    generate_forwards: int
    generate_description: str
    generate_flops: float
    generate_gpu_hours: float
    generate_days: float
    generate_budget_days: float | None
    gpu: str
    gpus: int
    sustained_tflops: float

    @property
    def fits(self) -> bool:
        ok = self.train_budget_days is None or self.train_days <= self.train_budget_days
        return ok and (self.generate_budget_days is None or self.generate_days <= self.generate_budget_days)

    def to_json(self) -> dict:
        return {**asdict(self), "fits": self.fits}


def rows_per_step(recipe) -> tuple[int, str]:
    t, p = recipe.train, recipe.privacy
    if not p.enabled:
        return t.batch_size, f"{t.batch_size} tiles (no DP)"
    k = p.noise_multiplicity
    if p.unit == "tile":
        return t.batch_size * k, f"{t.batch_size} expected tiles x K={k} noise draws"
    return (t.batch_size * p.tiles_per_patient * k,
            f"{t.batch_size} expected patients x {p.tiles_per_patient} tiles x K={k} noise draws")


def generation_forwards(recipe) -> tuple[int, int, str]:
    """(tiles, model forwards, description) for the whole generate stage: the tile windows
    synthesis actually makes, from the generation plan's geometry (``generate.mode: slides``:
    every window of every level; ``stacks``: the dependency closure of the sampled stacks,
    :func:`synthpath.generate.tiling.needed_tiles`, as the runner asks for it)."""
    from .generate.plan import make_plan
    from .generate.slidework import target_boxes
    from .generate.tiling import all_tiles, level_grids, needed_tiles, zoom_factors

    g, s = recipe.generate, recipe.sampler
    geo = recipe.model_copy(deep=True)
    if not geo.generate.label_proportions:  # the plan's geometry does not depend on the label shares
        geo.generate.label_proportions = {c: 1.0 for c in recipe.data.classes}
    plan = make_plan(geo)
    grids = level_grids(plan.layout_tiles, plan.levels, plan.tile_px, plan.window_overlap)
    factors = zoom_factors(plan.levels)
    made = [0] * len(plan.levels)
    whole = [len(t) for t in all_tiles(grids)]
    for i in range(len(plan.slides)):
        need = whole if g.mode == "slides" else [len(t) for t in needed_tiles(target_boxes(plan, i), grids,
                                                                             factors, plan.tile_px)]
        made = [a + n for a, n in zip(made, need)]
    cfg = 2 if s.guidance_scale != 1.0 else 1
    forwards, parts = 0, []
    for k, n in enumerate(made):
        steps = s.steps if k == 0 else max(1, math.ceil(s.steps * s.zoom_start))
        forwards += n * steps * cfg
        parts.append(f"{n:,} tiles x {steps} steps")
    desc = f"{g.n_slides} slides, mode {g.mode}: ({' + '.join(parts)}) x CFG {cfg}"
    return sum(made), forwards, desc


def compute_plan(recipe, num_classes: int | None = None) -> ComputePlan:
    c, t, p, m = recipe.compute, recipe.train, recipe.privacy, recipe.model
    ncls = num_classes or max(1, len(recipe.data.classes or []) or 2)
    gf = model_cost(m.size, recipe.tile_px, ncls)["gflops"] * 1e9
    rows, rdesc = rows_per_step(recipe)
    over = DP_STEP_OVERHEAD[p.clipping] if p.enabled else 1.0
    per_step = rows * TRAIN_FLOPS_PER_FORWARD * gf * over
    total = per_step * t.steps
    rate = c.sustained_tflops * 1e12
    hours = total / rate / 3600
    gtiles, gfw, gdesc = generation_forwards(recipe)
    gflops = gfw * gf
    ghours = gflops / rate / 3600
    return ComputePlan(
        model_size=m.size, tile_px=recipe.tile_px, gflops_forward=gf / 1e9, rows_per_step=rows,
        rows_description=rdesc, steps=t.steps, dp_overhead=over, train_flops_per_step=per_step, train_flops=total,
        train_gpu_hours=hours, train_days=hours / c.gpus / 24, train_budget_days=c.train_budget_days,
        generate_tiles=gtiles, generate_forwards=gfw, generate_description=gdesc, generate_flops=gflops,
        generate_gpu_hours=ghours, generate_days=ghours / c.gpus / 24, generate_budget_days=c.generate_budget_days,
        gpu=c.gpu, gpus=c.gpus, sustained_tflops=c.sustained_tflops)


def format_plan(plan: ComputePlan) -> str:
    def budget(days, limit):
        if limit is None:
            return "no budget stated (compute.*_budget_days)"
        return f"budget {limit:g} days: {'fits' if days <= limit else 'OVER BUDGET'}"

    at = f"at {plan.sustained_tflops:g} TFLOP/s sustained per {plan.gpu}"
    return "\n".join([
        f"compute plan ({plan.model_size} model, {plan.tile_px} px: {plan.gflops_forward:.1f} GFLOP per forward; "
        f"{plan.gpus} x {plan.gpu})",
        f"  train:    {plan.rows_per_step:,} rows/step = {plan.rows_description}",
        f"            {plan.train_flops_per_step:.3g} FLOP/step (3 x forward x rows x DP overhead {plan.dp_overhead:g}) "
        f"x {plan.steps:,} steps = {plan.train_flops:.3g} FLOP",
        f"            {plan.train_gpu_hours:,.3g} GPU-hours {at} = {plan.train_days:.2f} days on {plan.gpus}; "
        + budget(plan.train_days, plan.train_budget_days),
        f"  generate: {plan.generate_description} = {plan.generate_forwards:.3g} forwards "
        f"({plan.generate_tiles:,} tiles) = {plan.generate_flops:.3g} FLOP",
        f"            {plan.generate_gpu_hours:,.3g} GPU-hours {at} = {plan.generate_days:.2f} days on {plan.gpus}; "
        + budget(plan.generate_days, plan.generate_budget_days),
    ])
