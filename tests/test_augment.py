"""train.augment (dihedral) and train.level_balance: the transforms, their consistency across a
tile's conditions, the DP paths, and the recipe keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from safetensors.torch import load_file

from synthpath.models import Cond, build_model
from synthpath.recipe import RecipeError, parse_recipe
from synthpath.tiles.dataset import TileDataset
from synthpath.tiles.toystore import make_toy_store
from synthpath.train.augment import N_DIHEDRAL, Augment, apply_dihedral, dihedral
from synthpath.train.batches import FixedSizeSampler, RowMaker, level_balanced_weights
from synthpath.train.trainer import TrainingInterrupted, train


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment") / "store"
    make_toy_store(root, n_patients=6, tile_px=16, n_levels=2, coarse_tiles=2, holdout_patients=1)
    return root


def _recipe(tmp_path, train=None, privacy=None):
    data = {
        "name": "aug", "output_dir": str(tmp_path), "seed": 0,
        "data": {"slide_dir": str(tmp_path), "classes": ["stroma", "tumour"]},
        "ingest": {"tiling": {"levels": [2.0, 1.0], "tile_px": 16}},
        "model": {"size": "tiny"},
        "train": {"steps": 2, "batch_size": 4, "physical_batch_size": 8, "lr": 1e-3, "ema_decay": 0.9,
                  "sample_every": 1000, "checkpoint_every": 1000, "log_every": 1, "device": "cpu",
                  "augment": "dihedral", **(train or {})},
        "privacy": {"enabled": False, **(privacy or {})},
    }
    return parse_recipe(data, check_files=False)


def _asymmetric(px: int = 8) -> torch.Tensor:
    """A [1,3,px,px] tile with no symmetry of the square: distinct values everywhere."""
    return torch.arange(3 * px * px, dtype=torch.float32).reshape(1, 3, px, px) / (3 * px * px)


def test_the_eight_transforms_are_the_dihedral_group():
    x = _asymmetric()
    a = x[0, 0].numpy()
    ref = [np.rot90(a, k) for k in range(4)] + [np.fliplr(np.rot90(a, k)) for k in range(4)]
    outs = [dihedral(x, k) for k in range(N_DIHEDRAL)]
    for k in range(N_DIHEDRAL):
        assert np.array_equal(outs[k][0, 0].numpy(), ref[k]), k
    assert torch.equal(outs[0], x)  # 0 is the identity
    assert len({o.numpy().tobytes() for o in outs}) == 8  # all distinct on an asymmetric tile
    with pytest.raises(ValueError):
        dihedral(x, 8)


@pytest.mark.parametrize("k", range(N_DIHEDRAL))
def test_tile_parent_known_and_mask_move_together(k):
    px = 8
    x0 = _asymmetric(px)
    parent = torch.zeros(1, 3, px, px)
    mask = torch.zeros(1, 1, px, px)
    # one marked pixel at (row 1, col 2) in the tile, its parent crop and the known mask
    x0[0, :, 1, 2] = 5.0
    parent[0, :, 1, 2] = 1.0
    mask[0, 0, 1, 2] = 1.0
    mask[0, 0, 0, :] = 1.0  # and a known top strip: an asymmetric mask
    cond = Cond(log_mpp=torch.zeros(1), label=torch.zeros(1, dtype=torch.long), parent=parent,
                has_parent=torch.ones(1, dtype=torch.bool), known=x0.clone(), mask=mask, num_classes=2)
    x1, c1 = apply_dihedral(x0, cond, torch.tensor([k]))
    assert torch.equal(x1, dihedral(x0, k))
    assert torch.equal(c1.parent, dihedral(parent, k))
    assert torch.equal(c1.mask, dihedral(mask, k)) and torch.equal(c1.known, dihedral(x0, k))
    # the marker lands on the same pixel in all four
    where = lambda t: tuple(torch.nonzero(t[0, 0] == t[0, 0].max())[0].tolist())  # noqa: E731
    spot = where(x1)
    assert where(c1.parent) == spot and c1.mask[0, 0][spot] == 1 and c1.known[0, 0][spot] == 5.0
    assert torch.equal(c1.known * c1.mask, x1 * c1.mask)  # the known pixels still are the tile's pixels
    assert c1.label.tolist() == [0] and bool(c1.has_parent[0]) and torch.equal(c1.log_mpp, cond.log_mpp)
    assert torch.equal(cond.parent, parent) and torch.equal(cond.mask, mask)  # inputs left alone


def test_rowmaker_augments_each_tile_consistently(store):
    ds = TileDataset(store, "train")
    fine = [i for i in range(len(ds)) if int(ds._level[i]) == 1][:6]  # tiles with a parent crop
    mk = lambda aug: RowMaker(ds, unit="tile", noise_multiplicity=2, tiles_per_patient=1, num_classes=2,  # noqa: E731
                              device=torch.device("cpu"), generator=torch.Generator().manual_seed(3), augment=aug)
    plain, aug = mk("none")(fine), mk("dihedral")(fine)
    assert torch.equal(aug.unit, plain.unit) and torch.equal(aug.weight, plain.weight)
    ks = []
    for r in range(0, plain.x0.shape[0], 2):  # rows come in pairs (noise multiplicity 2): same tile, same transform
        assert torch.equal(aug.x0[r], aug.x0[r + 1]) and torch.equal(aug.cond.parent[r], aug.cond.parent[r + 1])
        match = [k for k in range(N_DIHEDRAL) if torch.equal(aug.x0[r:r + 1], dihedral(plain.x0[r:r + 1], k))
                 and torch.equal(aug.cond.parent[r:r + 1], dihedral(plain.cond.parent[r:r + 1], k))]
        assert match, f"row {r}: tile and parent crop were not transformed alike"
        ks.append(match[0])
        assert torch.equal(aug.cond.known[r], aug.x0[r])  # known pixels = the augmented tile
    assert torch.equal(torch.tensor(ks), Augment("dihedral", torch.Generator().manual_seed(3)).draw(len(fine)))
    assert len(set(ks)) > 1  # not one transform for the whole batch


@pytest.mark.parametrize("privacy", [
    {"unit": "patient", "clipping": "hooks"},
    {"unit": "tile", "clipping": "hooks"},
    {"unit": "patient", "clipping": "ghost"},
], ids=["patient-hooks", "tile-hooks", "patient-ghost"])
def test_dp_training_with_augmentation(tmp_path, store, privacy):
    assert ModuleValidator.validate(build_model("tiny", 2, 16), strict=True) == []
    dp = {"enabled": True, "target_epsilon": 8.0, "accountant": "rdp", "noise_multiplicity": 2,
          "tiles_per_patient": 2, "max_grad_norm": 1.0, **privacy}
    batch = 2 if privacy["unit"] == "patient" else 4
    out = {}
    for aug in ("dihedral", "none"):
        recipe = _recipe(tmp_path, train={"batch_size": batch, "augment": aug}, privacy=dp)
        train(recipe, store, tmp_path / aug, progress=False, dp_seed=5)
        out[aug] = json.loads((tmp_path / aug / "ledger.json").read_text())
    led = out["dihedral"]
    assert led["enabled"] and led["unit"] == privacy["unit"] and led["steps"] == 2
    assert abs(led["epsilon"] - 8.0) < 0.1
    for key in ("epsilon", "sigma", "sample_rate", "delta", "n_units"):  # the accounting does not change
        assert led[key] == out["none"][key], key
    a, b = (load_file(str(tmp_path / k / "model_raw.safetensors")) for k in ("dihedral", "none"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the augmented rows did reach the gradients
    assert all(torch.isfinite(v).all() for v in a.values())


def test_augmented_nonprivate_resume_is_exact(tmp_path, store):
    recipe = _recipe(tmp_path, train={"steps": 3, "batch_size": 3, "level_balance": True})
    train(recipe, store, tmp_path / "full", progress=False)
    with pytest.raises(TrainingInterrupted):
        train(recipe, store, tmp_path / "cut", stop_after=1, progress=False)
    train(recipe, store, tmp_path / "cut", progress=False)
    for name in ("model.safetensors", "model_raw.safetensors"):
        ta, tb = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name


def test_level_balance_draws_every_level_equally_often():
    levels = [0] * 3 + [1] * 12 + [2] * 48
    w = level_balanced_weights(levels)
    assert torch.allclose(torch.stack([w[torch.tensor(levels) == lv].sum() for lv in range(3)]),
                          torch.ones(3, dtype=torch.float64))
    sampler = FixedSizeSampler(len(levels), 6, torch.Generator().manual_seed(0), w)
    counts = np.zeros(3)
    for _ in range(400):
        draw = sampler.draw()
        assert len(set(draw)) == 6  # distinct tiles within a step
        counts += np.bincount([levels[i] for i in draw], minlength=3)
    share = counts / counts.sum()
    assert share[0] > 0.2 and abs(share[2] - 1 / 3) < 0.1  # uniform would give 5% / 76%
    with pytest.raises(ValueError):
        FixedSizeSampler(3, 2, torch.Generator(), torch.tensor([1.0, 0.0, 1.0]))


def test_recipe_keys_are_validated(tmp_path):
    assert _recipe(tmp_path).train.augment == "dihedral"
    assert _recipe(tmp_path, train={"augment": "none"}).train.augment == "none"
    base = _recipe(tmp_path, train={"augment": "none"}).model_dump(mode="json")
    base["train"].pop("augment")
    assert parse_recipe(base, check_files=False).train.augment == "none"  # off by default
    assert parse_recipe(base, check_files=False).train.level_balance is False
    with pytest.raises(RecipeError, match="augment"):
        _recipe(tmp_path, train={"augment": "rot90"})
    with pytest.raises(RecipeError, match="augmentation"):  # extra="forbid": a misspelt key is refused
        _recipe(tmp_path, train={"augmentation": "dihedral"})
    with pytest.raises(RecipeError, match="level_balance"):
        _recipe(tmp_path, train={"level_balance": True}, privacy={"enabled": True, "unit": "patient"})


def test_resume_settings_leave_the_new_keys_out_at_their_defaults(tmp_path):
    from synthpath.train.guard import settings_of

    off = settings_of(_recipe(tmp_path, train={"augment": "none"}))["train"]
    assert "augment" not in off and "level_balance" not in off  # a state saved before these keys still matches
    on = settings_of(_recipe(tmp_path, train={"level_balance": True}))["train"]
    assert on["augment"] == "dihedral" and on["level_balance"] is True
