"""The stage pipeline: manifests, skipping, invalidation, --force, atomic folders, resume.

The mechanism is tested with two small stages put in place of ``ingest`` and ``train``
(the real stages are tested in their own files), so each test runs in milliseconds.
"""

from __future__ import annotations

import json

import pytest

from synthpath import pipeline
from synthpath.pipeline import Stage, StageError, build, run_stage
from synthpath.recipe import parse_recipe


@pytest.fixture
def recipe(tmp_path):
    slide = tmp_path / "s.svs"
    slide.write_bytes(b"")
    raw = {
        "name": "t",
        "output_dir": str(tmp_path / "out"),
        "data": {"slides": [{"path": str(slide)}], "classes": ["a", "b"]},
        "ingest": {"tiling": {"levels": [1.0, 0.5], "tile_px": 32}},
    }
    return lambda **over: parse_recipe({**raw, **over})


@pytest.fixture
def calls(monkeypatch):
    """Replace the registry with two counting stages: a -> b."""
    log: list[str] = []

    def stage_a(ctx):
        log.append("a")
        (ctx.workdir / "a.txt").write_text(str(ctx.recipe.ingest.tiling.tile_px))
        return {"n": 1}

    def stage_b(ctx):
        log.append("b")
        step_file = ctx.workdir / "progress.txt"
        done = int(step_file.read_text()) if step_file.exists() else 0
        for step in range(done, 4):
            if ctx.options.get("crash_at") == step:
                raise KeyboardInterrupt  # simulated Ctrl-C halfway
            step_file.write_text(str(step + 1))
        upstream = (ctx.inputs["ingest"] / "a.txt").read_text()
        (ctx.workdir / "b.txt").write_text(upstream + f"/{ctx.recipe.train.steps}/resumed_from={done}")
        return {}

    reg = {
        "ingest": Stage("ingest", ("data", "ingest"), (), stage_a),
        "train": Stage("train", ("train",), ("ingest",), stage_b),
    }
    monkeypatch.setattr(pipeline, "_registry", lambda: reg)
    return log


def test_manifest_contents(recipe, calls):
    r = recipe()
    build(r)
    m = json.loads((r.output_dir / "ingest" / "manifest.json").read_text())
    assert m["stage"] == "ingest" and m["summary"] == {"n": 1}
    assert m["recipe_section_hash"] == r.section_hash("data", "ingest")
    assert m["synthpath_version"] and m["finished_at"]
    mt = json.loads((r.output_dir / "train" / "manifest.json").read_text())
    assert mt["inputs"] == {"ingest": pipeline.manifest_hash(m)}
    assert not list(r.output_dir.glob("*.partial"))


def test_skip_rerun_and_force(recipe, calls):
    build(recipe())
    assert calls == ["a", "b"]
    build(recipe())
    assert calls == ["a", "b"], "an up-to-date build must skip every stage"
    # a change in train's section re-runs train only
    build(recipe(train={"steps": 5}))
    assert calls == ["a", "b", "b"]
    # a change upstream re-runs the stage and everything after it
    r = recipe(train={"steps": 5}, ingest={"tiling": {"levels": [1.0, 0.5], "tile_px": 16}})
    build(r)
    assert calls == ["a", "b", "b", "a", "b"]
    assert (r.output_dir / "train" / "b.txt").read_text().startswith("16/5")
    # --force re-runs a stage even when current, and so everything downstream
    build(r, force=("ingest",))
    assert calls[-2:] == ["a", "b"]


def test_interrupted_stage_resumes_and_never_looks_finished(recipe, calls):
    r = recipe()
    with pytest.raises(KeyboardInterrupt):
        build(r, options={"crash_at": 2})
    assert (r.output_dir / "ingest" / "manifest.json").exists()
    assert not (r.output_dir / "train").exists(), "a half-finished stage must not look finished"
    assert (r.output_dir / "train.partial" / "progress.txt").read_text() == "2"
    build(r)
    assert (r.output_dir / "train" / "b.txt").read_text().endswith("resumed_from=2")
    # a partial folder made under another fingerprint is discarded, not resumed
    with pytest.raises(KeyboardInterrupt):
        build(r, force=("train",), options={"crash_at": 1})
    r2 = recipe(train={"steps": 3})
    build(r2)
    assert (r2.output_dir / "train" / "b.txt").read_text().endswith("resumed_from=0")


def test_deferred_worker_leaves_the_partial_folder_and_exits_zero(recipe, calls, monkeypatch, capsys):
    """A torchrun/Slurm worker that did its share but is not the one to finish the stage
    raises StageDeferred: the CLI says so and exits 0, the .partial folder stays for the
    worker that finishes, and a re-run resumes it."""
    from synthpath import cli

    r = recipe()
    build(r, until="ingest")
    reg = pipeline._registry()
    finished = {"flag": False}

    def worker(ctx):
        (ctx.workdir / "mine.txt").write_text("rank1")
        if not finished["flag"]:
            raise pipeline.StageDeferred("rank 1 of 2 finished its shards; 1 shard pending")
        return {"files": sorted(p.name for p in ctx.workdir.iterdir())}

    reg["train"] = Stage("train", ("train",), ("ingest",), worker)
    monkeypatch.setattr(cli, "load_recipe", lambda *a, **k: r)
    assert cli.main(["train", "unused.yaml"]) == 0
    assert "deferred: rank 1 of 2" in capsys.readouterr().out
    assert (r.output_dir / "train.partial" / "mine.txt").exists() and not (r.output_dir / "train").exists()
    finished["flag"] = True
    m = run_stage(r, "train")
    assert "mine.txt" in m["summary"]["files"] and (r.output_dir / "train" / "mine.txt").exists()


def test_partial_folder_without_fingerprint_is_adopted_not_wiped(recipe, calls):
    """Two workers start a stage at once: the second may see the folder before the first
    wrote fingerprint.json. It must not delete the first one's work."""
    r = recipe()
    build(r, until="ingest")
    work = r.output_dir / "train.partial"
    work.mkdir(parents=True)
    (work / "progress.txt").write_text("3")
    build(r)
    assert (r.output_dir / "train" / "b.txt").read_text().endswith("resumed_from=3")


def test_missing_upstream_is_a_clear_error(recipe, calls):
    r = recipe()
    with pytest.raises(StageError, match="needs the output of 'ingest'"):
        run_stage(r, "train")
    with pytest.raises(StageError, match="unknown stage"):
        run_stage(r, "trian")


def test_real_stage_order():
    names = [s.name for s in pipeline.stages()]
    assert names == ["ingest", "train", "audit", "generate", "export", "evaluate"]
    for s in pipeline.stages():
        assert set(s.inputs) <= set(names[: names.index(s.name)])
