"""Each source of a slide's resolution, in order, and the error when there is none."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from synthpath.pipeline import StageError, run_stage
from synthpath.recipe import parse_recipe
from synthpath.slides.mpp import MppError, resolve_mpp
from synthpath.slides.reader import open_slide


def test_mpp_from_openslide_property(make_pyramid_tiff):
    p = make_pyramid_tiff("a.tif", size=(256, 256), mpp=0.25, levels=2)
    with open_slide(p) as s:
        assert (s.mpp, s.mpp_source) == (pytest.approx(0.25), "openslide.mpp-x")
        assert s.handle.level_count == 2


def test_mpp_from_tiff_resolution_tags(make_pyramid_tiff):
    # A stripped TIFF is not an OpenSlide format: it opens through the image fallback,
    # with no properties, so only tifffile can see XResolution/ResolutionUnit.
    p = make_pyramid_tiff("plain.tif", size=(200, 150), mpp=0.5, tiled=False, resolution_unit="inch")
    with open_slide(p) as s:
        assert type(s.handle).__name__ == "ImageSlide"
        assert (s.mpp, s.mpp_source) == (pytest.approx(0.5), "tiff-resolution")
    props = {"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}
    assert resolve_mpp(props, p) == (pytest.approx(0.25), "tiff-resolution")
    assert resolve_mpp({**props, "openslide.mpp-x": "0.3"}, p)[1] == "openslide.mpp-x"


def test_mpp_from_objective_power(make_pyramid_tiff):
    p = make_pyramid_tiff("aperio.tif", size=(256, 256), levels=2, with_mpp=False, objective=40)
    with open_slide(p) as s:
        assert s.handle.properties.get("openslide.mpp-x") is None
        assert (s.mpp, s.mpp_source) == (pytest.approx(0.25), "objective-power")


def test_mpp_override(make_pyramid_tiff, caplog):
    bare = make_pyramid_tiff("bare.tif", size=(256, 256), levels=1, with_mpp=False)
    with open_slide(bare, mpp_override=0.3) as s:
        assert (s.mpp, s.mpp_source) == (0.3, "override")
    # An explicit override wins over metadata (documented choice), with a warning when they disagree.
    tagged = make_pyramid_tiff("tagged.tif", size=(256, 256), levels=1, mpp=0.5)
    with caplog.at_level(logging.WARNING, logger="synthpath.slides"):
        with open_slide(tagged, mpp_override=0.25) as s:
            assert (s.mpp, s.mpp_source) == (0.25, "override")
    assert "override" in caplog.text and "0.5" in caplog.text


def test_no_mpp_is_a_clear_error(make_pyramid_tiff, tmp_path):
    bare = make_pyramid_tiff("bare.tif", size=(256, 256), levels=1, with_mpp=False)
    with pytest.raises(MppError, match=r"bare\.tif: cannot tell the slide's resolution.*mpp_overrides"):
        open_slide(bare)
    recipe = parse_recipe({"name": "t", "output_dir": str(tmp_path / "run"),
                           "data": {"slides": [{"path": str(bare)}], "classes": ["a"]},
                           "ingest": {"tiling": {"levels": [1.0], "tile_px": 32}}})
    with pytest.raises(StageError, match=r"(?s)bare\.tif: cannot tell the slide's resolution"):
        run_stage(recipe, "ingest")


def test_plain_png_with_recipe_mpp_is_ingested(tmp_path):
    from synthpath.slides.testdata import tissue_image

    png = tmp_path / "field.png"
    Image.fromarray(tissue_image(256, 192, seed=2)).save(png)
    recipe = parse_recipe({"name": "t", "output_dir": str(tmp_path / "run"),
                           "data": {"slides": [{"path": str(png), "label": "a"}], "classes": ["a"],
                                    "mpp_overrides": {"field": 0.5}},
                           "ingest": {"tiling": {"levels": [1.0, 0.5], "tile_px": 32},
                                      "tissue": {"min_tissue_fraction": 0.2}}})
    s = run_stage(recipe, "ingest")["summary"]
    assert s["mpp"]["field"] == [0.5, "override"]
    assert s["tiles_per_level"]["1"] > 0 and s["tiles_per_level"]["0.5"] > 0
    # The tile at the origin at 0.5 mpp is the PNG's own pixels.
    from synthpath.tiles.store import TileStore

    store = TileStore(recipe.output_dir / "ingest")
    fine = [r for r in store.index.to_pylist() if r["level"] == 1]
    r = fine[0]
    img = store.read_images([r["tile_id"]])[0]
    src = np.asarray(Image.open(png).convert("RGB"))[r["y"]:r["y"] + 32, r["x"]:r["x"] + 32]
    assert np.abs(img.astype(int) - src.astype(int)).max() <= 2
