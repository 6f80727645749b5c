"""Export: Parquet HF dataset from the shards, label-range errors, the release gate, and
the dataset card (every number in it equals the number in the file it came from).

The generate stage's output is built here with the release writers themselves (plan,
sample members, atomic shards, finalise) from seeded random pyramids, so these tests do
not depend on model quality; tests/test_generate.py runs the real model end to end."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from synthpath.export import hf as hfmod
from synthpath.export.card import safetensors_params, write_card
from synthpath.generate.plan import make_plan
from synthpath.generate.runner import finalise, sample_meta
from synthpath.generate.writers import finished_marker, sample_members, write_json_atomic, write_shard
from synthpath.pipeline import ReleaseBlocked, StageContext, StageError
from synthpath.recipe import parse_recipe

sys.path.insert(0, str(Path(__file__).parent))
from conftest import bind_test_audit  # noqa: E402


CLASSES = ["tumour", "stroma", "normal"]


def make_recipe(tmp_path: Path, **export):
    slide = tmp_path / "s.svs"
    slide.write_bytes(b"")
    return parse_recipe({
        "name": "cardtest",
        "output_dir": str(tmp_path / "out"),
        "data": {"slides": [{"path": str(slide)}], "classes": CLASSES},
        "ingest": {"tiling": {"levels": [1.0, 0.5], "tile_px": 16}},
        "sampler": {"name": "ddim", "steps": 7, "guidance_scale": 1.25, "zoom_start": 0.45},
        "generate": {"n_slides": 6, "layout_tiles": [1, 2], "samples_per_slide": 3, "shard_samples": 5,
                     "label_proportions": {"tumour": 0.5, "stroma": 0.25, "normal": 0.25}},
        "export": {"test_fraction": 0.34, **export},
    })


def build_generate_dir(gdir: Path, recipe, *, bad_label: dict | None = None) -> dict:
    """A finished generate folder made with the release writers from seeded random slides."""
    gdir.mkdir(parents=True, exist_ok=True)
    plan = make_plan(recipe)
    expect = {"plan_hash": plan.digest(), "model_hash": "m0", "recipe_hash": "r0"}
    write_json_atomic(gdir / "plan.json", plan.to_json())
    for shard in range(plan.n_shards):
        members = {}
        for s in plan.shard_samples_of(shard):
            rng = np.random.default_rng(s.slide_seed)
            levels = [rng.integers(0, 255, (*plan.slide_px(k), 3), dtype=np.uint8) for k in range(len(plan.levels))]
            imgs = {p.name: levels[p.level][p.y:p.y + 16, p.x:p.x + 16] for p in s.position}
            label = (bad_label or {}).get(s.key, s.label)
            members.update(sample_members(s.key, imgs, label, sample_meta(s, plan, model_hash="m0", attempt=0)))
        write_shard(gdir / "shards", shard, members, dict(expect, count=len(plan.shard_samples_of(shard)),
                                                          keys=[s.key for s in plan.shard_samples_of(shard)],
                                                          label_histogram={}))
    markers = {i: finished_marker(gdir / "shards", i, expect) for i in range(plan.n_shards)}
    summary = finalise(gdir, plan, markers, expect)
    summary["label_histogram"] = {c: sum(1 for s in plan.samples if s.label_name == c) for c in CLASSES}
    write_json_atomic(gdir / "manifest.json", {"stage": "generate", "summary": summary})
    return summary


def build_run(tmp_path: Path, *, passed: bool = True, dp: bool = True, **export):
    """Recipe plus upstream folders (train, audit, generate) in the shapes of the contracts."""
    import torch

    from synthpath.models.checkpoint import save_checkpoint
    from synthpath.models.registry import build_model

    recipe = make_recipe(tmp_path, **export)
    out = recipe.output_dir
    dirs = {n: out / n for n in ("ingest", "train", "audit", "generate")}
    for d in dirs.values():
        d.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_model("tiny", len(CLASSES), 16)
    save_checkpoint(dirs["train"], model, None, {"tile_px": 16, "classes": CLASSES})
    ledger = ({"enabled": True, "epsilon": 7.912345, "delta": 0.0008, "unit": "patient", "n_units": 12,
               "accountant": "prv", "noise_multiplier": 1.0731, "sample_rate": 0.25, "steps": 300,
               "max_grad_norm": 1.0, "warnings": ["only 12 patients: a weak patient-level guarantee"]}
              if dp else {"enabled": False})
    (dirs["train"] / "ledger.json").write_text(json.dumps(ledger))
    auc = 0.71 if not passed else 0.53
    report = {  # the shape synthpath.audit.report writes
        "passed": passed,
        "checks": {"copy_fraction": {"value": 0.0156, "threshold": 0.02, "passed": True, "copies": 1, "n_synthetic": 64,
                                     "per_space": {"pixel": 1, "learned": 0}, "rule": "copy iff d1 <= tau in any space"},
                   "closer_to_train": {"value": 0.55, "threshold": 0.7, "passed": True,
                                       "per_space": {"pixel": 0.55, "learned": 0.5}, "ideal": 0.5},
                   "mia_auc": {"value": auc, "threshold": 0.65, "passed": passed,
                               "tpr_at_fpr": {"0.01": {"fpr": 0.01, "tpr": 0.0213}}}},
        "failed_checks": [] if passed else ["mia_auc"],
        "mia": {"auc": auc, "n_members": 40, "n_nonmembers": 36,
                "tpr_at_fpr": {"0.01": {"fpr": 0.01, "tpr": 0.0213},
                               "0.001": {"fpr": 0.001, "tpr": 0.004,
                                         "note": "only 36 non-members: FPR 0.001 is below one false positive"}},
                "per_timestep_auc": {"0.1": 0.52, "0.3": 0.51}},
        "synthetic": {"n": 64},
        "thresholds": {"holdout_quantile": 0.01, "k_neighbours": 5},
        "notes": ["3 holdout patients only: thresholds are noisy"],
    }
    (dirs["audit"] / "report.json").write_text(json.dumps(report))
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(dirs["audit"] / "contact_sheet.png")
    build_generate_dir(dirs["generate"], recipe)
    bind_test_audit(recipe, dirs)
    return recipe, dirs


def ctx_for(recipe, dirs, tmp_path, **options) -> StageContext:
    work = recipe.output_dir / "export.partial"
    work.mkdir(parents=True, exist_ok=True)
    return StageContext(recipe=recipe, name="export", workdir=work, inputs=dirs, options=options)


def exported_run(tmp_path: Path, monkeypatch):
    """:func:`build_run` exported by the export stage, with ``datasets`` offline and its home in
    ``tmp_path``: (recipe, dirs, export summary, generate plan, the exported ``hf`` folder)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    recipe, dirs = build_run(tmp_path)
    summary = hfmod.run(ctx_for(recipe, dirs, tmp_path))
    plan = json.loads((dirs["generate"] / "plan.json").read_text())
    return recipe, dirs, summary, plan, recipe.output_dir / "export.partial" / "hf"


# ----------------------------------------------------------------------------- HF dataset
def test_hf_export_loads_with_datasets(tmp_path, monkeypatch):
    import datasets

    recipe, dirs, summary, plan, hf_dir = exported_run(tmp_path, monkeypatch)
    assert summary["splits"]["train"] + summary["splits"]["test"] == 18
    ds = datasets.load_dataset(str(hf_dir), cache_dir=str(tmp_path / "cache"))
    assert set(ds) == {"train", "test"}
    assert len(ds["train"]) == summary["splits"]["train"] and len(ds["test"]) == summary["splits"]["test"]
    assert ds["train"].features["label"].names == CLASSES
    # split by slide: no slide in both
    assert not set(ds["train"]["slide_id"]) & set(ds["test"]["slide_id"])
    by_key = {s["key"]: s for s in plan["samples"]}
    for split in ("train", "test"):
        row = ds[split][0]
        for n in ("10x", "20x"):
            img = row[f"image_{n}"]
            assert img.size == (16, 16) and img.mode == "RGB"
        want = by_key[row["key"]]
        assert row["label"] == want["label"] and row["seed"] == want["seed"]
        assert row["x_20x"] == want["position"][1]["x"] and row["mpp_20x"] == 0.5
    # the card's second loading route: the WebDataset shards through datasets
    shards = sorted(str(p) for p in (dirs["generate"] / "shards").glob("*.tar"))
    wds_ds = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train",
                                   cache_dir=str(tmp_path / "cache2"))
    assert len(wds_ds) == 18 and wds_ds[0]["20x.png"].size == (16, 16) and wds_ds[0]["json"]["key"] == wds_ds[0]["__key__"]
    # pixels are the shard's pixels
    rng = np.random.default_rng(by_key[ds["train"][0]["key"]]["slide_seed"])
    lv0 = rng.integers(0, 255, (16, 32, 3), dtype=np.uint8)
    p0 = by_key[ds["train"][0]["key"]]["position"][0]
    assert np.array_equal(np.asarray(ds["train"][0]["image_10x"]), lv0[:, p0["x"]:p0["x"] + 16])


def test_label_out_of_range_is_named(tmp_path):
    recipe = make_recipe(tmp_path)
    gdir = tmp_path / "gen"
    plan = make_plan(recipe)
    key = plan.samples[4].key
    build_generate_dir(gdir, recipe, bad_label={key: 7})
    with pytest.raises(StageError, match=rf"{key}.*label 7.*out of range"):
        hfmod.export_hf(gdir, tmp_path / "hf", classes=CLASSES, test_fraction=0.2)
    assert not list((tmp_path / "hf" / "data").glob("*.parquet"))  # nothing half-written


def test_export_refuses_after_failed_audit(tmp_path):
    recipe, dirs = build_run(tmp_path, passed=False)
    with pytest.raises(ReleaseBlocked, match="mia_auc"):
        hfmod.run(ctx_for(recipe, dirs, tmp_path))
    assert not (recipe.output_dir / "export.partial" / "hf").exists()
    # the override now, for an audit that was not itself run with it, is refused too
    with pytest.raises(ReleaseBlocked, match="mia_auc"):
        hfmod.run(ctx_for(recipe, dirs, tmp_path, allow_failed_audit=True))
    # an audit run with the override (as the audit stage records it) and the override now: it
    # exports and the card says so first, in bold
    rep = json.loads((dirs["audit"] / "report.json").read_text())
    rep["allowed_failed"] = True
    (dirs["audit"] / "report.json").write_text(json.dumps(rep))
    bind_test_audit(recipe, dirs, {"allow_failed_audit": True})
    summary = hfmod.run(ctx_for(recipe, dirs, tmp_path, allow_failed_audit=True))
    assert summary["audit_overridden"] is True
    card = (recipe.output_dir / "export.partial" / "hf" / "README.md").read_text()
    body = card.split("\n---\n", 1)[1].lstrip()
    assert body.startswith("**WARNING: the privacy audit of this dataset FAILED")


def test_tampered_shard_is_refused(tmp_path):
    recipe = make_recipe(tmp_path)
    gdir = tmp_path / "gen"
    build_generate_dir(gdir, recipe)
    tar = sorted((gdir / "shards").glob("*.tar"))[1]
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(StageError, match="sha256"):
        hfmod.export_hf(gdir, tmp_path / "hf", classes=CLASSES, test_fraction=0.2)


# ----------------------------------------------------------------------------- card
_NUM = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.])")


def _resolve(obj, path: list):
    for part in path:
        obj = len(obj) if part == "#len" else obj[part]
    return obj


def _prose(card: str) -> str:
    """The card without its YAML header, fenced code, inline code, image links and citations."""
    body = card.split("\n---\n", 1)[1]
    body = body.split("## Citation")[0]
    body = re.sub(r"```.*?```", "", body, flags=re.S)
    body = re.sub(r"`[^`]*`", "", body)
    body = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", body)
    body = "\n".join(line for line in body.splitlines() if not line.startswith(">"))  # verbatim quotes
    return body


@pytest.mark.parametrize("dp", [True, False])
def test_card_numbers_equal_their_sources(tmp_path, dp):
    recipe, dirs = build_run(tmp_path, dp=dp)
    ctx = ctx_for(recipe, dirs, tmp_path)
    hfmod.run(ctx)
    export_dir = ctx.workdir
    evaluate = {"tstr": {"accuracy": 0.8125, "ci95": [0.77, 0.85]}, "trtr": {"accuracy": 0.9042},
                "fidelity": {"20x": {"fid": 41.37, "kid": 0.0123}},
                "headline": {"10x": {"tstr_balanced_accuracy": 0.8217, "tstr_balanced_accuracy_ci95": [0.7931, 0.8503]},
                             "20x": {"tstr_balanced_accuracy": 0.5372, "tstr_balanced_accuracy_ci95": [0.2418, 0.8326]}}}
    card_path = write_card(export_dir, recipe=recipe, ingest_dir=dirs["ingest"], train_dir=dirs["train"],
                           audit_dir=dirs["audit"], generate_dir=dirs["generate"], evaluate_report=evaluate)
    card = card_path.read_text()
    prov = json.loads((export_dir / "hf" / "card_provenance.json").read_text())
    sources = {
        "export/export.json": json.loads((export_dir / "export.json").read_text()),
        "train/ledger.json": json.loads((dirs["train"] / "ledger.json").read_text()),
        "audit/report.json": json.loads((dirs["audit"] / "report.json").read_text()),
        "generate/manifest.json": json.loads((dirs["generate"] / "manifest.json").read_text()),
        "hf/evaluation.json": json.loads((export_dir / "hf" / "evaluation.json").read_text()),
        "recipe": recipe.model_dump(mode="json"),
        "train/model.safetensors": {"header": {"parameters": safetensors_params(dirs["train"] / "model.safetensors")}},
    }
    assert prov, "the card recorded no numbers"
    for rec in prov:
        want = _resolve(sources[rec["source"]], rec["path"])
        assert float(rec["text"]) == pytest.approx(float(want), rel=5e-4, abs=1e-12), rec
        assert rec["text"] in card, rec
    # every number in the prose came through the provenance record
    known = {r["text"] for r in prov}
    stray = [m for m in _NUM.findall(_prose(card)) if m not in known]
    assert not stray, f"numbers in the card with no source: {stray}"
    # a TSTR interval that reaches chance is the first limitation, naming only that level
    lim = card.split("## Bias, Risks, and Limitations", 1)[1]
    # (20x reaches chance, 10x does not: the warning is about 20x only and says the others do better)
    assert lim.lstrip().startswith("- **At `20x`, a classifier trained on this synthetic data does no better than chance")
    assert "`20x` 0.5372" in lim and "`10x` 0.8217" not in lim
    assert "at the other magnifications its interval lies above chance" in lim
    # the headline figures are there
    if dp:
        assert "ε = 7.912" in card and "δ = 0.0008" in card
        assert "> only 12 patients: a weak patient-level guarantee" in card
    else:
        assert "without differential privacy" in card
    assert "ROC AUC: 0.53" in card and "TPR at FPR 0.01: 0.0213" in card and "41.37" in card
    assert "> 3 holdout patients only" in card
    for n in ("10x", "20x"):
        assert (export_dir / "hf" / f"samples_{n}.png").is_file() and f"(samples_{n}.png)" in card
    # the audit's contact sheet shows real training tiles: neither exported nor embedded
    assert (dirs["audit"] / "contact_sheet.png").is_file()
    assert not (export_dir / "hf" / "contact_sheet.png").exists() and "contact_sheet.png" not in card
    # the release manifest lists every released file with its kind
    manifest = json.loads((export_dir / "hf" / "release_manifest.json").read_text())
    listed = {e["file"]: e["kind"] for e in manifest["files"]}
    assert listed["export/hf/README.md"] == "text" and listed["export/hf/evaluation.json"] == "statistic"
    assert listed["export/hf/samples_10x.png"] == "synthetic image"
    assert any(f.startswith("generate/shards/") and k == "synthetic image" for f, k in listed.items())
    on_disk = {f"export/hf/{p.relative_to(export_dir / 'hf').as_posix()}" for p in (export_dir / "hf").rglob("*")
               if p.is_file() and p.name != "release_manifest.json"}
    assert on_disk == {f for f in listed if f.startswith("export/hf/")}
    # the YAML header the Hub reads
    import yaml

    header = yaml.safe_load(card.split("---\n")[1])
    assert header["license"] == "cc-by-4.0" and header["task_categories"] == ["image-classification"]
    assert {"synthetic", "histopathology", "differential-privacy"} <= set(header["tags"])
    splits = {s["name"]: s["num_examples"] for s in header["dataset_info"]["splits"]}
    assert splits == {k: v["num_examples"] for k, v in sources["export/export.json"]["splits"].items()}
    assert header["configs"][0]["config_name"] == "default"
    assert "URCDM" in card and "Cechnicka" in card and "ZoomLDM" in card and "Graikos" in card
    assert 'load_dataset("webdataset"' in card
