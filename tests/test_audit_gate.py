"""The audit's "done when" tests on the real demo slide, and the release gate in the pipeline.

Tiles are the real demo slide's finest-level tiles, area-downsampled to 16 px (a 2 µm/px
single-level store) so a diffusion model can be trained on a shared 2-core CPU in seconds:
- a model deliberately overtrained WITHOUT DP on a handful of tiles must be flagged
  (near-copies found, membership-inference AUC well above 0.5), and a failed audit stops
  ``build`` before generate/export, with the report copied to ``audit_failed/``;
- a model trained WITH DP-SGD (Opacus) at small ε must pass.

The models are MODEL's ``SynthUNet`` at a custom, very small width trained with MODEL's
``diffusion_loss`` in a minimal loop (TRAIN's trainer only builds the named sizes, which
are too slow to overtrain on this CPU within a test).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synthpath.models.conditioning import Cond
from synthpath.models.diffusion import diffusion_loss
from synthpath.models.unet import SynthUNet
from synthpath.pipeline import ReleaseBlocked, StageContext, build, fingerprint, get_stage
from synthpath.recipe import parse_recipe
from synthpath.tiles.store import TileStore, write_tile_store

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_recipe_dict  # noqa: E402

PX = 16
MPP = 2.0


def _small_store(root: Path, demo_store: Path, n_train: int, n_holdout: int, seed: int = 0) -> TileStore:
    """Real demo tiles (finest level) downsampled to 16 px; the split follows the patients."""
    src = TileStore(demo_store)
    idx = src.index.to_pandas()
    fine = idx[idx.level == len(src.levels) - 1]
    rng = np.random.default_rng(seed)
    picks = []
    for split, n in (("train", n_train), ("holdout", n_holdout)):
        rows = fine[fine.split == split]
        picks.append(rows.iloc[np.sort(rng.choice(len(rows), size=min(n, len(rows)), replace=False))])
    records = []
    for rows in picks:
        imgs = src.read_images(rows.tile_id.tolist())
        for (_, r), img in zip(rows.iterrows(), imgs):
            small = np.asarray(Image.fromarray(img).resize((PX, PX), Image.BOX))
            records.append({"tile_id": f"{r.slide_id}/L0/{r.x}_{r.y}", "slide_id": r.slide_id,
                            "patient_id": r.patient_id, "level": 0, "mpp": MPP, "x": int(r.x), "y": int(r.y),
                            "size0": int(r.size0), "parent_id": None, "label": int(r.label),
                            "label_name": r.label_name, "split": r.split, "tissue_fraction": float(r.tissue_fraction),
                            "image": small})
    return write_tile_store(root, records, levels=[MPP], tile_px=PX, classes=list(src.classes))


def _tiles(store: TileStore, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    idx = store.index.to_pandas()
    rows = idx[idx.split == split]
    x = torch.from_numpy(store.read_images(rows.tile_id.tolist())).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.as_tensor(rows.label.to_numpy(), dtype=torch.long)


def _model() -> SynthUNet:
    torch.manual_seed(0)
    return SynthUNet(num_classes=2, tile_px=PX, channels=8, mults=(1, 2), attn_max_res=0)


def _cond(labels: torch.Tensor) -> Cond:
    return Cond.unconditional(len(labels), PX, 2, float(np.log(MPP)), label=labels)


def overtrain(store: TileStore, steps: int = 900) -> SynthUNet:
    """Non-private, full-batch, high learning rate: memorises its few training tiles."""
    x, y = _tiles(store, "train")
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=4e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = diffusion_loss(model, x, _cond(y), generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_dp(store: TileStore, epsilon: float = 1.0, epochs: int = 4) -> SynthUNet:
    """Tile-level DP-SGD with Opacus at a small ε (Poisson sampling, per-sample clipping)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _tiles(store, "train")
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    engine = PrivacyEngine(accountant="rdp")
    gsm, dp_opt, dp_loader = engine.make_private_with_epsilon(
        module=model, optimizer=opt, data_loader=loader, target_epsilon=epsilon, target_delta=1e-3, epochs=epochs,
        max_grad_norm=1.0, noise_generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        for xb, yb in dp_loader:
            if len(xb) == 0:
                continue
            loss = diffusion_loss(gsm, xb, _cond(yb), generator=g).mean()
            dp_opt.zero_grad()
            loss.backward()
            dp_opt.step()
    assert engine.get_epsilon(1e-3) <= epsilon + 1e-6
    return model.eval()


def _recipe(out: Path, **audit):
    raw = tiny_recipe_dict(out)
    raw["ingest"]["tiling"].update({"levels": [MPP], "tile_px": PX})
    raw["sampler"] = {"name": "ddim", "steps": 12, "guidance_scale": 1.0}
    raw["audit"] = {"feature_spaces": ["pixel", "learned"], "encoder_steps": 40, "n_synthetic": 16,
                    "k_neighbours": 3, "holdout_quantile": 0.02, "max_copy_fraction": 0.05,
                    "max_closer_to_train": 0.75, "max_mia_auc": 0.7, "mia_max_tiles": 64, "device": "cpu", **audit}
    return parse_recipe(raw, source="<test_audit_gate>")


def _finish_stage(recipe, name: str) -> None:
    """Mark an artifact folder written by this test as a finished pipeline stage."""
    fp, _ = fingerprint(recipe, get_stage(name))
    (recipe.output_dir / name / "manifest.json").write_text(json.dumps(
        {"stage": name, "fingerprint": fp, "finished_at": "test", "summary": {}}))


@pytest.mark.slow
def test_overtrained_model_is_flagged_and_build_stops_before_export(demo_store, tmp_path):
    from synthpath.models.checkpoint import save_checkpoint

    recipe = _recipe(tmp_path / "run")
    out = recipe.output_dir
    store = _small_store(out / "ingest", demo_store, n_train=4, n_holdout=48)
    _finish_stage(recipe, "ingest")
    model = overtrain(store)
    save_checkpoint(out / "train", model, model, {"test": "overtrained without DP"})
    (out / "train" / "ledger.json").write_text(json.dumps({"enabled": False}))
    _finish_stage(recipe, "train")

    with pytest.raises(ReleaseBlocked) as err:
        build(recipe)
    msg = str(err.value)
    assert "copy_fraction" in msg and "audit_failed" in msg
    assert not (out / "audit").exists() and not (out / "generate").exists() and not (out / "export").exists()
    rep = json.loads((out / "audit_failed" / "report.json").read_text())
    assert rep["passed"] is False
    cf = rep["checks"]["copy_fraction"]
    # memorised tiles come back as near-copies, significantly more often than the rule flags real unseen tiles
    assert cf["copies"] >= max(2, cf["critical_copies"]) and cf["p_value"] < cf["alpha"]
    assert rep["checks"]["mia_auc"]["value"] >= 0.9
    for f in ("report.md", "contact_sheet.png", "roc.png"):
        assert (out / "audit_failed" / f).stat().st_size > 0

    # --allow-failed-audit: the stage finishes and the report says it was allowed
    build(recipe, until="audit", options={"allow_failed_audit": True})
    rep = json.loads((out / "audit" / "report.json").read_text())
    assert rep["passed"] is False and rep["allowed_failed"] is True
    assert (out / "audit" / "report.md").read_text().splitlines()[2].startswith("**The audit FAILED")
    manifest = json.loads((out / "audit" / "manifest.json").read_text())
    assert manifest["summary"]["allowed_failed"] is True


@pytest.mark.slow
def test_dp_model_passes(demo_store, tmp_path):
    from synthpath.audit.report import run

    recipe = _recipe(tmp_path / "run")
    out = recipe.output_dir
    store = _small_store(out / "ingest", demo_store, n_train=48, n_holdout=48)
    _finish_stage(recipe, "ingest")  # the audit binds its verdict to the tile store's manifest
    model = train_dp(store)
    from synthpath.models.checkpoint import save_checkpoint

    save_checkpoint(out / "train", model, model, {"test": "DP-SGD, epsilon 1"})
    work = out / "audit.partial"
    work.mkdir(parents=True)
    summary = run(StageContext(recipe=recipe, name="audit", workdir=work,
                               inputs={"ingest": out / "ingest", "train": out / "train"}))
    rep = json.loads((work / "report.json").read_text())
    assert summary["passed"] is True, rep["checks"]
    assert rep["checks"]["copy_fraction"]["copies"] == 0
    assert rep["checks"]["mia_auc"]["value"] < 0.7
