"""Tiles generated per tile released at real scale, from the geometry alone (no model).

For a recipe's generation plan, counts per level the tile windows synthesis must make
(:func:`synthpath.generate.tiling.needed_tiles`, the same dependency closure
``synthesize_slides(targets=...)`` generates) against the windows the release needs, in
``stacks`` mode (only the sampled stacks) and in ``slides`` mode (whole slides), and, for
comparison, what making the whole slide for a stacks release costs (the old behaviour).

    python benchmarks/bench_release_ratio.py recipes/kidney.yaml [--slides 100]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from synthpath.generate.plan import make_plan
from synthpath.generate.slidework import target_boxes
from synthpath.generate.tiling import all_tiles, level_grids, needed_tiles, zoom_factors
from synthpath.recipe import parse_recipe


def ratios(recipe_path: Path, mode: str, n_slides: int) -> dict:
    raw = yaml.safe_load(Path(recipe_path).read_text())
    g = raw.setdefault("generate", {})
    g.update(mode=mode, n_slides=n_slides)
    if not g.get("label_proportions"):  # the plan's geometry does not depend on the shares
        g["label_proportions"] = {c: 1.0 for c in raw["data"]["classes"]}
    raw.setdefault("export", {})["slides"] = mode == "slides"
    recipe = parse_recipe(raw, source=str(recipe_path), check_files=False)
    plan = make_plan(recipe)
    grids = level_grids(plan.layout_tiles, plan.levels, plan.tile_px, plan.window_overlap)
    factors = zoom_factors(plan.levels)
    made = [0] * len(plan.levels)
    whole = [len(t) * len(plan.slides) for t in all_tiles(grids)]
    for s in range(len(plan.slides)):
        if mode == "slides":
            need = all_tiles(grids)
        else:
            need = needed_tiles(target_boxes(plan, s), grids, factors, plan.tile_px)
        for k, t in enumerate(need):
            made[k] += len(t)
    released = plan.n_release_windows()
    return {
        "recipe": str(recipe_path), "mode": mode, "slides": len(plan.slides), "samples": len(plan.samples),
        "levels": plan.level_names, "tiles_generated": made, "tiles_released": released,
        "generated_per_released": round(sum(made) / sum(released), 4),
        "generated_per_released_per_level": [round(a / b, 4) for a, b in zip(made, released)],
        "whole_slide_tiles_per_released": round(sum(whole) / sum(released), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--slides", type=int, default=100, help="synthetic slides in the plan")
    a = ap.parse_args()
    for mode in ("stacks", "slides"):
        print(json.dumps(ratios(a.recipe, mode, a.slides)))


if __name__ == "__main__":
    main()
