"""Generation: plan determinism, sample seeds, deterministic tars, WebDataset read-back,
sharded runner (interruption, world size 2, release gate) with a tiny real model."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from synthpath.generate.plan import holdout_slide_ids, largest_remainder, make_plan, stable_seed, window_grids
from synthpath.generate.runner import rank_world
from synthpath.generate.writers import encode_png, finished_marker, sample_members, write_shard, write_tar
from synthpath.pipeline import StageError
from synthpath.recipe import parse_recipe

sys.path.insert(0, str(Path(__file__).parent))
from generate_common import filter_run_dirs, generate_ctx  # noqa: E402



def small_recipe(tmp_path: Path, **gen) -> object:
    slide = tmp_path / "s.svs"
    slide.write_bytes(b"")
    raw = {
        "name": "t",
        "output_dir": str(tmp_path / "out"),
        "data": {"slides": [{"path": str(slide)}], "classes": ["a", "b", "c"]},
        "ingest": {"tiling": {"levels": [2.0, 1.0, 0.5], "tile_px": 32}},
        "generate": {"n_slides": 5, "layout_tiles": [2, 2], "samples_per_slide": 3, "shard_samples": 4,
                     "label_proportions": {"a": 0.5, "b": 0.3, "c": 0.2}, **gen},
    }
    return parse_recipe(raw)


# ----------------------------------------------------------------------------- plan
def test_largest_remainder():
    assert largest_remainder([0.5, 0.3, 0.2], 5) == [3, 1, 1]  # 2.5, 1.5, 1.0: the tie at .5 goes to the first
    assert sum(largest_remainder([1, 1, 1], 10)) == 10
    assert largest_remainder([1, 1, 1], 10) == [4, 3, 3]
    assert largest_remainder([0, 2, 1], 3) == [0, 2, 1]
    assert largest_remainder([0, 1], 4) == [0, 4]
    with pytest.raises(ValueError):
        largest_remainder([0, 0], 3)


def test_plan_is_deterministic_and_complete(tmp_path):
    r = small_recipe(tmp_path)
    p1, p2 = make_plan(r), make_plan(r)
    assert p1.to_json() == p2.to_json() and p1.digest() == p2.digest()
    assert len(p1.slides) == 5 and len(p1.samples) == 15
    # 5 slides at 0.5/0.3/0.2: quotas 2.5/1.5/1.0 -> largest remainder gives 3/1/1 or 2/2/1
    counts = Counter(s.label_name for s in p1.slides)
    assert sum(counts.values()) == 5 and counts["c"] == 1
    keys = [s.key for s in p1.samples]
    assert len(set(keys)) == len(keys) and all("." not in k for k in keys)
    # shards of 4 consecutive samples
    assert p1.n_shards == 4 and [len(p1.shard_samples_of(i)) for i in range(4)] == [4, 4, 4, 3]
    for s in p1.samples:
        assert s.shard == s.index // 4
        # the stack is nested: each finer tile lies inside the coarser one
        for a, b in zip(s.position, s.position[1:]):
            assert a.x <= b.x / 2 and (b.x + 32) / 2 <= a.x + 32 and a.y <= b.y / 2 and (b.y + 32) / 2 <= a.y + 32
        # stacks mode: each tile is one of synthesis's windows (so it is generated exactly once)
        grids = window_grids((2, 2), [2.0, 1.0, 0.5], 32, 8)
        for p in s.position:
            assert grids[p.level][0][p.row] == p.y and grids[p.level][1][p.col] == p.x
        assert [p.name for p in s.position] == ["5x", "10x", "20x"]
    # stacks within a slide are distinct
    for sl in p1.slides:
        stacks = {tuple((p.row, p.col) for p in p1.samples[i].position) for i in sl.samples}
        assert len(stacks) == len(sl.samples)
    # a different generation seed changes positions and seeds, not counts
    p3 = make_plan(small_recipe(tmp_path, seed=99))
    assert p3.digest() != p1.digest() and len(p3.samples) == 15


def test_sample_seeds_depend_only_on_seed_and_index(tmp_path):
    p = make_plan(small_recipe(tmp_path))
    for s in p.samples:
        assert s.seed == stable_seed("synthpath-sample", 1234, s.index)
    assert len({s.seed for s in p.samples}) == len(p.samples)
    # more slides: the first samples keep their seeds (the plan grows, it does not reshuffle seeds)
    p_big = make_plan(small_recipe(tmp_path, n_slides=7))
    assert all(a.seed == b.seed for a, b in zip(p.samples, p_big.samples))
    assert stable_seed("x", 1) == stable_seed("x", 1) != stable_seed("x", 2)


def test_plan_errors_name_the_key(tmp_path):
    from synthpath.recipe import RecipeError

    with pytest.raises(RecipeError, match="generate.samples_per_slide"):  # caught when the recipe is read
        small_recipe(tmp_path, samples_per_slide=65, layout_tiles=[1, 1])
    r = small_recipe(tmp_path, layout_tiles=[1, 1])
    r.generate.samples_per_slide = 65  # and again by the plan, for a recipe changed after validation
    with pytest.raises(StageError, match="samples_per_slide"):
        make_plan(r)
    with pytest.raises(StageError, match="label_proportions"):
        make_plan(small_recipe(tmp_path, label_proportions=None))


def test_label_shares_from_training_tiles(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ing = tmp_path / "ingest"
    ing.mkdir()
    pq.write_table(pa.table({
        "level": pa.array([0, 0, 0, 0, 0, 1, 0], pa.int16()),
        "label": pa.array([0, 0, 0, 2, 1, 1, 1], pa.int16()),
        "split": ["train", "train", "train", "train", "holdout", "train", "train"],
    }), ing / "index.parquet")
    p = make_plan(small_recipe(tmp_path, label_proportions=None, n_slides=5), ing)
    assert p.label_source == "training tiles" and p.label_weights == [3.0, 1.0, 1.0]
    assert Counter(s.label for s in p.slides) == Counter({0: 3, 1: 1, 2: 1})


def test_holdout_slides_stratified(tmp_path):
    p = make_plan(small_recipe(tmp_path, n_slides=8))
    test = holdout_slide_ids(p.slides, 3, 0.25)
    assert len(test) == 2
    assert holdout_slide_ids(p.slides, 3, 0.0) == set()
    assert holdout_slide_ids(p.slides, 3, 0.25) == test


def test_rank_world_from_env():
    assert rank_world({}) == (0, 1)
    assert rank_world({"RANK": "1", "WORLD_SIZE": "4"}) == (1, 4)
    assert rank_world({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}) == (2, 3)
    assert rank_world({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}) == (2, 3)
    with pytest.raises(StageError, match="RANK"):
        rank_world({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(StageError, match="not an integer"):
        rank_world({"RANK": "x", "WORLD_SIZE": "2"})


# ----------------------------------------------------------------------------- writers
def _members(seed: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    out = {}
    for k in ("b_0001", "a_0000"):
        imgs = {n: rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for n in ("5x", "10x")}
        out.update(sample_members(k, imgs, 1, {"key": k, "label_name": "b", "seed": seed}))
    return out


def test_tar_bytes_depend_only_on_content(tmp_path):
    import time

    m = _members(0)
    a = write_tar(tmp_path / "a.tar", m)
    time.sleep(1.1)  # a different wall clock must not change the bytes
    b = write_tar(tmp_path / "b.tar", dict(reversed(list(m.items()))))  # insertion order neither
    assert a == b and (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    c = write_tar(tmp_path / "c.tar", _members(1))
    assert c != a
    assert encode_png(np.zeros((4, 4, 3), np.uint8)) == encode_png(np.zeros((4, 4, 3), np.uint8))


def test_shard_marker_and_webdataset_readback(tmp_path):
    import webdataset as wds

    marker = write_shard(tmp_path, 3, _members(0), {"count": 2, "plan_hash": "p"})
    assert marker["sha256"] and (tmp_path / "shard-000003.tar").is_file()
    assert finished_marker(tmp_path, 3, {"plan_hash": "p"}) is not None
    assert finished_marker(tmp_path, 3, {"plan_hash": "other"}) is None
    got = list(wds.WebDataset([str(tmp_path / "shard-000003.tar")], shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in got] == ["a_0000", "b_0001"]
    assert got[0]["cls"] == 1 and got[0]["json"]["label_name"] == "b"
    assert got[0]["5x.png"].size == (16, 16) and got[0]["10x.png"].mode == "RGB"
    # a corrupted tar no longer counts as finished
    with open(tmp_path / "shard-000003.tar", "r+b") as f:
        f.seek(600)
        f.write(b"\x00\x01\x02")
    assert finished_marker(tmp_path, 3, {"plan_hash": "p"}) is None


def test_sample_members_reject_bad_keys():
    img = {"5x": np.zeros((4, 4, 3), np.uint8)}
    with pytest.raises(ValueError, match="contain no"):
        sample_members("a.b", img, 0, {})
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4), np.float32))


# ----------------------------------------------------------------------------- runner (real tiny model)
def _run_dirs(tmp_path: Path, *, copy_all: bool = False, passed: bool = True, **gen):
    """Recipe + upstream folders built through the public contracts: a tiny untrained
    model saved with save_checkpoint, an audit report and a ReleaseFilter built from
    random 'training' tiles (``copy_all`` sets thresholds that flag every tile)."""
    big = 1e9 if copy_all else 0.0
    return filter_run_dirs(tmp_path, name="gen", generate={"n_slides": 3, "samples_per_slide": 2,
                                                            "max_filter_retries": 1, **gen},
                           export_slides=False, thresholds={"d1": big, "cal": big}, passed=passed)


_ctx = generate_ctx


def _keys(shard_dir: Path) -> list[str]:
    import webdataset as wds

    urls = sorted(str(p) for p in shard_dir.glob("*.tar"))
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False).decode("pil")]


def test_interrupted_generation_resumes_to_exact_sample_set(tmp_path):
    from synthpath.generate import runner

    # one slide per group; 3-sample shards, so slide syn00001 (samples 2, 3) straddles two shards
    recipe, dirs = _run_dirs(tmp_path, slides_per_group=1, shard_samples=3)
    plan = make_plan(recipe)
    assert plan.n_groups == 3 and plan.shards_of_slide(1) == [0, 1]
    seen = []

    def crash(sample):
        seen.append(sample.key)
        if len(seen) == 3:  # slides 0 and 1 are written (the hook runs after a slide's marker)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run(_ctx(recipe, dirs, on_sample=crash))
    work = recipe.output_dir / "generate.partial"
    assert sorted(p.name for p in (work / "work").glob("*.done.json")) == ["syn00000.done.json", "syn00001.done.json"]
    assert not list((work / "shards").glob("*.tar"))  # shards are packed only once every slide is done
    assert not list(work.rglob("*.tmp*"))
    first = (work / "work" / "syn00001.tar").read_bytes()

    redone = []
    summary = runner.run(_ctx(recipe, dirs, on_sample=lambda s: redone.append(s.key)))
    # only the slide in flight was made again; the union is exactly the plan, each slide made once
    assert redone == [s.key for s in plan.samples if s.slide_index == 2]
    shard_dir = work / "shards"
    keys = _keys(shard_dir)
    assert keys == [s.key for s in plan.samples] and len(set(keys)) == len(keys)
    assert summary["n_samples"] == 6 and summary["n_shards"] == 2 and summary["this_run"]["slides"] == 1
    assert not (work / "work").exists() and not list(work.rglob("*.tmp*"))
    # stacks mode: the manifest says how many tiles were made per tile released (from every slide's marker)
    assert summary["mode"] == "stacks" and summary["tiles_released"] == sum(plan.n_release_windows())
    assert summary["tiles_generated"] >= summary["tiles_released"] > 0
    assert summary["generated_per_released"] <= 1.5  # only the stacks' subtrees are made
    assert 0 < summary["this_run"]["mean_batch_fill"] <= summary["this_run"]["batch_size"] == 8
    assert summary["generated_per_released"] == round(summary["tiles_generated"] / summary["tiles_released"], 4)
    # a clean run in another folder gives byte-identical shards (deterministic sampling + tars)
    recipe2, dirs2 = _run_dirs(tmp_path / "again", slides_per_group=1, shard_samples=3)
    runner.run(_ctx(recipe2, dirs2))
    shard_dir2 = recipe2.output_dir / "generate.partial" / "shards"
    assert sorted(p.name for p in shard_dir.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    for p in sorted(shard_dir.glob("*.tar")):
        assert (shard_dir2 / p.name).read_bytes() == p.read_bytes(), p.name
    import tarfile

    with tarfile.open(shard_dir / "shard-000000.tar") as tar:
        slide1 = {m.name: tar.extractfile(m).read() for m in tar if m.name.startswith("syn00001_0000.")}
    with tarfile.open(fileobj=__import__("io").BytesIO(first)) as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar if m.name.startswith("syn00001_0000.")} == slide1

    # sample JSON and images
    import webdataset as wds

    s0 = next(iter(wds.WebDataset([str(shard_dir / "shard-000000.tar")], shardshuffle=False).decode("pil")))
    meta = s0["json"]
    assert meta["slide_id"] == plan.samples[0].slide_id and meta["seed"] == plan.samples[0].seed
    assert [lv["name"] for lv in meta["levels"]] == ["10x", "20x"] and meta["levels"][1]["mpp"] == 0.5
    assert s0["cls"] == plan.samples[0].label and s0["10x.png"].size == (16, 16) and s0["20x.png"].size == (16, 16)
    assert len(meta["model_hash"]) == 16


def test_resume_inside_a_group_remakes_the_whole_group(tmp_path):
    """Slides of one group share model batches; a resume that finds one of them written
    synthesises the group again whole (same batches), so the bytes equal a clean run."""
    from synthpath.generate import runner

    recipe, dirs = _run_dirs(tmp_path, slides_per_group=2, shard_samples=3, batch_size=3)
    plan = make_plan(recipe)
    assert plan.n_groups == 2 and plan.group_slides(0) == [0, 1]
    seen = []

    def crash(sample):
        seen.append(sample.key)
        if len(seen) == 2:  # syn00000 is written, syn00001 (same group) is not
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run(_ctx(recipe, dirs, on_sample=crash))
    work = recipe.output_dir / "generate.partial"
    assert sorted(p.name for p in (work / "work").glob("*.done.json")) == ["syn00000.done.json"]
    redone = []
    summary = runner.run(_ctx(recipe, dirs, on_sample=lambda s: redone.append(s.key)))
    assert redone == [s.key for s in plan.samples if s.slide_index in (1, 2)]  # written: only the missing slides
    assert summary["this_run"]["tiles"] == summary["tiles_generated"]  # but group 0 was synthesised whole again
    recipe2, dirs2 = _run_dirs(tmp_path / "clean", slides_per_group=2, shard_samples=3, batch_size=3)
    runner.run(_ctx(recipe2, dirs2))
    for p in sorted((work / "shards").glob("*.tar")):
        assert p.read_bytes() == (recipe2.output_dir / "generate.partial" / "shards" / p.name).read_bytes(), p.name


def test_slides_mode_releases_every_tile(tmp_path):
    from synthpath.generate import runner

    recipe, dirs = _run_dirs(tmp_path, mode="slides", samples_per_slide=1, n_slides=2, shard_samples=3)
    plan = make_plan(recipe)
    # a 1x1 layout over two levels holds 4 stacks: every one is a sample, in stack order
    assert len(plan.samples) == 8 and [s.position[-1].col + 2 * s.position[-1].row for s in plan.samples[:4]] == [0, 1, 2, 3]
    summary = runner.run(_ctx(recipe, dirs))
    assert summary["mode"] == "slides" and summary["distinct_images_released_per_level"] == [2, 8]
    assert summary["n_samples"] == 8
    recipe.export.slides = False
    with pytest.raises(StageError, match="generate.mode: slides"):  # a TIFF of a stacks-mode slide would be empty
        recipe.export.slides, recipe.generate.mode = True, "stacks"
        make_plan(recipe)
    # the whole slide is released, so every generated tile window is used
    assert summary["tiles_generated"] == summary["tiles_released"] and summary["generated_per_released"] == 1.0


def test_world_size_two_gives_same_bytes(tmp_path, monkeypatch):
    from synthpath.generate import runner

    # whole slides (TIFFs need mode slides): 3 slides of 4 stacks, shards of 5 (slides straddle shards)
    recipe, dirs = _run_dirs(tmp_path, slides_per_group=1, shard_samples=5, mode="slides")
    recipe.export.slides = True
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(runner.ShardsPending, match="rank 0 of 2"):
        runner.run(_ctx(recipe, dirs))
    work = recipe.output_dir / "generate.partial"
    # rank 0 made groups 0 and 2 (one slide each); nothing is packed yet
    assert sorted(p.name for p in (work / "work").glob("*.done.json")) == ["syn00000.done.json", "syn00002.done.json"]
    assert not list((work / "shards").glob("*.tar"))
    monkeypatch.setenv("RANK", "1")
    summary = runner.run(_ctx(recipe, dirs))  # the last worker finalises
    assert summary["world"] == 2 and summary["rank"] == 1
    monkeypatch.delenv("WORLD_SIZE")  # (webdataset itself reads these too)
    monkeypatch.delenv("RANK")
    recipe1, dirs1 = _run_dirs(tmp_path / "w1", slides_per_group=1, shard_samples=5, mode="slides")
    recipe1.export.slides = True
    runner.run(_ctx(recipe1, dirs1))
    work1 = recipe1.output_dir / "generate.partial"
    for rel in ("shards/shard-000000.tar", "shards/shard-000001.tar", "shards/shard-000002.tar", "slides/syn00001.tiff"):
        assert (work / rel).read_bytes() == (work1 / rel).read_bytes(), rel
    assert _keys(work / "shards") == [s.key for s in make_plan(recipe).samples]
    # each slide's TIFF was written once, by the rank making the slide; OpenSlide opens it
    import openslide

    tiffs = sorted((work / "slides").glob("*"))
    assert [p.name for p in tiffs] == ["syn00000.tiff", "syn00001.tiff", "syn00002.tiff"]
    assert summary["slide_tiffs"] == [p.name for p in tiffs]
    with openslide.OpenSlide(str(tiffs[1])) as osr:
        assert osr.dimensions == (32, 32)


def test_release_filter_and_gate(tmp_path):
    from synthpath.generate import runner
    from synthpath.pipeline import ReleaseBlocked

    recipe, dirs = _run_dirs(tmp_path, copy_all=True)
    with pytest.raises(StageError, match="flagged|flags"):
        runner.run(_ctx(recipe, dirs))
    assert not list((recipe.output_dir / "generate.partial" / "shards").glob("*.tar"))
    recipe, dirs = _run_dirs(tmp_path / "failed", passed=False)
    with pytest.raises(ReleaseBlocked, match="audit"):
        runner.run(_ctx(recipe, dirs))
