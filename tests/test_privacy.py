"""Privacy mechanism tests on a small Conv/GroupNorm/Linear net (fast, seeded)."""

from __future__ import annotations

import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.optimizers import DPOptimizer
from torch import nn

from synthpath.pipeline import StageError
from synthpath.recipe import PrivacyConfig
from synthpath.train import privacy as P
from synthpath.train.batches import PoissonSampler
from synthpath.train.engine import PlainGradients, PrivateGradients, Rows, gradient_step



class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))
        return self.head(h.mean((2, 3))).squeeze(1)


def _data(n_units=3, rows_per_unit=4, huge_unit=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_units, rows_per_unit, 3, 6, 6, generator=g)
    y = torch.randn(n_units, rows_per_unit, generator=g)
    if huge_unit is not None:
        y[huge_unit] *= 1e4  # that unit's gradient is enormous
    return x, y


def _make_rows(x, y):
    rpu = x.shape[1]

    def make(chunk):
        xs = torch.cat([x[u] for u in chunk])
        ys = torch.cat([y[u] for u in chunk])
        unit = torch.arange(len(chunk)).repeat_interleave(rpu)
        return Rows(x0=xs, cond=ys, unit=unit, weight=torch.full((len(xs),), 1.0 / rpu))

    return make


def _loss(module, rows):
    return (module(rows.x0) - rows.cond) ** 2


def _private(model, *, sigma, clip, expected, max_units, generator=None):
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=sigma, max_grad_norm=clip,
                      expected_batch_size=expected, loss_reduction="mean", generator=generator)
    acc = create_accountant("rdp")
    opt.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=0.5))
    return PrivateGradients(gsm, opt, acc, max_units=max_units)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _update(units, x, y, *, sigma=0.0, clip=1.0, expected=1.0, max_units=1, seed=0):
    torch.manual_seed(seed)
    model = SmallNet()
    before = _flat(model)
    grads = _private(model, sigma=sigma, clip=clip, expected=expected, max_units=max_units)
    out = gradient_step(grads, units, _make_rows(x, y), _loss)
    assert out["stepped"]
    return before - _flat(model), grads  # SGD lr 1: the (negated) noised, scaled gradient


def test_one_patient_moves_update_by_at_most_C():
    x, y = _data(n_units=3, rows_per_unit=4, huge_unit=1)
    C = 0.7
    with_all, _ = _update([0, 1, 2], x, y, clip=C)
    without, _ = _update([0, 2], x, y, clip=C)
    diff = (with_all - without).norm().item()
    assert diff <= C + 1e-4
    assert diff > 0.5 * C  # the huge patient is clipped to C, not dropped
    # the same patient's raw gradient is far larger than C: clipping did the bounding
    model = SmallNet()
    loss = _loss(model, _make_rows(x, y)([1])).mean()
    raw = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]).norm()
    assert raw > 100 * C


def test_chunking_does_not_change_the_update():
    x, y = _data(n_units=4, rows_per_unit=3)
    one, _ = _update([0, 1, 2, 3], x, y, clip=0.5, max_units=1)
    all_, _ = _update([0, 1, 2, 3], x, y, clip=0.5, max_units=4)
    assert torch.allclose(one, all_, atol=1e-6)


def test_private_and_plain_share_the_step_when_noise_and_clip_are_off():
    """Same gradient_step, same loss and rows: the privacy wrapper is the only difference."""
    x, y = _data(n_units=4, rows_per_unit=3, seed=3)
    units = [0, 1, 3]
    dp_delta, _ = _update(units, x, y, sigma=0.0, clip=1e9, expected=len(units), max_units=2)
    torch.manual_seed(0)
    model = SmallNet()
    before = _flat(model)
    plain = PlainGradients(model, torch.optim.SGD(model.parameters(), lr=1.0), max_units=2, grad_clip=None)
    gradient_step(plain, units, _make_rows(x, y), _loss)
    assert torch.allclose(dp_delta, before - _flat(model), atol=1e-5)


def test_noise_has_std_sigma_C_over_expected_batch():
    x, y = _data(n_units=2, rows_per_unit=2)
    torch.manual_seed(0)
    model = SmallNet()
    before = _flat(model)
    g = torch.Generator().manual_seed(1)
    grads = _private(model, sigma=2.0, clip=0.5, expected=4.0, max_units=1, generator=g)
    gradient_step(grads, [], _make_rows(x, y), _loss)  # an empty Poisson draw: noise only
    delta = before - _flat(model)
    assert abs(delta.std().item() - 2.0 * 0.5 / 4.0) < 0.02
    assert grads.accountant.history == [(2.0, 0.5, 1)]


def test_clip_sum_units_reference():
    g = [torch.tensor([[3.0, 4.0], [0.3, 0.4]])]
    out = P.clip_sum_units(g, 1.0)[0]
    assert torch.allclose(out, torch.tensor([0.6 + 0.3, 0.8 + 0.4]), atol=1e-5)


def test_poisson_sampling_rate():
    n, q, steps = 20, 0.3, 3000
    s = PoissonSampler(n, q, torch.Generator().manual_seed(0), steps + 50)
    counts = torch.zeros(n)
    sizes = []
    for _ in range(steps):
        u = s.draw()
        sizes.append(len(u))
        counts[u] += 1
    mean = sum(sizes) / steps
    assert abs(mean - q * n) < 5 * math.sqrt(n * q * (1 - q) / steps)
    freq = counts / steps
    assert (freq - q).abs().max() < 5 * math.sqrt(q * (1 - q) / steps)
    assert len(set(map(len, [s.draw() for _ in range(50)]))) > 1  # the batch size varies
    with pytest.raises(RuntimeError, match="budget"):
        s.draw()  # never more draws than planned steps


def test_calibrated_sigma_reaches_target_and_matches_accountant():
    cfg = PrivacyConfig(enabled=True, unit="patient", target_epsilon=3.0, accountant="rdp")
    plan = P.plan_patient_privacy(cfg, n_patients=200, batch_size=20, steps=100)
    assert plan.sample_rate == pytest.approx(0.1)
    assert plan.delta == pytest.approx(1 / 2000) and plan.delta < 1 / 200
    acc = create_accountant("rdp")
    acc.history = [(plan.sigma, plan.sample_rate, 100)]
    eps = acc.get_epsilon(delta=plan.delta)
    assert abs(eps - 3.0) < 0.1 and eps <= 3.0
    assert P.epsilon_of([(plan.sigma, plan.sample_rate, 100)], plan.delta, "rdp") == pytest.approx(eps)
    assert not plan.warnings  # 200 patients: no small-cohort warning


def test_prv_accountant_is_tighter_than_rdp():
    hist = [(1.0, 0.1, 20)]
    prv, rdp = P.epsilon_of(hist, 1e-3, "prv"), P.epsilon_of(hist, 1e-3, "rdp")
    assert 0 < prv <= rdp


def test_refuses_unreachable_targets():
    cfg = PrivacyConfig(enabled=True, unit="patient", target_epsilon=8.0, accountant="rdp")
    with pytest.raises(StageError, match="train.batch_size"):
        P.plan_patient_privacy(cfg, n_patients=4, batch_size=4, steps=10)  # q = 1
    tiny = PrivacyConfig(enabled=True, unit="patient", target_epsilon=0.1, delta=1e-12, accountant="rdp")
    with pytest.raises(StageError, match="target_epsilon=0.1 cannot be reached"):
        P.plan_patient_privacy(tiny, n_patients=10, batch_size=5, steps=10)


def test_few_patients_warning_lands_in_ledger():
    cfg = PrivacyConfig(enabled=True, unit="patient", target_epsilon=8.0, accountant="rdp")
    plan = P.plan_patient_privacy(cfg, n_patients=6, batch_size=2, steps=10)
    assert any("6 training patients" in w for w in plan.warnings)
    led = P.ledger_private(plan, [(plan.sigma, plan.sample_rate, 10)], 10, ["extra note"])
    assert led["enabled"] and led["unit"] == "patient" and led["n_units"] == 6
    assert any("6 training patients" in w for w in led["warnings"]) and "extra note" in led["warnings"]
    for key in ("epsilon", "delta", "sigma", "sample_rate", "steps", "max_grad_norm", "noise_multiplicity",
                "tiles_per_patient", "accountant", "opacus_version", "secure_mode"):
        assert key in led
    public = P.ledger_public(10)
    assert public["enabled"] is False and "no formal privacy guarantee" in public["warnings"][0]


def test_delta_auto_is_below_one_over_n():
    assert P.resolve_delta("auto", 40) == pytest.approx(1 / 400)
    assert P.resolve_delta(1e-6, 40) == 1e-6


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(StageError, match=r"1 \(BatchNorm2d\)"):
        P.check_supported(model)
    P.check_supported(SmallNet())  # supported layers pass


def test_secure_mode_needs_torchcsprng():
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        with pytest.raises(StageError, match="torchcsprng"):
            P.secure_generator()
    else:
        assert P.secure_generator() is not None
