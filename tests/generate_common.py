"""What the generation tests share (tests/test_generate.py, tests/test_copy_filter.py): the
folders upstream of ``generate`` built through the public contracts, and the stage context."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from synthpath.recipe import parse_recipe

from conftest import bind_test_audit


def train_tiles(n: int = 12, px: int = 16) -> torch.Tensor:
    """Seeded random 'training' tiles in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, px, px, generator=g) * 2 - 1


def filter_run_dirs(tmp_path: Path, *, name: str, generate: dict, export_slides: bool, thresholds: dict,
                    passed: bool = True):
    """Recipe + upstream folders: a tiny untrained model saved with save_checkpoint, an audit
    report (``passed``) and a ReleaseFilter built (pixel space) from :func:`train_tiles` with
    ``thresholds`` (``{"d1": ..., "cal": ...}``) at both levels, bound to the weights and
    recipe. ``generate`` updates a two-class, one-tile-layout generate section."""
    from synthpath.audit.filter import ReleaseFilter
    from synthpath.features import PixelSpace
    from synthpath.models.checkpoint import save_checkpoint
    from synthpath.models.registry import build_model

    tmp_path.mkdir(parents=True, exist_ok=True)
    slide = tmp_path / "s.svs"
    slide.write_bytes(b"")
    recipe = parse_recipe({
        "name": name,
        "output_dir": str(tmp_path / "out"),
        "data": {"slides": [{"path": str(slide)}], "classes": ["a", "b"]},
        "ingest": {"tiling": {"levels": [1.0, 0.5], "tile_px": 16}},
        "sampler": {"name": "ddim", "steps": 2, "guidance_scale": 1.0},
        "generate": {"layout_tiles": [1, 1], "shard_samples": 2, "label_proportions": {"a": 0.5, "b": 0.5},
                     "batch_size": 8, "device": "cpu", **generate},
        "export": {"slides": export_slides},
    })
    out = recipe.output_dir
    dirs = {n: out / n for n in ("ingest", "train", "audit")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_checkpoint(dirs["train"], build_model("tiny", 2, 16), None, {"tile_px": 16, "classes": ["a", "b"]})
    (dirs["audit"] / "report.json").write_text(json.dumps({"passed": passed, "checks": {}}))
    space = PixelSpace(16, device="cpu")
    feats = {("pixel", lv): space.embed(train_tiles()) for lv in (0, 1)}
    ReleaseFilter.build(dirs["audit"], {"pixel": space}, feats,
                        {"pixel": {lv: dict(thresholds) for lv in (0, 1)}}, n=3, levels=[1.0, 0.5])
    bind_test_audit(recipe, dirs)  # the release gate needs an audit bound to these weights and recipe
    return recipe, dirs


def generate_ctx(recipe, dirs, **options):
    """The generate stage's context over ``dirs``, quiet, with extra ``options``."""
    from synthpath.pipeline import StageContext

    work = recipe.output_dir / "generate.partial"
    work.mkdir(parents=True, exist_ok=True)
    return StageContext(recipe=recipe, name="generate", workdir=work, inputs=dirs, options={"quiet": True, **options})
