"""Export a finished public pretraining run as a shippable checkpoint with its provenance.

    python -m synthpath.train.public_export recipes/demo_public.yaml --out synthpath/assets/demo_public

reads the recipe's finished ``train`` (and ``ingest``) stage and writes into ``--out``:

- ``model.safetensors``: the EMA weights (the ones sampled), byte for byte;
- ``config.json``: the model config and the run's record (``data_public``, classes, levels,
  tile size, steps, privacy summary), byte for byte;
- ``provenance.json``: the recipe's name, the sha256 of the recipe *file* and of each GeoJSON
  it reads (stable across machines, unlike the recipe's section hashes, which include
  resolved absolute paths), the weights' sha256, the command that reproduces the run, and the
  data declaration: ``public: true`` and, per slide, its ``pkg://`` or file name, its regions
  file and the cases (patients) the model was trained on.

Only a run whose recipe declares its data public (``data.public: true``) and trained without
DP is exported this way (a DP model does not need this: its ledger is its guarantee).
:func:`synthpath.train.public_init.init_model` checks ``provenance.json``'s weights hash
against the file when a run starts from it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..atomic import sha256_file, write_json
from ..pipeline import StageError, read_manifest
from .public_init_files import CONFIG_FILE, EMA_FILE, PROVENANCE_FILE, display_path


def export_public(recipe_file: Path | str, out: Path | str, sets: list[str] | None = None) -> dict:
    from ..recipe import load_recipe

    recipe_file = Path(recipe_file)
    recipe = load_recipe(recipe_file, sets or [])
    if not recipe.data.public:
        raise StageError(f"{recipe_file}: data.public is not true, so its model is not a public checkpoint")
    if recipe.privacy.enabled:
        raise StageError(f"{recipe_file}: privacy.enabled is true; a DP model carries its own ledger instead")
    train_dir, ingest_dir = recipe.output_dir / "train", recipe.output_dir / "ingest"
    for d in (train_dir, ingest_dir):
        if read_manifest(d) is None:
            raise StageError(f"{d} is not a finished stage; run `synthpath build {recipe_file} --until train` first")
    cfg = json.loads((train_dir / CONFIG_FILE).read_text())
    if cfg.get("data_public") is not True or (cfg.get("privacy") or {}).get("enabled"):
        raise StageError(f"{train_dir / CONFIG_FILE} does not record a public, non-DP run")
    store = json.loads((ingest_dir / "store.json").read_text())
    splits = store.get("patient_splits") or {}
    slides = []
    for s in recipe.data.slides:
        meta = (store.get("slides") or {}).get(s.slide_id) or {}
        cases = meta.get("patients") or []
        slides.append({
            "slide_id": s.slide_id,
            "path": display_path(s.path, recipe.source),
            "geojson": s.geojson.name if s.geojson else None,
            "geojson_sha256": sha256_file(s.geojson) if s.geojson else None,
            "train_cases": sorted(c for c in cases if splits.get(c) == "train"),
            "holdout_cases": sorted(c for c in cases if splits.get(c) == "holdout"),
        })
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (EMA_FILE, CONFIG_FILE):
        tmp = out / (name + ".tmp")
        shutil.copyfile(train_dir / name, tmp)
        tmp.replace(out / name)
    weights_sha = sha256_file(out / EMA_FILE)
    if weights_sha != sha256_file(train_dir / EMA_FILE):
        raise StageError(f"copying {train_dir / EMA_FILE} to {out} changed it")
    prov = {
        "recipe_name": recipe.name,
        "recipe_file": recipe_file.name,
        "recipe_file_sha256": sha256_file(recipe_file),
        "recipe_hash": cfg.get("recipe_hash"),
        "weights_file": EMA_FILE,
        "weights_sha256": weights_sha,
        "steps": cfg.get("steps"),
        "command": f"synthpath build recipes/{recipe_file.name} --until train && "
                   f"python -m synthpath.train.public_export recipes/{recipe_file.name} --out <folder>",
        "data": {"public": True, "declared_by": "data.public: true in " + recipe_file.name, "slides": slides},
        "privacy": {"enabled": False, "note": "trained without DP on data declared public; no epsilon covers it"},
    }
    write_json(out / PROVENANCE_FILE, prov)
    return prov


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="export a public pretraining run as a checkpoint with provenance")
    ap.add_argument("recipe")
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    prov = export_public(args.recipe, args.out, args.set)
    print(json.dumps(prov, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
