"""The stated epsilon is the whole truth (issue 13): the DP randomness is secret, delta is
checked against the number of units, label shares are released under DP inside the one
epsilon, and a saved state is resumed only with the settings it was made with.

Tiny nested toy store (16 px, 2 levels), tiny model, CPU, RDP accountant (fast)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from synthpath.pipeline import StageError
from synthpath.recipe import PrivacyConfig, parse_recipe
from synthpath.tiles.toystore import make_toy_store
from synthpath.train import dprandom
from synthpath.train import label_shares as L
from synthpath.train import privacy as P
from synthpath.train.trainer import TrainingInterrupted, train


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpsecret") / "store"
    make_toy_store(root, n_patients=6, tile_px=16, n_levels=2, coarse_tiles=2, holdout_patients=1)
    return root


DP = {"enabled": True, "unit": "patient", "target_epsilon": 8.0, "accountant": "rdp", "noise_multiplicity": 1,
      "tiles_per_patient": 2, "max_grad_norm": 1.0}


def _recipe(tmp_path, privacy=None, train_=None, model=None, generate=None):
    return parse_recipe({
        "name": "t", "output_dir": str(tmp_path), "seed": 0,
        "data": {"slide_dir": str(tmp_path), "classes": ["stroma", "tumour"]},
        "ingest": {"tiling": {"levels": [2.0, 1.0], "tile_px": 16}},
        "model": {"size": "tiny", **(model or {})},
        "train": {"steps": 2, "batch_size": 2, "physical_batch_size": 8, "lr": 1e-3, "ema_decay": 0.9,
                  "sample_every": 1000, "checkpoint_every": 1000, "log_every": 1, "device": "cpu", **(train_ or {})},
        "privacy": {**DP, **(privacy or {})},
        "generate": generate or {},
    }, check_files=False)


def _weights(folder):
    return load_file(str(folder / "model_raw.safetensors"))


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- secret streams
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, store):
    """Two complete runs of the same recipe (same recipe seed), nothing injected."""
    root = tmp_path_factory.mktemp("two")
    r = _recipe(root)
    train(r, store, root / "a", progress=False)
    train(r, store, root / "b", progress=False)
    return root


def test_same_recipe_seed_draws_different_dp_noise(two_runs):
    la, lb = (json.loads((two_runs / x / "ledger.json").read_text()) for x in ("a", "b"))
    assert la["dp_randomness"] == lb["dp_randomness"] == dprandom.OS_ENTROPY
    assert "not hardened against floating-point attacks" in la["noise_source"]
    # same recipe seed, same plan and epsilon -- but different private noise: different
    # label-share noise and different weights (with an injected seed two runs are
    # bit-identical: tests/test_train.py::test_patient_dp_resume_is_exact_and_epsilon_is_right)
    assert la["epsilon"] == lb["epsilon"] and la["sigma"] == lb["sigma"]
    assert la["label_shares"]["noisy_sums"] != lb["label_shares"]["noisy_sums"]
    assert not _equal(_weights(two_runs / "a"), _weights(two_runs / "b"))


def test_private_streams_are_not_a_function_of_anything_public():
    g1, src1, _ = dprandom.private_streams(torch.device("cpu"), secure=False, test_seed=None)
    g2, src2, _ = dprandom.private_streams(torch.device("cpu"), secure=False, test_seed=None)
    torch.manual_seed(0)
    a = torch.randn(64, generator=g1["noise"])
    torch.manual_seed(0)
    b = torch.randn(64, generator=g2["noise"])
    assert not torch.equal(a, b) and src1 == src2 == dprandom.OS_ENTROPY
    assert not torch.equal(torch.rand(8, generator=g1["units"]), torch.rand(8, generator=g2["units"]))


def test_resume_continues_its_own_private_stream(tmp_path, store, two_runs):
    r = _recipe(tmp_path)
    with pytest.raises(TrainingInterrupted):
        train(r, store, tmp_path / "cut", stop_after=1, progress=False)
    shutil.copytree(tmp_path / "cut", tmp_path / "cut2")
    train(r, store, tmp_path / "cut", progress=False)
    train(r, store, tmp_path / "cut2", progress=False)
    # both resumes continued the saved (secret) stream: identical to each other ...
    assert _equal(_weights(tmp_path / "cut"), _weights(tmp_path / "cut2"))
    l1, l2 = (json.loads((tmp_path / x / "ledger.json").read_text()) for x in ("cut", "cut2"))
    assert l1 == l2 and l1["steps"] == 2 and l1["dp_randomness"] == dprandom.OS_ENTROPY
    # ... while fresh runs of the same recipe drew other noise
    for other in ("a", "b"):
        assert not _equal(_weights(tmp_path / "cut"), _weights(two_runs / other))


def test_nothing_released_contains_the_noise_seed(tmp_path, store, monkeypatch):
    secret = 0x5EC7E7_0DDBA11_5
    monkeypatch.setattr(dprandom, "_os_entropy_seed", lambda: secret)
    r = _recipe(tmp_path)
    with pytest.raises(TrainingInterrupted):
        train(r, store, tmp_path / "w", stop_after=1, progress=False)
    assert (tmp_path / "w" / "state").is_dir()  # the private state exists while training runs ...
    train(r, store, tmp_path / "w", progress=False)
    out = tmp_path / "w"
    assert not (out / "state").exists()  # ... and is gone from the finished folder
    needles = set()
    for s in (secret, dprandom._derive(secret, "units"), dprandom._derive(secret, "noise")):
        needles |= {str(s).encode(), hex(s).encode(), hex(s)[2:].encode(), s.to_bytes(8, "little"),
                    s.to_bytes(8, "big")}
    # the generators' initial states (the seed in another form) must not be there either
    for stream in ("units", "noise"):
        g = torch.Generator().manual_seed(dprandom._derive(secret, stream))
        needles.add(bytes(g.get_state().numpy()[:64]))
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    for p in files:
        blob = p.read_bytes()
        hits = [n for n in needles if n in blob]
        assert not hits, f"{p.relative_to(out)} contains the secret DP seed"
    led = json.loads((out / "ledger.json").read_text())
    assert led["dp_randomness"] == dprandom.OS_ENTROPY and "seed" not in json.dumps(led["label_shares"])


def test_an_injected_test_seed_is_recorded_never_silent(tmp_path, store, monkeypatch):
    r = _recipe(tmp_path)
    monkeypatch.setenv(dprandom.TEST_SEED_ENV, "123")
    train(r, store, tmp_path / "env", progress=False)
    led = json.loads((tmp_path / "env" / "ledger.json").read_text())
    assert led["dp_randomness"] == "test seed, not private"
    assert led["warnings"][0] == dprandom.TEST_WARNING and "does NOT hold" in led["warnings"][0]
    monkeypatch.setenv(dprandom.TEST_SEED_ENV, "twelve")
    with pytest.raises(StageError, match=dprandom.TEST_SEED_ENV):
        train(r, store, tmp_path / "bad", progress=False)


# ----------------------------------------------------------------------------- delta
def test_delta_at_or_above_one_over_n_is_rejected_by_name(tmp_path, store):
    for d in (0.5, 1 / 7):
        with pytest.raises(StageError, match=r"privacy\.delta=.*1/n = 1/7 .*n = 7 training units"):
            P.resolve_delta(d, 7)
    assert P.resolve_delta(0.05, 11) == 0.05
    assert P.resolve_delta("auto", 7) == pytest.approx(1 / 70)
    with pytest.raises(StageError, match=r"privacy\.delta.*1/5"):  # 5 training patients in the store
        train(_recipe(tmp_path, privacy={"delta": 0.5}), store, tmp_path / "x", progress=False)
    assert not (tmp_path / "x" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- label shares
class _Toy:
    """The attributes unit_label_vectors reads from a TileDataset."""

    def __init__(self, patients, levels, labels, groups):
        self.patients, self.item_levels, self.labels, self._g = patients, np.array(levels), np.array(labels), groups

    def patient_groups(self):
        return self._g


def test_one_patient_moves_the_label_sum_by_at_most_one():
    # patient 0 has 1000 coarse tiles of class 1; patient 1 two tiles; patient 2 only fine tiles
    levels = [0] * 1000 + [0, 0] + [1, 1]
    labels = [1] * 1000 + [0, 1] + [0, 0]
    groups = {0: list(range(1000)), 1: [1000, 1001], 2: [1002, 1003]}
    v = L.unit_label_vectors(_Toy(["a", "b", "c"], levels, labels, groups), "patient", 2)
    assert np.allclose(v, [[0, 1], [0.5, 0.5], [0, 0]])
    assert (np.linalg.norm(v, axis=1) <= 1 + 1e-12).all()  # however many tiles: one unit, norm <= 1
    t = L.unit_label_vectors(_Toy(["a", "b", "c"], levels, labels, groups), "tile", 2)
    assert t.shape == (1004, 2) and t.sum() == 1002 and (t.sum(axis=1) <= 1).all()


def test_label_shares_noise_has_the_scale_their_budget_implies():
    cfg = PrivacyConfig(enabled=True, target_epsilon=4.0, accountant="rdp", label_share_budget=0.1)
    block = L.plan_label_shares(cfg, 1e-3)
    # that sigma spends exactly (never more than) 10% of the budget, alone
    eps = P.epsilon_of([(block["sigma"], 1.0, 1)], 1e-3, "rdp")
    assert eps <= 0.4 and eps == pytest.approx(0.4, rel=2e-3)
    # the released sums carry noise of exactly that standard deviation
    vectors = np.array([[1.0, 0.0], [0.25, 0.75], [0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    draws = np.array([L.release_label_shares(block, vectors, g)["noisy_sums"] for _ in range(3000)])
    resid = draws - vectors.sum(axis=0)
    assert resid.mean(axis=0) == pytest.approx([0, 0], abs=4 * block["sigma"] / math.sqrt(3000))
    assert resid.std(axis=0) == pytest.approx([block["sigma"]] * 2, rel=0.05)
    out = L.release_label_shares(block, vectors, g)
    assert sum(out["shares"]) == pytest.approx(1.0) and min(out["shares"]) >= 0


def test_ledger_epsilon_composes_label_shares_with_training(tmp_path, store):
    r = _recipe(tmp_path, privacy={"label_share_budget": 0.2})
    train(r, store, tmp_path / "w", progress=False, dp_seed=1)
    led = json.loads((tmp_path / "w" / "ledger.json").read_text())
    lab = led["label_shares"]
    assert lab["source"] == "dp" and lab["history"] == [[lab["sigma"], 1.0, 1]]
    assert led["composed_history"] == lab["history"] + led["history"]
    total = P.epsilon_of(led["composed_history"], led["delta"], "rdp")
    training = P.epsilon_of(led["history"], led["delta"], "rdp")
    assert led["epsilon"] == pytest.approx(total) and led["epsilon"] > training + 0.1
    assert led["epsilon_alone"]["label_shares"] == pytest.approx(0.2 * 8.0, rel=2e-3)
    assert 7.9 <= led["epsilon"] <= 8.0  # one total, calibrated to the target
    # the generation plan takes the DP shares from the ledger, never the exact counts
    from synthpath.generate.plan import training_label_shares

    shares, source = training_label_shares(store, 2, tmp_path / "w")
    assert shares == lab["shares"] and "under DP" in source
    broken = dict(led, label_shares=None)
    (tmp_path / "w" / "ledger.json").write_text(json.dumps(broken))
    with pytest.raises(StageError, match="no valid DP label shares"):
        training_label_shares(store, 2, tmp_path / "w")


def test_public_label_proportions_cost_nothing(tmp_path, store):
    r = _recipe(tmp_path, generate={"label_proportions": {"stroma": 1, "tumour": 1}})
    train(r, store, tmp_path / "w", progress=False, dp_seed=1)
    led = json.loads((tmp_path / "w" / "ledger.json").read_text())
    assert led["label_shares"]["source"] == "public" and "public knowledge" in led["label_shares"]["note"]
    assert led["composed_history"] == led["history"] and "label_shares" not in led["epsilon_alone"]


# ----------------------------------------------------------------------------- resume guard
@pytest.fixture(scope="module")
def saved_states(tmp_path_factory, store):
    """A DP patient-level state and a non-DP state, each stopped after 1 of 2 steps."""
    root = tmp_path_factory.mktemp("states")
    r = _recipe(root)
    with pytest.raises(TrainingInterrupted):
        train(r, store, root / "dp", stop_after=1, progress=False, dp_seed=3)
    r0 = _recipe(root, privacy={"enabled": False})
    with pytest.raises(TrainingInterrupted):
        train(r0, store, root / "plain", stop_after=1, progress=False)
    return root


def _copy(saved, name, tmp_path):
    shutil.copytree(saved / name, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("case, changes, match", [
    ("nondp_as_dp", {}, r"privacy\.enabled: saved False, now True"),
    ("patient_as_tile", {"privacy": {"unit": "tile"}}, r"privacy\.unit: saved 'patient', now 'tile'"),
    ("model_changed", {"model": {"p_drop_label": 0.3}}, r"model\.p_drop_label: saved 0\.1, now 0\.3"),
    ("train_changed", {"train_": {"lr": 5e-4}}, r"train\.lr: saved 0\.001, now 0\.0005"),
    ("epsilon_changed", {"privacy": {"target_epsilon": 4.0}}, r"privacy\.target_epsilon"),
])
def test_resume_guard_refuses_other_settings(tmp_path, store, saved_states, case, changes, match):
    folder = _copy(saved_states, "plain" if case == "nondp_as_dp" else "dp", tmp_path)
    before = (folder / "state" / "latest.json").read_text()
    with pytest.raises(StageError, match="refusing to resume") as e:
        train(_recipe(tmp_path, **changes), store, folder, progress=False, dp_seed=3)
    assert e.match(match)
    assert (folder / "state" / "latest.json").read_text() == before  # the state is left alone


def test_resume_guard_checks_history_against_the_saved_step(tmp_path, store, saved_states):
    folder = _copy(saved_states, "dp", tmp_path)
    st = next((folder / "state").glob("step_*")) / "state.json"
    meta = json.loads(st.read_text())
    assert meta["step"] == 1 and sum(h[2] for h in meta["extra"]["history"]) == 1
    assert meta["extra"]["dp_randomness"] == "test seed, not private"
    meta["extra"]["history"] = []  # a state whose accountant lost its steps
    st.write_text(json.dumps(meta))
    with pytest.raises(StageError, match="at step 1 but its accountant history covers 0 step"):
        train(_recipe(tmp_path), store, folder, progress=False)
    del meta["extra"]["history"]
    st.write_text(json.dumps(meta))
    with pytest.raises(StageError, match="no accountant history"):
        train(_recipe(tmp_path), store, folder, progress=False)


def test_resume_guard_allows_the_same_settings_and_neutral_changes(tmp_path, store, saved_states):
    folder = _copy(saved_states, "dp", tmp_path)
    s = train(_recipe(tmp_path, train_={"log_every": 5, "checkpoint_every": 7}), store, folder, progress=False)
    assert s["steps"] == 2 and s["privacy"]["epsilon"] > 0
