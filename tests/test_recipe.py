"""Recipe validation: every problem reported at once, with key paths and YAML lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from synthpath.cli import main
from synthpath.recipe import RecipeError, apply_overrides, load_recipe
from synthpath.units import level_name, parse_mpp

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


GOOD = """\
name: t
output_dir: out
data:
  slides:
    - path: slide.svs
  classes: [a, b]
ingest:
  tiling:
    levels: [2.0, 1.0, 0.5]
    tile_px: 64
"""


def test_demo_recipe_validates():
    r = load_recipe(ROOT / "recipes" / "demo.yaml")
    assert r.levels == [2.0, 1.0, 0.5]
    assert r.data.slides[0].path.is_file()  # the real slide, found through the installed package
    assert r.data.slides[0].geojson.is_file()
    assert r.privacy.enabled and r.privacy.unit == "patient"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    # Real-scale recipes point at a user's own folders, so only the schema is checked here.
    r = load_recipe(path, check_files=False)
    assert r.levels == sorted(r.levels, reverse=True)
    # every key in a shipped recipe carries a comment
    for n, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#") and ":" in s and not s.startswith("- ") and not s.endswith(":"):
            assert "#" in line, f"{path.name}:{n} has no comment: {line!r}"


def test_all_problems_reported_at_once_with_lines(tmp_path):
    text = GOOD.replace("tile_px: 64", "tile_px: -5\n    tile_sise: 3").replace(
        "levels: [2.0, 1.0, 0.5]", "levels: [0.5, 1.0]"
    )
    p = _write(tmp_path, text)
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    probs = {k: (line, msg) for k, line, msg in ei.value.problems}
    assert "ingest.tiling.tile_px" in probs
    assert "ingest.tiling.tile_sise" in probs and "unknown key" in probs["ingest.tiling.tile_sise"][1]
    assert "ingest.tiling.levels" in probs and "decreasing" in probs["ingest.tiling.levels"][1]
    # lines point into the YAML file
    lines = text.splitlines()
    assert "tile_px" in lines[probs["ingest.tiling.tile_px"][0] - 1]
    assert "tile_sise" in lines[probs["ingest.tiling.tile_sise"][0] - 1]
    assert "levels" in lines[probs["ingest.tiling.levels"][0] - 1]


def test_missing_slide_file_is_reported_by_key(tmp_path):
    p = _write(tmp_path, GOOD)
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    (key, line, msg), = ei.value.problems
    assert key == "data.slides.0.path" and line == 5 and "does not exist" in msg
    assert str(tmp_path / "slide.svs") in msg


def test_levels_accept_objective_aliases_and_need_integer_ratios(tmp_path):
    (tmp_path / "slide.svs").write_bytes(b"")
    r = load_recipe(_write(tmp_path, GOOD.replace("[2.0, 1.0, 0.5]", "['5x', 10x, 20X]")))
    assert r.levels == [2.0, 1.0, 0.5]
    with pytest.raises(RecipeError, match="integer multiple"):
        load_recipe(_write(tmp_path, GOOD.replace("[2.0, 1.0, 0.5]", "[2.0, 0.8]")))


def test_set_overrides(tmp_path):
    (tmp_path / "slide.svs").write_bytes(b"")
    r = load_recipe(_write(tmp_path, GOOD), ["train.steps=7", "ingest.tiling.tile_px=32", "data.classes=[x, y, z]"])
    assert r.train.steps == 7 and r.tile_px == 32 and r.data.classes == ["x", "y", "z"]
    raw = apply_overrides({"a": [{"b": 1}]}, ["a.0.b=2"])
    assert raw == {"a": [{"b": 2}]}
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe(_write(tmp_path, GOOD), ["train.stepz=7"])


def test_section_hash_changes_only_with_its_section(tmp_path):
    (tmp_path / "slide.svs").write_bytes(b"")
    a = load_recipe(_write(tmp_path, GOOD))
    b = load_recipe(_write(tmp_path, GOOD), ["train.steps=9"])
    assert a.section_hash("data", "ingest") == b.section_hash("data", "ingest")
    assert a.section_hash("train") != b.section_hash("train")


def test_units():
    assert parse_mpp("20x") == 0.5 and parse_mpp("1.25x") == 8.0 and parse_mpp(0.25) == 0.25
    assert parse_mpp("0.5mpp") == 0.5
    assert [level_name(m) for m in (0.5, 2.0, 8.0, 0.25, 4.0, 0.3)] == ["20x", "5x", "1.25x", "40x", "2.5x", "mpp0_3"]
    for bad in ("abc", -1, 0, "x"):
        with pytest.raises(ValueError):
            parse_mpp(bad)


def test_cli_validate_exit_codes(tmp_path, capsys):
    assert main(["validate", str(ROOT / "recipes" / "demo.yaml")]) == 0
    bad = _write(tmp_path, GOOD.replace("classes: [a, b]", "classes: [a, a]\n  colour: red"))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "data.colour" in err and "unknown key" in err
    assert "data.classes" in err and "unique" in err
