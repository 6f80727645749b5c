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

The CLI runs in a subprocess through a small driver that wraps trainer/pipeline functions to
deliver the signal to itself at exactly the chosen point.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from synthpath.tiles.toystore import make_toy_store
from synthpath.train.dprandom import TEST_SEED_ENV

ROOT = Path(__file__).resolve().parents[1]
TEMP = re.compile(r"\.tmp\d*(\.[A-Za-z0-9]+)?$")

DRIVER = textwrap.dedent('''
    import os, signal, sys
    kind, arg, sig = (os.environ.get("KILL_AT") or "::").split(":")
    count = {"grad": 0}

    def die():
        os.kill(os.getpid(), getattr(signal, "SIG" + sig))

    from synthpath.train import trainer
    import synthpath.pipeline as pipeline

    step_fn, losses_fn, clean_fn = trainer.gradient_step, trainer.write_losses, pipeline.remove_temp_files

    def gradient_step(*a, **k):
        out = step_fn(*a, **k)
        count["grad"] += 1
        if kind == "grad" and count["grad"] == int(arg):
            die()
        return out

    def write_losses(path, rows):  # called right after state/latest.json is written
        if kind == "losses" and rows and rows[-1]["step"] == int(arg):
            path.with_name(path.name + ".tmp").write_text("step,loss,units\\n1,0.")  # torn, as a kill leaves it
            die()
        return losses_fn(path, rows)

    def remove_temp_files(folder):  # run_stage, after train returned, before the manifest and rename
        if kind == "finalise":
            die()
        return clean_fn(folder)

    trainer.gradient_step, trainer.write_losses, pipeline.remove_temp_files = gradient_step, write_losses, remove_temp_files
    from synthpath.cli import main
    rc = main(["train", sys.argv[1]])
    print("OPTIMISER_STEPS", count["grad"], flush=True)
    sys.exit(rc)
''')


def _setup(root: Path) -> Path:
    out = root / "out"
    ingest = out / "ingest"
    make_toy_store(ingest, n_patients=6, tile_px=16, n_levels=2, coarse_tiles=2, holdout_patients=1)
    # the ingest stage's manifest (the store itself is real; ingest is tested in test_ingest*.py)
    (ingest / "manifest.json").write_text(json.dumps({"stage": "ingest", "fingerprint": "toy",
                                                      "finished_at": "2026-01-01T00:00:00+00:00"}))
    recipe = {
        "name": "kill", "output_dir": str(out), "seed": 0,
        "data": {"slide_dir": str(root), "classes": ["stroma", "tumour"]},
        "ingest": {"tiling": {"levels": [2.0, 1.0], "tile_px": 16}},
        "model": {"size": "tiny"},
        "train": {"steps": 6, "batch_size": 2, "physical_batch_size": 8, "lr": 1e-3, "ema_decay": 0.9,
                  "log_every": 1, "sample_every": 1000, "checkpoint_every": 2, "device": "cpu"},
        "privacy": {"enabled": True, "unit": "patient", "target_epsilon": 8.0, "accountant": "rdp",
                    "noise_multiplicity": 1, "tiles_per_patient": 2},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(recipe: Path, kill_at: str = "") -> subprocess.CompletedProcess:
    driver = recipe.parent / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", KILL_AT=kill_at or "::")
    env[TEST_SEED_ENV] = "11"  # the same (test, not private) DP seed in every run, so they can be compared
    return subprocess.run([sys.executable, str(driver), str(recipe)], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=600)


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

    for name in ("model.safetensors", "model_raw.safetensors"):
        a, b = load_file(str(reference / name)), load_file(str(final / name))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
    assert json.loads((final / "ledger.json").read_text()) == json.loads((reference / "ledger.json").read_text())
    rows = (final / "losses.csv").read_text()
    assert rows == (reference / "losses.csv").read_text()
    assert [int(line.split(",")[0]) for line in rows.splitlines()[1:]] == [1, 2, 3, 4, 5, 6]  # no row lost
    stray = [str(q.relative_to(final)) for q in final.rglob("*") if TEMP.search(q.name)]
    assert not stray, f"temp files in the finished stage: {stray}"
    assert not (final / "state").exists()  # the private state (DP generator states) is not in the release


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
