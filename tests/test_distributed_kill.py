"""Kill-and-resume under 2 processes with REAL kills (issue 16): ``synthpath train`` under
torchrun (gloo, CPU, patient-level DP with ghost clipping), killed three times with SIGKILL
and restarted, ends with the weights, ledger and loss log of an uninterrupted 2-process run.

1. rank 1 alone is SIGKILLed after step 3 (the state of step 2 is on disk): torchrun must take
   rank 0 down and exit, and nothing may be left running;
2. the whole job (torchrun agent and both ranks) is SIGKILLed while rank 0 writes the state
   of step 4: a torn temp folder is left behind and ``latest.json`` still names step 2;
3. the whole job is SIGKILLed after training finished, before the stage is finalised: the
   restart must not train again on any rank (0 optimiser steps on both) -- a worker rank
   that looked at the folder itself would race rank 0 renaming it and train from scratch.

The ranks run tests/dist_kill_driver.py, which kills at exactly the chosen point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthpath.pipeline import fingerprint, get_stage
from synthpath.recipe import load_recipe
from synthpath.train.dprandom import TEST_SEED_ENV

from kill_common import assert_resumed_like_reference, toy_dp_recipe, write_ingest_manifest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 240  # a hung rank fails the test instead of blocking the suite


def _setup(root: Path) -> Path:
    path = toy_dp_recipe(
        root, "dkill",
        # 3 patients x 2 tiles x K=2 = 12 rows a step in chunks of 4: both ranks work every step
        train={"steps": 4, "batch_size": 3, "physical_batch_size": 4, "lr": 1e-3, "ema_decay": 0.9,
               "log_every": 1, "sample_every": 1000, "checkpoint_every": 2, "device": "cpu"},
        privacy={"enabled": True, "unit": "patient", "target_epsilon": 3.0, "accountant": "rdp", "delta": 1e-2,
                 "noise_multiplicity": 2, "tiles_per_patient": 2, "max_grad_norm": 0.05, "clipping": "ghost"})
    # the toy store stands for a finished ingest of this recipe (ingest is tested in test_ingest*.py)
    fp, _ = fingerprint(load_recipe(path), get_stage("ingest"))
    write_ingest_manifest(root / "out" / "ingest", fp)
    return path


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] not in ("Z", "X")  # a zombie is dead, only not yet reaped


def _torchrun(recipe: Path, kill_at: str = "") -> subprocess.CompletedProcess:
    pids = recipe.parent / "pids"
    for f in pids.glob("rank*"):
        f.unlink()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", KILL_AT=kill_at, KILL_PIDS=str(pids))
    env[TEST_SEED_ENV] = "11"  # the same (test, not private) DP seed in every run, so they can be compared
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "--max_restarts", "0", "--monitor_interval", "0.1", str(ROOT / "tests" / "dist_kill_driver.py"),
                        str(recipe)], cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                       start_new_session=True)
    ranks = sorted(pids.glob("rank*"))
    assert len(ranks) == 2, p.stderr[-3000:]
    # a job kill takes the agent down first and the ranks a moment later: give SIGKILL that moment
    deadline = time.monotonic() + 15
    while (left := [f.name for f in ranks if _alive(int(f.read_text()))]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"{left} still running 15 s after torchrun exited ({kill_at or 'no kill'})"
    return p


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference_rank(rank: int, port: int, recipe: str, log: str) -> None:
    import torch

    from synthpath.cli import main

    import logging

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for h in list(logging.root.handlers):  # pytest's capture handlers, inherited by the fork
        logging.root.removeHandler(h)
    sys.stdout, sys.stderr = open(1, "w", buffering=1, closefd=False), open(2, "w", buffering=1, closefd=False)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), TEST_SEED_ENV: "11"})
    torch.set_num_threads(1)  # as under torchrun (OMP_NUM_THREADS=1): the same reduction order
    sys.exit(main(["build", recipe, "--until", "train"]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-process run: ``synthpath build --until train`` on 2 gloo ranks with
    torchrun's environment, forked from this process (torch is imported already, which saves
    two imports). ``build`` under torchrun trains on every rank, so its weights are bit for bit
    those of ``synthpath train`` under torchrun -- which the test below compares them with."""
    import multiprocessing as mp

    root = tmp_path_factory.mktemp("dref")
    recipe, port, ctx = _setup(root), _free_port(), mp.get_context("fork")
    logs = [root / f"rank{r}.log" for r in range(2)]
    procs = [ctx.Process(target=_reference_rank, args=(r, port, str(recipe), str(logs[r]))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=LAUNCH_TIMEOUT)
    text = [q.read_text() for q in logs]
    assert [p.exitcode for p in procs] == [0, 0], text[0][-3000:] + text[1][-3000:]
    assert "rank 1 of 2 trains its share of every step" in text[1], text[1][-3000:]
    assert "[train] done" in text[0] and "[ingest] done" in text[0]  # rank 0 ran the stages
    return root / "out" / "train"


@pytest.mark.slow
def test_sigkilled_two_process_training_resumes_to_the_uninterrupted_result(tmp_path, reference):
    recipe = _setup(tmp_path)
    out = tmp_path / "out"
    partial, final = out / "train.partial", out / "train"
    latest = partial / "state" / "latest.json"

    p = _torchrun(recipe, "1:grad:3:self")  # one worker dies; torchrun must stop the other and exit
    assert p.returncode != 0 and "exitcode  : -9" in p.stderr, p.stderr[-3000:]
    assert not final.exists() and json.loads(latest.read_text())["step"] == 2

    p = _torchrun(recipe, "0:state:4:job")  # the whole job, mid-way through writing a checkpoint
    assert p.returncode == -9, p.stderr[-3000:]
    assert json.loads(latest.read_text())["step"] == 2  # the torn state is not named
    assert (partial / "state" / "step_0000004.tmp" / "tensors.safetensors").is_file()

    p = _torchrun(recipe, "0:finalise::job")  # the whole job, after training, before the stage is final
    assert p.returncode == -9, p.stderr[-3000:]
    assert not final.exists() and (partial / "train_done.json").is_file() and not (partial / "state").exists()

    p = _torchrun(recipe)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("OPTIMISER_STEPS 0") == 2, p.stdout[-2000:]  # neither rank trained again
    assert (final / "manifest.json").is_file() and not partial.exists()

    led = assert_resumed_like_reference(final, reference, steps=4)
    assert led["enabled"] and led["steps"] == 4 and 0 < led["epsilon"] <= 3.0 + 0.05
    assert sorted(q.name for q in final.iterdir()) == sorted(q.name for q in reference.iterdir())


def _replica_rank(rank: int, port: int, same: bool, q) -> None:
    import torch
    import torch.distributed as tdist

    from synthpath.train.distributed import DistContext

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0 if same or rank == 0 else 1)
    model = torch.nn.Linear(3, 2)
    try:
        DistContext(rank=rank, world=2).check_replicas(2 if same or rank == 0 else 4, model)
        q.put((rank, "ok"))
    except RuntimeError as e:
        q.put((rank, str(e)))
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("same", [True, False])
def test_ranks_with_different_states_refuse_to_train(same):
    """A rank that resumed another checkpoint (other step, other weights) is caught before the
    first step, on every rank, instead of training a diverging replica."""
    import multiprocessing as mp

    port, ctx = _free_port(), mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_replica_rank, args=(r, port, same, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    if same:
        assert got == {0: "ok", 1: "ok"}
    else:
        for r in (0, 1):
            assert "do not hold the same training state" in got[r] and "rank 1 at step 4" in got[r], got


def test_a_worker_rank_loads_rank_0s_state_without_the_secret_streams(tmp_path):
    """What a rank other than 0 reads on resume: the folder rank 0 named, every public tensor,
    and not the DP unit-sampling and noise generator states (rank 0's secret streams)."""
    import torch

    from synthpath.train.state import load_state, restore, save_state

    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    gens = {k: torch.Generator().manual_seed(i) for i, k in enumerate(("units", "rows", "noise"))}
    save_state(tmp_path, step=2, model=model, ema=ema, optimizer_state=opt.state_dict(), generators=gens,
               extra={"history": []})
    full = load_state(tmp_path)
    assert {"gen.units", "gen.noise", "gen.rows"} <= set(full["tensors"]) and full["folder"] == "step_0000002"
    part = load_state(tmp_path, folder="step_0000002", skip=("gen.units", "gen.noise"))
    assert "gen.units" not in part["tensors"] and "gen.noise" not in part["tensors"]
    assert part["tensors"].keys() == full["tensors"].keys() - {"gen.units", "gen.noise"}
    rows = torch.Generator()
    m2, e2 = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    restore(part, model=m2, ema=e2, optimizer=torch.optim.AdamW(m2.parameters()), generators={"rows": rows},
            device=torch.device("cpu"))
    assert torch.equal(rows.get_state(), gens["rows"].get_state()) and torch.equal(m2.weight, model.weight)
    with pytest.raises(RuntimeError, match="unreadable"):  # a folder rank 0 named but this rank cannot read
        load_state(tmp_path, folder="step_0000004")
