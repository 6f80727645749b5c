"""Data-parallel training on 2 CPU processes (gloo, torchrun's environment) equals 1 process.

Same recipe seed, same injected test-only DP seed, same logical batches: the final weights
agree within fp32 tolerance and the ledgers are identical, for non-DP, tile-level DP and
patient-level DP; a run stopped under 2 processes resumes (under 2, or under 1) to the same
weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from synthpath.recipe import parse_recipe
from synthpath.train.trainer import TrainingInterrupted, train

ROOT = Path(__file__).resolve().parents[1]
DP_SEED = "31337"

MODES = {
    "nondp": {"enabled": False},
    "tile": {"enabled": True, "unit": "tile", "target_epsilon": 8.0, "accountant": "rdp", "delta": 1e-3,
             "noise_multiplicity": 2, "max_grad_norm": 0.05, "clipping": "ghost"},
    "patient": {"enabled": True, "unit": "patient", "target_epsilon": 8.0, "accountant": "rdp", "delta": 1e-2,
                "noise_multiplicity": 2, "tiles_per_patient": 2, "max_grad_norm": 0.05, "clipping": "ghost"},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from synthpath.tiles.toystore import make_toy_store

    root = tmp_path_factory.mktemp("ddp") / "store"
    make_toy_store(root, n_patients=7, tile_px=16, n_levels=2, coarse_tiles=2, holdout_patients=1)
    return root


def _recipe(tmp_path, mode):
    # physical batch 4 rows: a logical batch is several chunks, spread over the ranks
    return {
        "name": "ddp", "output_dir": str(tmp_path), "seed": 3,
        "data": {"slide_dir": str(tmp_path), "classes": ["stroma", "tumour"]},
        "ingest": {"tiling": {"levels": [2.0, 1.0], "tile_px": 16}},
        "model": {"size": "tiny"},
        "train": {"steps": 3, "batch_size": 3 if mode == "patient" else 6, "physical_batch_size": 4, "lr": 1e-3,
                  "ema_decay": 0.9, "sample_every": 1000, "checkpoint_every": 1000, "device": "cpu"},
        "privacy": MODES[mode],
    }


def _one_process(data, store, out, stop_after=None):
    os.environ["SYNTHPATH_TEST_DP_SEED"] = DP_SEED
    try:
        return train(parse_recipe(data, check_files=False), store, out, progress=False, stop_after=stop_after)
    finally:
        del os.environ["SYNTHPATH_TEST_DP_SEED"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(data, store, out, tmp_path, stop_after=-1) -> list[int]:
    """Launch 2 ranks with torchrun's environment; returns their exit codes."""
    cfg = tmp_path / "recipe.json"
    cfg.write_text(json.dumps(data))
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
               "SYNTHPATH_TEST_DP_SEED": DP_SEED, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "dist_train_worker.py"), str(cfg),
                                       str(store), str(out), str(stop_after)], cwd=str(ROOT), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    codes = []
    for p in procs:
        text, _ = p.communicate(timeout=600)
        codes.append(p.returncode)
        if p.returncode not in (0, 17):
            print(text)
    return codes


def _same_weights(a: Path, b: Path):
    wa, wb = load_file(str(a / "model_raw.safetensors")), load_file(str(b / "model_raw.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6), (k, float((wa[k] - wb[k]).abs().max()))
    ea, eb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for k in ea:
        assert torch.allclose(ea[k], eb[k], rtol=1e-5, atol=1e-6), k


def _ledger(p: Path) -> dict:
    return json.loads((p / "ledger.json").read_text())


def _check_two_equal_one(one: Path, two: Path, dp: bool):
    _same_weights(one, two)
    assert _ledger(one) == _ledger(two)
    if dp:
        led = _ledger(two)
        assert led["enabled"] and led["steps"] == 3 and led["epsilon"] > 0
    # every artifact was written once, by rank 0, and no rank left a state behind
    assert not (two / "state").exists()
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


@pytest.mark.parametrize("mode", ["nondp", "tile"])
def test_two_gloo_processes_equal_one(tmp_path, store, mode):
    data = _recipe(tmp_path, mode)
    one, two = tmp_path / "one", tmp_path / "two"
    _one_process(data, store, one)
    assert _two_processes(data, store, two, tmp_path) == [0, 0]
    _check_two_equal_one(one, two, mode != "nondp")


def test_patient_dp_two_processes_equal_one_and_resume(tmp_path, store):
    """Patient-level DP: 2 processes equal 1; a 2-process run stopped after step 1 resumes under
    2 processes -- and a copy of the stopped state under 1 process -- to the same weights."""
    import shutil

    data = _recipe(tmp_path, "patient")
    ref, two, stopped, mixed = (tmp_path / n for n in ("ref", "two", "stopped", "mixed"))
    _one_process(data, store, ref)
    assert _two_processes(data, store, two, tmp_path) == [0, 0]
    _check_two_equal_one(ref, two, True)
    assert _two_processes(data, store, stopped, tmp_path, stop_after=1) == [17, 17]
    assert (stopped / "state" / "latest.json").is_file()
    assert json.loads((stopped / "state" / "latest.json").read_text())["step"] == 1
    shutil.copytree(stopped, mixed)
    assert _two_processes(data, store, stopped, tmp_path) == [0, 0]
    _check_two_equal_one(ref, stopped, True)
    _one_process(data, store, mixed)  # the world size may change across a resume
    _check_two_equal_one(ref, mixed, True)


def test_multi_process_dp_needs_ghost_clipping(tmp_path, store):
    data = _recipe(tmp_path, "tile")
    data["privacy"] = {**data["privacy"], "clipping": "hooks"}
    codes = _two_processes(data, store, tmp_path / "hooks", tmp_path)
    assert codes[0] not in (0, 17)
