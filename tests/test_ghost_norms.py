"""Ghost clipping (synthpath.train.ghost) against Opacus' per-sample gradients (hooks mode).

Every layer type of the UNet, the whole tiny UNet, per row (tile level) and per unit of
several rows (patient level, where the cross terms between a unit's rows matter)."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from synthpath.models import Cond, build_model
from synthpath.models.diffusion import diffusion_loss
from synthpath.train.ghost import GhostClipper, norm_sample, register_opacus_norm_samplers

warnings.filterwarnings("ignore", message="Full backward hook")


def _opacus_unit_grads(model, loss_rows_fn, unit, n_units):
    """Per-unit gradients from Opacus hooks: per-row grad_sample folded by unit."""
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    loss = loss_rows_fn(gsm)
    loss.sum().backward()
    out = {}
    for p in model.parameters():
        gs = p.grad_sample
        out[p] = torch.zeros((n_units, *p.shape)).index_add_(0, unit, gs)
        p.grad_sample = None
        p.grad = None
    gsm._close()
    return out


def _check(model, loss_rows_fn, unit, n_units, C=None):
    ref = _opacus_unit_grads(model, loss_rows_fn, unit, n_units)
    ref_norm = torch.stack([g.reshape(n_units, -1).pow(2).sum(1) for g in ref.values()]).sum(0).sqrt()
    C = C if C is not None else float((ref_norm.min() * ref_norm.max()).sqrt())  # some units clipped, some not
    clipper = GhostClipper(model, C)
    with clipper.capture():
        loss = loss_rows_fn(model)
    norms = clipper.clip_and_accumulate(loss, unit, n_units)
    clipper.remove()
    assert torch.allclose(norms, ref_norm, rtol=1e-4, atol=0), (norms, ref_norm)
    factor = (C / (ref_norm + 1e-6)).clamp(max=1.0)
    assert n_units < 2 or ((factor < 1).any() and (factor == 1).any())
    for p, g in ref.items():
        want = torch.einsum("u,u...->...", factor, g)
        got = p.grad if p.grad is not None else torch.zeros_like(want)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max() + 1)), p.shape
        p.grad = None


@pytest.mark.parametrize("conv", [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=2, dilation=2, groups=2),
    dict(in_channels=6, out_channels=3, kernel_size=1),
])
@pytest.mark.parametrize("rows_per_unit", [1, 3])
def test_conv2d_norms_and_clipped_sum_match_opacus(conv, rows_per_unit):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Conv2d(**conv), nn.SiLU(), nn.Conv2d(conv["out_channels"], 2, 3, padding=1))
    x = torch.randn(6, conv["in_channels"], 9, 9)
    unit = torch.arange(6) // rows_per_unit
    _check(layer, lambda m: m(x).pow(2).sum((1, 2, 3)), unit, int(unit.max()) + 1)


@pytest.mark.parametrize("rows_per_unit", [1, 2])
def test_linear_groupnorm_embedding_match_opacus(rows_per_unit):
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 8)
            self.lin = nn.Linear(8, 8)
            self.tok = nn.Linear(8, 8)  # 3-D input: tokens
            self.gn = nn.GroupNorm(2, 8)

        def forward(self, idx, x):
            e = self.lin(self.emb(idx))                 # [B, 8]
            h = self.gn(x) * (1 + e[:, :, None, None])  # [B, 8, 4, 4]
            t = self.tok(h.flatten(2).transpose(1, 2))  # [B, 16, 8]
            return t.pow(2).sum((1, 2))

    net = Net()
    idx = torch.tensor([0, 3, 3, 1, 3, 0])  # repeated indices inside one unit: cross terms count
    x = torch.randn(6, 8, 4, 4)
    unit = torch.arange(6) // rows_per_unit
    _check(net, lambda m: m(idx, x), unit, int(unit.max()) + 1)


@pytest.mark.parametrize("rows_per_unit", [1, 4])
def test_whole_tiny_unet_matches_opacus(rows_per_unit):
    torch.manual_seed(2)
    model = build_model("tiny", 2, 16).train()
    with torch.no_grad():  # the zero-initialised output convs would hide the rest of the network
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = 8
    x0 = torch.rand(b, 3, 16, 16) * 2 - 1
    cond = Cond.unconditional(b, 16, 2, 0.0, label=torch.tensor([0, 1, 2, 1, 0, 0, 1, 2]))
    cond = cond.replace(parent=torch.rand(b, 3, 16, 16), has_parent=torch.rand(b) < 0.5)
    unit = torch.arange(b) // rows_per_unit

    def loss(m):
        g = torch.Generator().manual_seed(5)
        return diffusion_loss(m, x0, cond, generator=g) / rows_per_unit

    _check(model, loss, unit, int(unit.max()) + 1)


def test_opacus_norm_sampler_registration_covers_conv():
    """The Conv2d/GroupNorm norm sampler plugs into Opacus' fast-gradient-clipping module."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    register_opacus_norm_samplers()
    assert GradSampleModuleFastGradientClipping.NORM_SAMPLERS[nn.Conv2d] is norm_sample
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(64, 2))
    x = torch.randn(5, 3, 8, 8)
    ref = _opacus_unit_grads(net, lambda m: m(x).pow(2).sum(1), torch.arange(5), 5)
    ref_norm = torch.stack([g.reshape(5, -1).pow(2).sum(1) for g in ref.values()]).sum(0).sqrt()
    gsm = GradSampleModuleFastGradientClipping(net, batch_first=True, loss_reduction="sum", max_grad_norm=1.0,
                                               use_ghost_clipping=True)
    gsm.train()
    out = gsm(x).pow(2).sum(1)
    out.sum().backward(retain_graph=True)
    norms = gsm.get_norm_sample()
    assert torch.allclose(norms, ref_norm, rtol=1e-4)


def test_unsupported_layer_is_named():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"1 \(BatchNorm2d\)"):
        GhostClipper(net, 1.0)


# --------------------------------------------------------------------------- in the trainer
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from synthpath.tiles.toystore import make_toy_store

    root = tmp_path_factory.mktemp("ghost") / "store"
    make_toy_store(root, n_patients=6, tile_px=16, n_levels=2, coarse_tiles=2, holdout_patients=1)
    return root


def _train(tmp_path, store, clipping, unit):
    from safetensors.torch import load_file

    from synthpath.recipe import parse_recipe
    from synthpath.train.trainer import train

    data = {
        "name": "t", "output_dir": str(tmp_path), "seed": 0,
        "data": {"slide_dir": str(tmp_path), "classes": ["stroma", "tumour"]},
        "ingest": {"tiling": {"levels": [2.0, 1.0], "tile_px": 16}},
        "model": {"size": "tiny"},
        "train": {"steps": 3, "batch_size": 3, "physical_batch_size": 4, "lr": 1e-3, "ema_decay": 0.9,
                  "sample_every": 1000, "checkpoint_every": 1000, "device": "cpu"},
        "privacy": {"enabled": True, "unit": unit, "target_epsilon": 8.0, "accountant": "rdp", "delta": 1e-3,
                    "noise_multiplicity": 2, "tiles_per_patient": 2, "max_grad_norm": 0.05, "clipping": clipping},
    }
    out = tmp_path / clipping
    summary = train(parse_recipe(data, check_files=False), store, out, progress=False, dp_seed=7)
    return summary, load_file(str(out / "model_raw.safetensors")), (out / "ledger.json").read_text()


@pytest.mark.parametrize("unit", ["tile", "patient"])
def test_ghost_training_equals_opacus_hooks_training(tmp_path, store, unit):
    """Same seeds, same units, same noise draws: ghost clipping and Opacus' hooks give the same
    weights and the same ledger (the clip bound is small, so every unit is clipped)."""
    s_h, w_h, led_h = _train(tmp_path, store, "hooks", unit)
    s_g, w_g, led_g = _train(tmp_path, store, "ghost", unit)
    assert s_h["privacy"] == s_g["privacy"]
    assert led_h == led_g
    for k in w_h:
        assert torch.allclose(w_h[k], w_g[k], rtol=1e-4, atol=1e-6), k
