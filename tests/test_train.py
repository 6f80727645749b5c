"""Trainer tests on a tiny synthetic nested tile store (16 px, 2 levels, tiny model, CPU)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from opacus.accountants import create_accountant
from safetensors.torch import load_file

from synthpath.models import load_model
from synthpath.pipeline import StageContext, StageError
from synthpath.recipe import parse_recipe
from synthpath.tiles.toystore import make_toy_store
from synthpath.train.trainer import TrainingInterrupted, run, train



@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "store"
    # 5 training patients; case00 keeps only 1 tile (sampled with replacement under patient DP)
    make_toy_store(root, n_patients=6, tile_px=16, n_levels=2, coarse_tiles=2, holdout_patients=1,
                   tiles_per_patient_limit=1)
    return root


def _recipe(tmp_path, train=None, privacy=None, model=None):
    data = {
        "name": "t", "output_dir": str(tmp_path), "seed": 0,
        "data": {"slide_dir": str(tmp_path), "classes": ["stroma", "tumour"]},
        "ingest": {"tiling": {"levels": [2.0, 1.0], "tile_px": 16}},
        "model": {"size": "tiny", **(model or {})},
        "train": {"steps": 4, "batch_size": 4, "physical_batch_size": 8, "lr": 1e-3, "ema_decay": 0.9,
                  "sample_every": 1000, "checkpoint_every": 1000, "log_every": 1, "device": "cpu", **(train or {})},
        "privacy": {"enabled": False, **(privacy or {})},
    }
    return parse_recipe(data, check_files=False)


PATIENT_DP = {"enabled": True, "unit": "patient", "target_epsilon": 8.0, "accountant": "rdp",
              "noise_multiplicity": 2, "tiles_per_patient": 2, "max_grad_norm": 1.0}


def test_nonprivate_stage_trains_and_loss_falls(tmp_path, store):
    recipe = _recipe(tmp_path, train={"steps": 24, "sample_every": 12, "checkpoint_every": 12})
    ctx = StageContext(recipe=recipe, name="train", workdir=tmp_path / "train.partial", inputs={"ingest": store},
                       options={"progress": False})
    summary = run(ctx)
    w = ctx.workdir
    losses = [float(r["loss"]) for r in csv.DictReader((w / "losses.csv").open())]
    assert len(losses) == 24
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6  # the loss falls
    assert summary["loss_last_tenth"] < summary["loss_first_tenth"]
    for name in ("model.safetensors", "config.json", "ledger.json", "loss.png", "losses.csv",
                 "samples/step_00012.png", "samples/step_00024.png"):
        assert (w / name).is_file(), name
    assert not (w / "state").exists()  # the resumable state is gone once training finished
    cfg = json.loads((w / "config.json").read_text())
    assert cfg["tile_px"] == 16 and cfg["levels"] == [2.0, 1.0] and cfg["classes"] == ["stroma", "tumour"]
    assert cfg["steps"] == 24 and cfg["recipe_hash"] == recipe.section_hash("model", "train", "privacy")
    ledger = json.loads((w / "ledger.json").read_text())
    assert ledger["enabled"] is False and "no formal privacy guarantee" in ledger["warnings"][0]
    model = load_model(w, "cpu")
    assert model.num_classes == 2 and model.tile_px == 16
    assert not any(p.suffix in (".pt", ".pth", ".pkl", ".bin") for p in w.rglob("*"))  # no pickles


def _same_weights(a, b):
    """Bit-identical tensors in both weight files (the JSON header's key order may differ)."""
    for name in ("model.safetensors", "model_raw.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}:{k} differs"
    return True


def test_patient_dp_resume_is_exact_and_epsilon_is_right(tmp_path, store):
    recipe = _recipe(tmp_path, train={"steps": 4, "batch_size": 2, "checkpoint_every": 3}, privacy=PATIENT_DP)
    # the DP streams are secret (OS entropy); a test injects one seed to compare two runs
    full = train(recipe, store, tmp_path / "full", progress=False, dp_seed=7)
    with pytest.raises(TrainingInterrupted):
        train(recipe, store, tmp_path / "cut", stop_after=2, progress=False, dp_seed=7)
    assert (tmp_path / "cut" / "state" / "latest.json").is_file()
    part = json.loads((tmp_path / "cut" / "ledger.json").read_text())
    assert part["steps"] == 2 and part["epsilon"] < full["privacy"]["epsilon"]
    resumed = train(recipe, store, tmp_path / "cut", progress=False)  # continues the saved stream
    assert _same_weights(tmp_path / "full", tmp_path / "cut")  # bit-identical weights
    assert resumed["privacy"]["epsilon"] == full["privacy"]["epsilon"]

    led = json.loads((tmp_path / "cut" / "ledger.json").read_text())
    assert led == json.loads((tmp_path / "full" / "ledger.json").read_text())
    assert led["enabled"] and led["unit"] == "patient" and led["n_units"] == 5
    assert led["steps"] == 4 and led["sample_rate"] == pytest.approx(2 / 5)
    assert led["delta"] == pytest.approx(1 / 50)
    assert abs(led["epsilon"] - 8.0) < 0.1
    acc = create_accountant("rdp")  # independent recomputation: label shares' Gaussian, then sigma, q, steps
    acc.history = [tuple(led["label_shares"]["history"][0]), (led["sigma"], led["sample_rate"], led["steps"])]
    assert acc.get_epsilon(delta=led["delta"]) == pytest.approx(led["epsilon"], rel=1e-9)
    assert led["noise_multiplicity"] == 2 and led["tiles_per_patient"] == 2 and led["max_grad_norm"] == 1.0
    assert any("5 training patients" in m for m in led["warnings"])
    assert any("drawn with replacement" in m for m in led["warnings"])


def test_nonprivate_resume_is_exact(tmp_path, store):
    recipe = _recipe(tmp_path, train={"steps": 3, "batch_size": 3})
    train(recipe, store, tmp_path / "full", progress=False)
    with pytest.raises(TrainingInterrupted):
        train(recipe, store, tmp_path / "cut", stop_after=1, progress=False)
    train(recipe, store, tmp_path / "cut", progress=False)
    assert _same_weights(tmp_path / "full", tmp_path / "cut")


def test_tile_dp_uses_opacus_make_private(tmp_path, store):
    recipe = _recipe(tmp_path, train={"steps": 3, "batch_size": 4},
                     privacy={"enabled": True, "unit": "tile", "target_epsilon": 8.0, "accountant": "rdp",
                              "noise_multiplicity": 2})
    s = train(recipe, store, tmp_path / "tile", progress=False)
    led = json.loads((tmp_path / "tile" / "ledger.json").read_text())
    n = s["n_train_tiles"]
    assert led["unit"] == "tile" and led["n_units"] == n
    assert led["sample_rate"] == pytest.approx(1 / -(-n // 4))  # Opacus: 1 / number of batches
    assert abs(led["epsilon"] - 8.0) < 0.1 and led["steps"] == 3
    assert any("privacy unit is the tile" in m for m in led["warnings"])


def test_refuses_when_the_batch_covers_every_patient(tmp_path, store):
    recipe = _recipe(tmp_path, train={"batch_size": 5}, privacy=PATIENT_DP)
    with pytest.raises(StageError, match="train.batch_size"):
        train(recipe, store, tmp_path / "x", progress=False)
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_secure_mode_without_csprng_is_a_clear_error(tmp_path, store):
    pytest.importorskip("opacus")
    try:
        import torchcsprng  # noqa: F401
        pytest.skip("torchcsprng is installed")
    except ImportError:
        pass
    recipe = _recipe(tmp_path, privacy={**PATIENT_DP, "secure_mode": True})
    with pytest.raises(StageError, match="torchcsprng"):
        train(recipe, store, tmp_path / "s", progress=False)
