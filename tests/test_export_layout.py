"""Release layout: per-level configs of distinct tiles, export.hf / export.webdataset."""

from __future__ import annotations

import numpy as np

from synthpath.export import hf as hfmod
from test_export import build_run, ctx_for, exported_run


def test_level_configs_hold_distinct_tiles(tmp_path, monkeypatch):
    import datasets

    recipe, dirs, summary, plan, hf_dir = exported_run(tmp_path, monkeypatch)
    stacks = datasets.load_dataset(str(hf_dir), cache_dir=str(tmp_path / "c0"))  # the default config
    for lv, n_lv in (("10x", 0), ("20x", 1)):
        ds = datasets.load_dataset(str(hf_dir), f"tiles_{lv}", cache_dir=str(tmp_path / f"c_{lv}"))
        want = {(s["slide_id"], s["position"][n_lv]["x"], s["position"][n_lv]["y"]) for s in plan["samples"]}
        got = [(r["slide_id"], r["x"], r["y"]) for sp in ds for r in ds[sp].remove_columns("image")]
        assert sorted(got) == sorted(want) and len(set(got)) == len(got)  # each distinct tile exactly once
        assert sum(summary["tile_configs"][lv].values()) == len(want)
        assert not set(ds["train"]["slide_id"]) & set(ds["test"]["slide_id"])
        # a tile row is the same image as the stacks listing it, at that level
        for sp in ds:
            by_key = {r["key"]: r for r in stacks[sp]}
            for r in ds[sp]:
                assert r["stack_keys"] and r["level"] == lv
                for k in r["stack_keys"]:
                    assert np.array_equal(np.asarray(by_key[k][f"image_{lv}"]), np.asarray(r["image"]))
    # layout [1, 2] coarsest tiles and 3 stacks per slide: the coarse column repeats, the tiles config does not
    n_coarse = sum(summary["tile_configs"]["10x"].values())
    assert n_coarse < len(plan["samples"])
    card = (hf_dir / "README.md").read_text()
    assert "tiles_10x" in card and "How rows relate" in card
    # the release's WebDataset: the generate shards, byte for byte
    wds = recipe.output_dir / "export.partial" / "webdataset"
    names = sorted(p.name for p in wds.glob("*.tar"))
    assert names == sorted(p.name for p in (dirs["generate"] / "shards").glob("*.tar")) and names
    for n in names:
        assert (wds / n).read_bytes() == (dirs["generate"] / "shards" / n).read_bytes()


def test_export_flags_are_honoured(tmp_path):
    recipe, dirs = build_run(tmp_path)
    recipe.export.hf = False  # (a recipe file would also need evaluate.enabled: false)
    summary = hfmod.run(ctx_for(recipe, dirs, tmp_path))  # skipped, not failed
    work = recipe.output_dir / "export.partial"
    assert summary["hf_dir"] is None and not (work / "hf").exists()
    assert summary["webdataset"]["files"] and (work / "webdataset" / "index.json").is_file()

    (tmp_path / "nowds").mkdir()
    recipe, dirs = build_run(tmp_path / "nowds", webdataset=False)
    summary = hfmod.run(ctx_for(recipe, dirs, tmp_path))
    assert summary["webdataset"] is None and not (recipe.output_dir / "export.partial" / "webdataset").exists()
    assert summary["splits"]["train"] > 0
