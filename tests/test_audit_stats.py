"""The audit's statistics (issue 12): the audit encoder at every ``encoder_steps``, its
guard against an encoder that cannot tell tiles apart, the exact binomial copy test, and the
calibrated membership attack (difficulty calibration, cross-fitted timestep choice,
bootstrap intervals)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synthpath.audit.encoder import one_cycle, retrieval_check, train_encoder
from synthpath.audit.mia import (attack_metrics, bootstrap_intervals, calibrate_losses, cross_fit_scores,
                                 difficulty_descriptor, roc_auc)
from synthpath.audit.stats import binomial_excess
from synthpath.features import FeatureSpace


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 11, 19])
def test_encoder_trains_at_every_step_count(steps):
    """``audit.encoder_steps: 10`` used to die in torch's OneCycleLR (ZeroDivisionError)."""
    imgs = np.random.default_rng(0).integers(0, 255, (12, 16, 16, 3), dtype=np.uint8)
    enc, losses = train_encoder(imgs, steps, seed=0, batch_size=8, device="cpu", width=4, dim=8)
    assert len(losses) == steps and all(np.isfinite(losses))
    assert enc(torch.zeros(2, 3, 16, 16)).shape == (2, 8)


def test_schedule_is_torch_one_cycle_where_that_works():
    for steps in (40, 300):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=2e-3)
        ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
        ours = one_cycle(steps)
        for i in range(steps):
            lr, beta1 = ours(i)
            assert lr * 2e-3 == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
            assert beta1 == pytest.approx(opt.param_groups[0]["betas"][0], rel=1e-9)
            opt.step()
            ref.step()


class _Constant(FeatureSpace):
    """An encoder that collapsed: every tile maps to the same point."""

    name = "learned"
    dim = 4

    def _embed(self, x):
        return torch.zeros(x.shape[0], 4)


class _MeanColour(FeatureSpace):
    """Mean colour: invariant to flips, rotations and crops, so it retrieves altered tiles
    of well-separated colours."""

    name = "learned"
    dim = 3

    def _embed(self, x):
        return x.mean(dim=(2, 3))


def _colour_tiles(n: int = 12) -> np.ndarray:
    rng = np.random.default_rng(1)
    base = np.stack([np.full((16, 16, 3), c, dtype=np.float64) for c in rng.uniform(20, 235, (n, 3))])
    return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)


def test_retrieval_guard_refuses_a_collapsed_encoder_and_keeps_a_working_one():
    tiles = _colour_tiles(24)
    bad = retrieval_check(_Constant(device="cpu"), tiles, seed=0)
    assert bad["usable"] is False and "not significantly better than chance" in bad["reason"]
    good = retrieval_check(_MeanColour(device="cpu"), tiles, seed=0)
    assert good["usable"] is True and good["accuracy"] > 0.5 and good["p_value"] < 0.05


def test_binomial_excess():
    none = binomial_excess(0, 48, 0.02, 0.05)
    assert none["p_value"] == 1.0 and not none["reject"] and none["interval"][0] == 0.0
    assert none["critical_count"] == 4  # P(X >= 4 | 48, 0.02) < 0.05 <= P(X >= 3)
    five = binomial_excess(5, 48, 0.02, 0.05)
    assert five["reject"] and five["interval"][0] < 5 / 48 < five["interval"][1] and five["lower_bound"] > 0.02
    # the null rate itself, observed: not significant
    assert not binomial_excess(1, 48, 0.02, 0.05)["reject"]


def test_difficulty_calibration_finds_members_a_raw_loss_misses():
    """Loss driven mostly by tile difficulty, members a little lower: calibrating each loss
    against similar non-members recovers membership the raw loss hides."""
    rng = np.random.default_rng(0)
    n = 200
    imgs = torch.from_numpy(rng.uniform(-1, 1, (2 * n, 3, 8, 8)).astype(np.float32))
    imgs *= torch.from_numpy(rng.uniform(0.05, 1.0, (2 * n, 1, 1, 1)).astype(np.float32))  # contrast = difficulty
    desc = difficulty_descriptor(imgs)
    difficulty = imgs.std(dim=(1, 2, 3)).numpy()
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    losses = np.stack([3 * difficulty + rng.normal(0, 0.02, 2 * n) - 0.04 * member,  # informative timestep
                       3 * difficulty + rng.normal(0, 0.5, 2 * n)], axis=1)  # noise
    raw_auc = roc_auc(-losses[member, 0], -losses[~member, 0])
    cal = calibrate_losses(losses, desc, np.zeros(2 * n), member)
    scores, chosen = cross_fit_scores(cal, member, seed=0)
    cal_auc = roc_auc(scores[member], scores[~member])
    assert chosen == [0, 0]  # the informative timestep, chosen on the other fold each time
    assert raw_auc < 0.65 < cal_auc
    iv = bootstrap_intervals(scores[member], scores[~member], (0.01,), seed=0, n_boot=200)
    m = attack_metrics(scores[member], scores[~member], (0.01,))
    assert iv["auc"][0] <= m["auc"] <= iv["auc"][1]
    assert iv["tpr_at_fpr"]["0.01"][0] <= m["tpr_at_fpr"]["0.01"]["tpr"] <= iv["tpr_at_fpr"]["0.01"][1]


def test_calibration_never_uses_a_tile_as_its_own_reference():
    losses = np.array([[1.0], [2.0], [4.0]])
    desc = np.zeros((3, 2))
    member = np.array([False, False, True])
    cal = calibrate_losses(losses, desc, np.zeros(3), member, k=8)
    # non-member 0's reference is non-member 1 only, and vice versa; the member's both
    assert cal[:, 0].tolist() == [1.0, -1.0, -2.5]
