"""Kill and interrupt `synthpath train` (patient-level DP) at several points, resume, and
check the result is the uninterrupted run's (issue 17, train side):

- SIGINT after k steps, a checkpoint behind (Ctrl-C: a clean exit 130 or a KeyboardInterrupt);
- SIGKILL after k steps, between ``state/latest.json`` and ``losses.csv`` at a checkpoint, leaving a torn
  temp file of the loss log behind;
- SIGKILL after the last step, once training returned but before the stage is finalised
  (the resumed run must not train again: it makes 0 optimiser steps).

After every kill the stage is not marked finished (no ``train/`` folder). The final folder
has bit-identical weights, the same ledger and the same loss log as an uninterrupted run
(both with the same injected test DP seed), no temp file and no private state.

The CLI runs in a subprocess through a small driver (tests/train_kill_driver.py) that wraps
trainer/pipeline functions to deliver the signal to itself at exactly the chosen point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synthpath.train.dprandom import TEST_SEED_ENV

from kill_common import assert_resumed_like_reference, toy_dp_recipe

ROOT = Path(__file__).resolve().parents[1]

def _setup(root: Path) -> Path:
    return toy_dp_recipe(
        root, "kill",
        train={"steps": 6, "batch_size": 2, "physical_batch_size": 8, "lr": 1e-3, "ema_decay": 0.9,
               "log_every": 1, "sample_every": 1000, "checkpoint_every": 2, "device": "cpu"},
        privacy={"enabled": True, "unit": "patient", "target_epsilon": 8.0, "accountant": "rdp",
                 "noise_multiplicity": 1, "tiles_per_patient": 2})


def _run(recipe: Path, kill_at: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", KILL_AT=kill_at or "::")
    env[TEST_SEED_ENV] = "11"  # the same (test, not private) DP seed in every run, so they can be compared
    return subprocess.run([sys.executable, str(ROOT / "tests" / "train_kill_driver.py"), str(recipe)], cwd=str(ROOT),
                          env=env, capture_output=True, text=True, timeout=600)


def _killed(p: subprocess.CompletedProcess, sig: str) -> None:
    if sig == "KILL":
        assert p.returncode == -9, p.stderr[-2000:]
    else:  # Ctrl-C: a clean exit 130, or (before clean signal handling) a KeyboardInterrupt
        assert p.returncode == 130 or (p.returncode != 0 and "KeyboardInterrupt" in p.stderr), p.stderr[-2000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    recipe = _setup(root)
    p = _run(recipe)
    assert p.returncode == 0, p.stderr[-3000:]
    return root / "out" / "train"


@pytest.mark.slow
def test_kills_and_interrupts_resume_to_the_uninterrupted_result(tmp_path, reference):
    recipe = _setup(tmp_path)
    out = tmp_path / "out"
    partial, final = out / "train.partial", out / "train"
    for kill_at in ("grad:3:INT",  # Ctrl-C at step 3: the state at step 2 is the one to resume
                    "losses:4:KILL",  # after 4 steps: state/latest.json says 4, losses.csv not yet written
                    "finalise::KILL"):  # steps 5-6 done, train returned, stage not finalised
        p = _run(recipe, kill_at)
        _killed(p, kill_at.rsplit(":", 1)[1])
        assert not final.exists(), f"the stage was marked finished after {kill_at}"
        assert partial.is_dir()
        if kill_at.startswith("losses"):
            assert json.loads((partial / "state" / "latest.json").read_text())["step"] == 4
            assert (partial / "losses.csv.tmp").is_file()  # the torn temp is there until the resume
        if kill_at.startswith("finalise"):
            assert (partial / "train_done.json").is_file() and not (partial / "state").exists()

    p = _run(recipe)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "OPTIMISER_STEPS 0" in p.stdout  # resumed at the end, not from step 0
    assert (final / "manifest.json").is_file() and not partial.exists()

    assert_resumed_like_reference(final, reference, steps=6)


def test_remove_temp_files_takes_temps_only(tmp_path):
    from synthpath.pipeline import remove_temp_files

    keep = ["ledger.json", "losses.csv", "samples/step_00040.png", "tmp/slide-00000.parquet", "model.safetensors",
            "notes.tmpl"]
    temps = ["ledger.json.tmp4242", "losses.csv.tmp", "samples/step_00080.png.tmp.png", "loss.tmp.png",
             ".train-00000.parquet.tmp77", "state/step_0000040.tmp/tensors.safetensors", "config.json.tmp"]
    for name in keep + temps:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    remove_temp_files(tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(keep)
    assert not (tmp_path / "state" / "step_0000040.tmp").exists()
