"""Tests for synthpath.models: UNet shapes and conditions, Opacus compatibility, schedule,
samplers (seeded and batch-independent), checkpoints without pickle, and the cost table."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from synthpath.models import (
    SAMPLERS,
    Cond,
    SynthUNet,
    build_model,
    denoise,
    diffusion_loss,
    drop_conditions,
    initial_noise,
    load_model,
    model_cost,
    save_checkpoint,
    zoom_start,
)
from synthpath.models.diffusion import alpha_sigma, border_masks, logsnr

PX = 32
NC = 3



@pytest.fixture(scope="module")
def model() -> SynthUNet:
    torch.manual_seed(0)
    m = build_model("tiny", NC, PX)
    # Untrained blocks start as the identity; perturb the zero-initialised layers so the
    # conditions visibly reach the output in these tests.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return m.eval()


def _cond(b: int, *, label: bool, parent: bool, known: bool, seed: int = 0) -> Cond:
    g = torch.Generator().manual_seed(seed)
    c = Cond.unconditional(b, PX, NC, 0.3, label=torch.arange(b) % NC if label else None)
    img = torch.rand(b, 3, PX, PX, generator=g) * 2 - 1
    if parent:
        c = c.replace(parent=img.flip(-1), has_parent=torch.ones(b, dtype=torch.bool))
    if known:
        mask = border_masks(b, PX, g)
        c = c.replace(known=img * mask, mask=mask)
    return c


@pytest.mark.parametrize("label,parent,known", list(itertools.product([False, True], repeat=3)))
def test_forward_shapes_every_condition(model, label, parent, known):
    c = _cond(2, label=label, parent=parent, known=known)
    x = torch.randn(2, 3, PX, PX)
    with torch.no_grad():
        out = model(x, torch.tensor([0.2, 0.9]), c)
    assert out.shape == (2, 3, PX, PX)
    assert torch.isfinite(out).all()


def test_conditions_change_the_output(model):
    x = torch.randn(1, 3, PX, PX)
    t = torch.tensor([0.5])
    base = _cond(1, label=False, parent=False, known=False)
    with torch.no_grad():
        ref = model(x, t, base)
        outs = {
            "label": model(x, t, base.replace(label=torch.tensor([1]))),
            "parent": model(x, t, _cond(1, label=False, parent=True, known=False)),
            "known": model(x, t, _cond(1, label=False, parent=False, known=True)),
            "level": model(x, t, base.replace(log_mpp=torch.tensor([1.5]))),
            "time": model(x, torch.tensor([0.1]), base),
        }
    for name, out in outs.items():
        assert (out - ref).abs().max() > 1e-5, f"condition {name} does not reach the output"


def test_other_tile_sizes_and_bad_size():
    m = build_model("tiny", 2, 64)
    c = Cond.unconditional(1, 64, 2)
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 64), torch.tensor([0.5]), c).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="multiple"):
        build_model("tiny", 2, 30)
    with pytest.raises(ValueError, match="unknown model size"):
        build_model("huge", 2, 64)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_opacus_strict_validation_and_per_sample_grads():
    m = build_model("tiny", NC, PX).train()
    assert ModuleValidator.validate(m, strict=True) == []
    gsm = GradSampleModule(m)  # raises on unsupported layers with parameters
    x0 = torch.rand(3, 3, PX, PX) * 2 - 1
    g = torch.Generator().manual_seed(1)
    c = drop_conditions(_cond(3, label=True, parent=True, known=False).replace(known=x0), 0.3, 0.3, 0.5, g)
    loss = diffusion_loss(gsm, x0, c, generator=g)
    assert loss.shape == (3,)
    loss.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 3, name


def test_config_roundtrip():
    m = build_model("tiny", NC, PX)
    cfg = json.loads(json.dumps(m.config))
    m2 = SynthUNet.from_config(cfg)
    assert m2.config == m.config
    assert [p.shape for p in m2.parameters()] == [p.shape for p in m.parameters()]


def test_schedule_is_monotone_and_variance_preserving():
    t = torch.linspace(0, 1, 11)
    lam = logsnr(t)
    assert torch.all(lam[1:] < lam[:-1])
    a, s = alpha_sigma(t)
    assert torch.allclose(a**2 + s**2, torch.ones_like(a), atol=1e-6)
    assert a[0] > 0.999 and a[-1] < 1e-3


def test_loss_is_reproducible_and_per_sample(model):
    x0 = torch.rand(4, 3, PX, PX) * 2 - 1
    c = _cond(4, label=True, parent=False, known=False)
    l1 = diffusion_loss(model, x0, c, generator=torch.Generator().manual_seed(3))
    l2 = diffusion_loss(model, x0, c, generator=torch.Generator().manual_seed(3))
    assert l1.shape == (4,) and torch.equal(l1, l2)
    single = diffusion_loss(model, x0[1:2], c.index([1]), t=torch.tensor([0.4]), noise=torch.ones(1, 3, PX, PX))
    batch = diffusion_loss(model, x0, c, t=torch.full((4,), 0.4), noise=torch.ones(4, 3, PX, PX))
    assert torch.allclose(single[0], batch[1], atol=1e-5)


def test_drop_conditions_probabilities():
    b = 400
    c = Cond.unconditional(b, PX, NC, 0.0, label=1)
    c = c.replace(parent=torch.ones(b, 3, PX, PX), has_parent=torch.ones(b, dtype=torch.bool), known=torch.ones(b, 3, PX, PX))
    d = drop_conditions(c, 0.25, 0.5, 0.5, torch.Generator().manual_seed(0))
    null = (d.label == NC).float().mean().item()
    no_parent = (~d.has_parent).float().mean().item()
    with_known = (d.mask.flatten(1).amax(1) > 0).float().mean().item()
    assert 0.17 < null < 0.33 and 0.4 < no_parent < 0.6 and 0.4 < with_known < 0.6
    assert torch.all(d.parent[~d.has_parent] == 0)
    assert torch.equal(d.known, d.mask.expand_as(d.known))  # known zeroed outside the mask
    m = d.mask[d.mask.flatten(1).amax(1) > 0]
    share = m.mean((1, 2, 3))
    assert share.min() >= (PX // 8) / PX - 1e-6 and share.max() < 1.0
    # the mask is made of border strips: a strip's pixels reach an edge of the tile
    rows_any, cols_any = m.amax(-1), m.amax(-2)
    assert torch.all((rows_any[..., 0] + rows_any[..., -1] + cols_any[..., 0] + cols_any[..., -1]) > 0)
    assert torch.all(drop_conditions(c, 0, 0, 0).label == 1)


def test_guidance_uses_null_label(model):
    x = torch.randn(2, 3, PX, PX)
    c = _cond(2, label=True, parent=False, known=False)
    with torch.no_grad():
        plain = denoise(model, x, 0.5, c, 1.0, clip=False)
        guided = denoise(model, x, 0.5, c, 3.0, clip=False)
        null = denoise(model, x, 0.5, c.with_null_label(), 3.0, clip=False)
        null1 = denoise(model, x, 0.5, c.with_null_label(), 1.0, clip=False)
    assert not torch.allclose(plain, guided)
    assert torch.allclose(null, null1)  # nothing to guide when the label is already null
    # guidance extrapolates linearly: guided = null + 3 (cond - null)
    assert torch.allclose(guided, null1 + 3.0 * (plain - null1), atol=1e-4)


def test_initial_noise_per_sample_seeds():
    a = initial_noise((3, 3, 8, 8), [5, 6, 7])
    b = initial_noise((2, 3, 8, 8), [7, 5])
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="one seed per sample"):
        initial_noise((2, 3, 8, 8), [1])


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_seeded_and_batch_independent(model, name):
    fn = SAMPLERS[name]
    c = _cond(3, label=True, parent=True, known=True)
    seeds = [11, 12, 13]
    x = initial_noise((3, 3, PX, PX), seeds)
    a = fn(model, x, c, steps=3, guidance=1.5)
    b = fn(model, initial_noise((3, 3, PX, PX), seeds), c, steps=3, guidance=1.5)
    assert a.shape == (3, 3, PX, PX) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    # sample 1 alone, and in a batch with different companions, gives the same result
    alone = fn(model, initial_noise((1, 3, PX, PX), [12]), c.index([1]), steps=3, guidance=1.5)
    other = Cond.cat([_cond(1, label=False, parent=False, known=False, seed=9), c.index([1])])
    mixed = fn(model, initial_noise((2, 3, PX, PX), [99, 12]), other, steps=3, guidance=1.5)
    assert torch.allclose(alone[0], a[1], atol=1e-4)
    assert torch.allclose(mixed[1], a[1], atol=1e-4)
    # known pixels come out exactly
    m = c.mask.bool().expand_as(a)
    assert torch.allclose(a[m], c.known[m].clamp(-1, 1), atol=1e-6)


def test_zoom_start_and_partial_sampling(model):
    parent = torch.rand(2, 3, PX, PX) * 2 - 1
    z = zoom_start(parent, 0.3, [1, 2], model=model)
    a, s = alpha_sigma(torch.tensor(0.3), model.config["logsnr_shift"])
    eps = initial_noise(parent.shape, [1, 2])
    assert torch.allclose(z, a * parent + s * eps, atol=1e-6)
    c = _cond(2, label=True, parent=True, known=False).replace(parent=parent)
    out = SAMPLERS["dpmpp_2m"](model, z, c, steps=2, t_start=0.3)
    assert out.shape == parent.shape
    # starting late keeps the sample close to the (lightly) noised parent
    assert (out - parent).abs().mean() < (torch.rand_like(parent) * 2 - 1 - parent).abs().mean()


def test_checkpoint_roundtrip_without_pickle(tmp_path, monkeypatch, model):
    ema = build_model("tiny", NC, PX)
    save_checkpoint(tmp_path / "ck", model, ema, {"tile_px": PX, "classes": ["a", "b", "c"], "step": 7})
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["config.json", "model.safetensors", "model_raw.safetensors"]
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["step"] == 7 and cfg["model"] == model.config

    def no_pickle(*a, **k):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    import pickle

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    loaded_ema = load_model(tmp_path / "ck", "cpu")
    loaded_raw = load_model(tmp_path / "ck", "cpu", ema=False)
    for (n, p), q in zip(ema.named_parameters(), loaded_ema.parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(model.parameters(), loaded_raw.parameters()):
        assert torch.equal(p, q)
    assert not loaded_ema.training


def test_checkpoint_of_wrapped_model(tmp_path):
    m = build_model("tiny", NC, PX).train()
    gsm = GradSampleModule(m)
    save_checkpoint(tmp_path, gsm, None, {})
    loaded = load_model(tmp_path, "cpu")
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), loaded.parameters()))
    with pytest.raises(FileNotFoundError, match="config"):
        load_model(tmp_path / "missing")


def test_cost_table():
    tiny = model_cost("tiny", 64)
    base = model_cost("base", 256)
    assert 0.5e6 < tiny["params"] < 2e6 and tiny["gflops"] > 0
    assert 100e6 < base["params"] < 130e6
    assert 50 < base["gflops"] < 400
