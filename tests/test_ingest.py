"""Ingest: nesting, labels from GeoJSON, patient splits, bad slides, and the real demo slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from synthpath.pipeline import StageError, read_manifest, run_stage
from synthpath.recipe import parse_recipe
from synthpath.slides.reader import open_slide
from synthpath.slides.split import assign_splits
from synthpath.slides.tiling import level_sizes
from synthpath.tiles.store import TileStore

PINK = (225, 140, 185)


def synth_recipe(tmp_path: Path, slides: list[dict], classes=("a", "b"), *, levels=(2.0, 1.0, 0.5), tile_px=32,
                 labels_csv: Path | None = None, slide_dir: Path | None = None, **ingest) -> object:
    """A recipe over generated slides (only data + ingest matter here)."""
    ing = {"tissue": {"thumbnail_px": 512, "blur_px": 1, "min_tissue_fraction": 0.3},
           "tiling": {"levels": list(levels), "tile_px": tile_px, "min_label_fraction": 0.5, "unlabelled": "keep"},
           "split": {"holdout_fraction": 0.3, "seed": 0}, "workers": 1, "shard_tiles": 50}
    for k, v in ingest.items():
        if isinstance(v, dict):
            ing[k] = {**ing.get(k, {}), **v}
        else:
            ing[k] = v
    data = {"slides": slides, "classes": list(classes)}
    if labels_csv is not None:
        data["labels_csv"] = str(labels_csv)
    if slide_dir is not None:
        data.update(slide_dir=str(slide_dir), slide_glob="*.tif")
    return parse_recipe({"name": "t", "output_dir": str(tmp_path / "run"), "data": data, "ingest": ing})


def index_of(recipe) -> list[dict]:
    return pq.read_table(recipe.output_dir / "ingest" / "index.parquet").to_pylist()


# --------------------------------------------------------------------------- geometry
def test_level_sizes_nest_exactly():
    sizes = level_sizes([2.0, 1.0, 0.5], 64, 0.499)
    assert sizes == [256, 128, 64]
    assert level_sizes([8.0, 2.0, 0.5], 256, 0.25) == [8192, 2048, 512]
    with pytest.raises(ValueError, match="finer than the slide"):
        level_sizes([1.0, 0.25], 64, 0.5, where="x.svs")


def test_nesting_and_parents(tmp_path, make_pyramid_tiff):
    slide = make_pyramid_tiff("s1.tif", size=(640, 512), mpp=0.5, levels=3, seed=3)
    recipe = synth_recipe(tmp_path, [{"path": str(slide), "slide_id": "s1", "label": "a"}])
    run_stage(recipe, "ingest")
    rows = index_of(recipe)
    by_id = {r["tile_id"]: r for r in rows}
    levels = {r["level"] for r in rows}
    assert levels == {0, 1, 2}
    for r in rows:
        assert r["tile_id"] == f"s1/L{r['level']}/{r['x']}_{r['y']}"
        assert r["size0"] == [128, 64, 32][r["level"]]
        assert 0 <= r["x"] and r["x"] + r["size0"] <= 640 and 0 <= r["y"] and r["y"] + r["size0"] <= 512
        if r["level"] == 0:
            assert r["parent_id"] is None
            continue
        p = by_id[r["parent_id"]]  # the parent is in the store
        assert p["level"] == r["level"] - 1
        # The child's footprint lies inside its parent's, on the parent's 2x2 grid.
        assert p["x"] <= r["x"] and r["x"] + r["size0"] <= p["x"] + p["size0"]
        assert p["y"] <= r["y"] and r["y"] + r["size0"] <= p["y"] + p["size0"]
        assert (r["x"] - p["x"]) % r["size0"] == 0 and (r["y"] - p["y"]) % r["size0"] == 0
        assert r["patient_id"] == p["patient_id"] and r["split"] == p["split"]
        assert r["tissue_fraction"] >= 0.3
    # Tiles equal a plain per-tile read of the same footprint (shared-block reads are exact
    # up to the resampling filter's reach at tile borders).
    store = TileStore(recipe.output_dir / "ingest")
    pick = [r for r in rows if r["level"] == 0][:2] + [r for r in rows if r["level"] == 2][:3]
    imgs = store.read_images([r["tile_id"] for r in pick])
    with open_slide(slide) as s:
        for r, img in zip(pick, imgs):
            ref = np.asarray(s.read_tile(r["x"], r["y"], r["size0"], 32), dtype=np.float32)
            assert np.abs(ref - img.astype(np.float32)).mean() < 4.0


def test_reads_from_closest_finer_pyramid_level(pyramid_tiff):
    with open_slide(pyramid_tiff) as s:
        assert s.level_downsamples == (1.0, 2.0, 4.0)
        assert s.best_level(4.0) == 2 and s.best_level(3.9) == 1 and s.best_level(1.5) == 0
        assert s.best_level(100.0) == 2
        thumb, ds = s.thumbnail(256)
        assert max(thumb.size) == 256 and ds == pytest.approx(4.0)


# --------------------------------------------------------------------------- labels
def _uniform_slide(make_pyramid_tiff, name="u.tif", size=(512, 512)):
    img = np.empty((size[1], size[0], 3), dtype=np.uint8)
    img[:] = PINK
    img[::7, ::5] = (90, 60, 150)  # nuclei-like dots, still tissue everywhere
    return make_pyramid_tiff(name, size=size, mpp=0.5, levels=2, image=img)


def _rect(x0, y0, x1, y1):
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


def _feature(coords, name=None, **props):
    p = dict(props)
    if name is not None:
        p["classification"] = {"name": name, "colorRGB": -1}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coords}, "properties": p}


def test_geojson_majority_by_area_and_unlabelled(tmp_path, make_pyramid_tiff):
    slide = _uniform_slide(make_pyramid_tiff)
    gj = tmp_path / "u.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [
        _feature(_rect(0, 0, 90, 128), "a"), _feature(_rect(90, 0, 180, 128), "b"),
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}}]}))
    entry = {"path": str(slide), "slide_id": "u", "geojson": str(gj)}
    for mode in ("keep", "drop"):
        recipe = synth_recipe(tmp_path / mode, [entry], levels=(2.0, 1.0), tile_px=32,
                              tiling={"unlabelled": mode})
        run_stage(recipe, "ingest")
        rows = {(r["level"], r["x"], r["y"]): r for r in index_of(recipe)}
        # Coarse (128 px) tile at the origin: 90/128 = 70% class a.
        assert rows[(0, 0, 0)]["label"] == 0 and rows[(0, 0, 0)]["label_name"] == "a"
        # Its children: the left one all a; the right one 26/64 a vs 38/64 b -> b.
        assert rows[(1, 0, 0)]["label"] == 0 and rows[(1, 0, 64)]["label"] == 0
        assert rows[(1, 64, 0)]["label"] == 1 and rows[(1, 64, 64)]["label"] == 1
        if mode == "keep":
            # 52/128 = 41% b: below min_label_fraction -> unlabelled, kept as -1.
            assert rows[(0, 128, 0)]["label"] == -1 and rows[(0, 128, 0)]["label_name"] is None
            assert len([k for k in rows if k[0] == 0]) == 16
        else:
            assert (0, 128, 0) not in rows and (1, 128, 0) not in rows
            assert {r["label"] for r in rows.values()} == {0, 1}


def test_geojson_case_ids_make_patients(tmp_path, make_pyramid_tiff):
    slide = _uniform_slide(make_pyramid_tiff)
    gj = tmp_path / "c.geojson"
    feats = [_feature(_rect(0, 0, 90, 256), "a", case_id="P1"),
             _feature(_rect(90, 0, 256, 256), "b", patient_id="P2"),
             _feature(_rect(256, 0, 512, 512), "a")]  # no case id: the slide's patient
    gj.write_text(json.dumps(feats))  # a bare list of features, as QuPath can export
    recipe = synth_recipe(tmp_path, [{"path": str(slide), "slide_id": "c", "geojson": str(gj),
                                      "patient_id": "SLIDEPAT"}], levels=(2.0, 1.0), tile_px=32,
                          tiling={"unlabelled": "drop"})
    run_stage(recipe, "ingest")
    rows = {(r["level"], r["x"], r["y"]): r for r in index_of(recipe)}
    assert rows[(0, 0, 0)]["patient_id"] == "P1"
    assert rows[(0, 128, 0)]["patient_id"] == "P2"
    assert rows[(0, 256, 0)]["patient_id"] == "SLIDEPAT"
    # The child of a P1 tile whose area is mostly P2 is dropped: a tile tree never mixes patients.
    assert (1, 64, 0) not in rows and (1, 0, 0) in rows
    assert all(r["patient_id"] == rows[(0, 0, 0)]["patient_id"] for k, r in rows.items()
               if k[0] == 1 and k[1] < 128 and k[2] < 128)


def test_unknown_label_is_a_clear_error(tmp_path, make_pyramid_tiff):
    slide = _uniform_slide(make_pyramid_tiff)
    gj = tmp_path / "bad.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [_feature(_rect(0, 0, 99, 99), "tumour")]}))
    recipe = synth_recipe(tmp_path / "g", [{"path": str(slide), "geojson": str(gj)}])
    with pytest.raises(StageError, match=r"bad\.geojson.*feature 0.*'tumour'"):
        run_stage(recipe, "ingest")
    csv = tmp_path / "labels.csv"
    csv.write_text("slide_id,patient_id,label\nu,p1,a\nother,p2,stroma\n")
    recipe = synth_recipe(tmp_path / "c", [{"path": str(slide)}], labels_csv=csv)
    with pytest.raises(StageError, match=r"labels\.csv, line 3: unknown label 'stroma'"):
        run_stage(recipe, "ingest")


# --------------------------------------------------------------------------- splits
def test_split_is_by_patient_deterministic_and_never_empty():
    pats = [f"p{i}" for i in range(10)]
    s1 = assign_splits(pats, 0.3, seed=0)
    assert s1 == assign_splits(list(reversed(pats)), 0.3, seed=0)
    assert sum(v == "holdout" for v in s1.values()) == 3
    assert assign_splits(pats, 0.3, seed=1) != s1
    assert sorted(assign_splits(["a", "b"], 0.01, 0).values()) == ["holdout", "train"]
    assert sorted(assign_splits(["a", "b"], 0.99, 0).values()) == ["holdout", "train"]
    assert assign_splits(["only"], 0.5, 0) == {"only": "train"}


def test_patients_never_on_both_sides(tmp_path, make_pyramid_tiff):
    lines = ["slide_id,patient_id,label"]
    for i in range(6):
        make_pyramid_tiff(f"slides/s{i}.tif", size=(256, 256), mpp=0.5, levels=1, seed=i)
        lines.append(f"s{i},pat{i // 2},{'ab'[i % 2]}")  # two slides per patient
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    recipe = synth_recipe(tmp_path, [], levels=(1.0, 0.5), labels_csv=csv, slide_dir=tmp_path / "slides",
                          tissue={"min_tissue_fraction": 0.1}, split={"holdout_fraction": 0.34, "seed": 5}, workers=2)
    summary = run_stage(recipe, "ingest")["summary"]
    rows = index_of(recipe)
    sides: dict[str, set] = {}
    for r in rows:
        sides.setdefault(r["patient_id"], set()).add(r["split"])
        assert r["label_name"] == "ab"[int(r["slide_id"][1]) % 2]
    assert set(sides) == {"pat0", "pat1", "pat2"}
    assert all(len(v) == 1 for v in sides.values())
    assert {s for v in sides.values() for s in v} == {"train", "holdout"}
    assert summary["slides_ok"] == 6 and summary["patients_per_split"] == {"holdout": 1, "train": 2}


# --------------------------------------------------------------------------- bad slides
@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_unreadable_slide_is_reported_and_skipped(tmp_path, make_pyramid_tiff, capsys):
    good = make_pyramid_tiff("good.tif", size=(256, 256), levels=1)
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00 this is not a slide")
    slides = [{"path": str(good), "label": "a"}, {"path": str(bad), "label": "a"}]
    recipe = synth_recipe(tmp_path / "lenient", slides, levels=(1.0, 0.5), tissue={"min_tissue_fraction": 0.1})
    summary = run_stage(recipe, "ingest")["summary"]
    assert summary["slides"] == 2 and summary["slides_ok"] == 1
    assert summary["slides_failed"][0]["path"] == str(bad) and str(bad) in summary["slides_failed"][0]["reason"]
    assert "skipped" in capsys.readouterr().out
    store = json.loads((recipe.output_dir / "ingest" / "store.json").read_text())
    assert store["failed_slides"][0]["slide_id"] == "broken"

    strict = synth_recipe(tmp_path / "strict", slides, levels=(1.0, 0.5))
    with pytest.raises(StageError, match="strict mode.*broken"):
        run_stage(strict, "ingest", options={"strict": True})
    assert not (strict.output_dir / "ingest").exists()

    only_bad = synth_recipe(tmp_path / "none", slides[1:], levels=(1.0, 0.5))
    with pytest.raises(StageError, match=r"(?s)no slide could be ingested.*broken\.svs"):
        run_stage(only_bad, "ingest")


# --------------------------------------------------------------------------- the real slide
def test_demo_recipe_on_the_real_slide(recipe_factory, capsys):
    recipe = recipe_factory()
    manifest = run_stage(recipe, "ingest")
    out = recipe.output_dir / "ingest"
    s = manifest["summary"]
    assert "per level" in capsys.readouterr().out
    assert list(s["tiles_per_level"]) == ["2", "1", "0.5"] and all(v > 0 for v in s["tiles_per_level"].values())
    assert set(s["tiles_per_label"]) == {"epidermis", "dermis"}
    assert set(s["tiles_per_split"]) == {"train", "holdout"}
    assert s["mpp"]["cmu_small_region"] == [pytest.approx(0.499), "openslide.mpp-x"]
    assert (out / "masks" / "cmu_small_region.png").is_file()
    assert read_manifest(out)["stage"] == "ingest"
    rows = pq.read_table(out / "index.parquet").to_pylist()
    # Both classes on both sides at every level; at least two holdout cases.
    for split in ("train", "holdout"):
        for level in range(3):
            assert {r["label"] for r in rows if r["split"] == split and r["level"] == level} == {0, 1}
    assert len({r["patient_id"] for r in rows if r["split"] == "holdout"}) >= 2
    assert len({r["patient_id"] for r in rows}) >= 8
    # One read_region per coarsest tree on this single-level slide.
    assert s["read_region_calls"] == s["tiles_per_level"]["2"]
    # Re-running with the same recipe skips the stage.
    again = run_stage(recipe, "ingest")
    assert again["finished_at"] == manifest["finished_at"]


def test_rasterize_holes_overlaps_and_decider():
    from synthpath.slides.labels import NO_CLASS, Region, rasterize, region_decider

    ring = [(0, 0), (64, 0), (64, 64), (0, 64)]
    hole = [(16, 16), (48, 16), (48, 48), (16, 48)]
    regions = [Region(0, "A", [(ring, [hole])]), Region(1, None, [([(48, 0), (64, 0), (64, 16), (48, 16)], [])])]
    r = rasterize(regions, 64, 64, 1.0)
    assert r.classes[32, 32] == NO_CLASS and r.cases[32, 32] == -1  # inside the hole
    assert r.classes[5, 5] == 0 and r.cases[5, 5] == 0 and r.case_ids == ["A"]
    assert r.classes[5, 60] == 1 and r.cases[5, 60] == 0  # the later region wins the class
    # Areas are right to within one ring of cells along the hole's edge (PIL fills edge pixels).
    assert abs((r.classes == 0).sum() - (64 * 64 - 32 * 32 - 16 * 16)) <= 4 * 33
    decide = region_decider(r, None, 0.5, "drop")
    d = decide(0, 0, 64)  # 0.69 class 0, 0.06 class 1, 0.25 unlabelled
    assert d.keep and d.label == 0 and d.case == "A"
    assert not decide(16, 16, 32).keep
    assert region_decider(None, 1, 0.5, "drop")(0, 0, 8).label == 1
    assert region_decider(None, None, 0.5, "keep")(0, 0, 8).label == -1


def test_block_grouping_gives_the_same_tiles(tmp_path, make_pyramid_tiff, monkeypatch):
    from synthpath.slides import slide_job as ingest
    from synthpath.slides.tiling import PlannedTile

    slide = make_pyramid_tiff("g.tif", size=(512, 512), mpp=0.5, levels=1, seed=4)
    plan = [PlannedTile(0, 128, 128, 256, None, 1.0, -1, None)]
    for j in range(2):
        for i in range(2):
            plan.append(PlannedTile(1, 128 + 128 * i, 128 + 128 * j, 128, 0, 1.0, -1, None))
    for p in range(1, 5):
        for j in range(2):
            for i in range(2):
                plan.append(PlannedTile(2, plan[p].x + 64 * i, plan[p].y + 64 * j, 64, p, 1.0, -1, None))
    sizes = [256, 128, 64]
    with open_slide(slide) as s:
        tiles, calls = ingest.read_planned_tiles(s, plan, 32, sizes)
        whole = {i: np.asarray(im) for i, im in tiles}
        assert calls[0] == 1
        monkeypatch.setattr(ingest, "MAX_BLOCK_PX", 130)  # level-0 block too big: group by level-1 tiles
        tiles, calls = ingest.read_planned_tiles(s, plan, 32, sizes)
        grouped = {i: np.asarray(im) for i, im in tiles}
        assert calls[0] == 1 + 4 + 4  # the root alone, then one block per level-1 tile for levels 1 and 2
    assert whole.keys() == grouped.keys() == set(range(len(plan)))
    for i in whole:
        inner = (slice(4, -4), slice(4, -4))  # away from block edges the filter sees the same pixels
        assert np.abs(whole[i][inner].astype(int) - grouped[i][inner].astype(int)).max() <= 1


def test_no_tissue_anywhere_is_a_clear_error(tmp_path, make_pyramid_tiff):
    glass = np.full((256, 256, 3), 245, dtype=np.uint8)
    slide = make_pyramid_tiff("glass.tif", size=(256, 256), levels=1, image=glass)
    recipe = synth_recipe(tmp_path, [{"path": str(slide), "label": "a"}], levels=(1.0, 0.5))
    with pytest.raises(StageError, match="no tile was kept.*min_tissue_fraction"):
        run_stage(recipe, "ingest")
