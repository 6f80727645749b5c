"""Running the pipeline as several processes (torchrun, Slurm arrays).

Workers learn their rank and the world size from ``RANK``/``WORLD_SIZE`` (torchrun), else
``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT`` (minus ``SLURM_ARRAY_TASK_MIN``), else
they are rank 0 of 1. Only ``generate`` is split between workers (by groups of slides, see
:mod:`synthpath.generate.runner`); every other stage is single-process.

Under torchrun (``MASTER_ADDR`` set and ``WORLD_SIZE`` > 1) the workers also meet at
``torch.distributed`` barriers over the ``gloo`` backend (CPU, no GPU needed):

* ``build``: rank 0 runs the single-process stages before ``generate`` (ingest, audit)
  while the others wait at a barrier; ``train`` runs data-parallel on every rank (rank 0
  runs the stage, the others train alongside it: :mod:`synthpath.train.distributed`, with
  an NCCL group for the gradients on GPUs); rank 0 then prepares the ``generate.partial``
  folder (removing a stale one), all ranks generate, and after a second barrier (the stage
  is then finalised by one of them) rank 0 runs ``export`` and ``evaluate``. A failure on
  any rank is reported to all, so none waits forever.
* ``generate``: rank 0 prepares ``generate.partial`` before the others start writing to it.

Slurm arrays have no rendezvous: run the single-process stages first (``synthpath build
--until audit``), then ``generate`` as the array (see the README).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil

from .atomic import write_json
from .pipeline import StageDeferred, StageError, build, fingerprint, get_stage, is_current, run_stage, stages

log = logging.getLogger("synthpath.distributed")

#: how long a waiting rank waits at a barrier (training can take days)
BARRIER_TIMEOUT = _dt.timedelta(days=7)


def rank_world(env: dict | None = None) -> tuple[int, int]:
    """(rank, world size) from torchrun or Slurm array variables; (0, 1) by default."""
    env = os.environ if env is None else env

    def geti(name: str) -> int:
        try:
            return int(env[name])
        except ValueError:
            raise StageError(f"environment variable {name}={env[name]!r} is not an integer") from None

    if "WORLD_SIZE" in env or "RANK" in env:
        rank, world = geti("RANK") if "RANK" in env else 0, geti("WORLD_SIZE") if "WORLD_SIZE" in env else 1
        src = "RANK/WORLD_SIZE"
    elif "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
        rank, world = geti("SLURM_ARRAY_TASK_ID"), geti("SLURM_ARRAY_TASK_COUNT")
        # arrays may start at a non-zero index (e.g. --array=1-4)
        if "SLURM_ARRAY_TASK_MIN" in env:
            rank -= geti("SLURM_ARRAY_TASK_MIN")
        src = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
    else:
        return 0, 1
    if world < 1 or not 0 <= rank < world:
        raise StageError(f"bad worker rank/world from {src}: rank {rank}, world {world}")
    return rank, world


def under_torchrun(env: dict | None = None) -> bool:
    """True when several workers were started with a rendezvous (torchrun)."""
    env = os.environ if env is None else env
    return "MASTER_ADDR" in env and "MASTER_PORT" in env and rank_world(env)[1] > 1


class _Group:
    """The gloo process group of a torchrun job (opened and closed around one command)."""

    def __enter__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = rank_world()
        dist.init_process_group("gloo", init_method="env://", rank=self.rank, world_size=self.world,
                                timeout=BARRIER_TIMEOUT)
        return self

    def __exit__(self, *exc):
        self.dist.destroy_process_group()
        return False

    def share_errors(self, err: str | None, what: str) -> None:
        """Every rank's error (or None) to every rank; raise if any rank failed."""
        errs: list = [None] * self.world
        self.dist.all_gather_object(errs, err)
        bad = [(r, e) for r, e in enumerate(errs) if e]
        if bad:
            raise StageError(f"{what} failed on " + "; ".join(f"rank {r}: {e}" for r, e in bad))


def _prepare_generate(recipe, force: bool) -> None:
    """Rank 0's part before the workers share ``generate.partial``: remove a stale (or
    forced) one and write the current fingerprint, so no worker wipes another's files."""
    stage = get_stage("generate")
    if not force and is_current(recipe, stage):
        return  # every rank will find it up to date
    fp, _ = fingerprint(recipe, stage)
    final = recipe.output_dir / "generate"
    work = recipe.output_dir / "generate.partial"
    if force:
        shutil.rmtree(work, ignore_errors=True)
        if final.exists():  # so no rank skips it as up to date
            (final / "manifest.json").unlink(missing_ok=True)
    elif work.exists():
        try:
            same = json.loads((work / "fingerprint.json").read_text()).get("fingerprint") == fp
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    # a claim left by a finalising worker that was killed would stop every rank finalising
    (work / ".finalised_by.json").unlink(missing_ok=True)
    if not (work / "fingerprint.json").exists():
        write_json(work / "fingerprint.json", {"fingerprint": fp})


def _run_generate(g: _Group, recipe, *, force: bool, options: dict | None) -> dict | None:
    """Rank 0 prepares, all ranks generate; returns this rank's manifest (None if deferred)."""
    err = None
    if g.rank == 0:
        try:
            _prepare_generate(recipe, force)
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            err = f"{type(e).__name__}: {e}"
    g.share_errors(err, "preparing generate")
    out, err = None, None
    try:
        out = run_stage(recipe, "generate", options=options)
    except StageDeferred as e:
        log.info("%s", e)
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {e}"
    g.share_errors(err, "generate")
    return out


def _run_train(g: _Group, recipe, *, force: bool, options: dict | None) -> list[dict]:
    """The train stage on every rank (data-parallel, :mod:`synthpath.train.distributed`): rank 0
    decides whether it runs and runs it as a stage (its folder, manifest, every artifact); the
    other ranks train alongside it and write nothing. A failure here is not shared: the failing
    process exits, the others' collectives fail with it, and torchrun stops the job."""
    from .train import distributed as D

    run = None
    if g.rank == 0:
        run = force or not is_current(recipe, get_stage("train"))
    box = [run]
    g.dist.broadcast_object_list(box, src=0)
    if not box[0]:
        return [run_stage(recipe, "train", options=options)] if g.rank == 0 else []  # up to date
    with D.shared_group():
        if g.rank == 0:
            return [run_stage(recipe, "train", force=force, options=options)]
        log.info("rank %d of %d trains its share of every step of the train stage", g.rank, g.world)
        D.run_train_worker(recipe, force=True, options=options)
    return []


def generate_ranked(recipe, *, force: bool = False, options: dict | None = None) -> dict | None:
    """``synthpath generate`` under torchrun."""
    with _Group() as g:
        return _run_generate(g, recipe, force=force, options=options)


def build_ranked(recipe, *, force: tuple[str, ...] = (), until: str | None = None, options: dict | None = None,
                 only: tuple[str, ...] | None = None) -> list[dict]:
    """``synthpath build`` under torchrun (see the module docstring). Returns the manifests
    of the stages this rank ran or saw finished."""
    names = []
    for st in stages():
        if (only is None or st.name in only) and not (st.name == "evaluate" and not recipe.evaluate.enabled):
            names.append(st.name)
        if until and st.name == until:
            break
    cut = names.index("generate") if "generate" in names else len(names)
    before, after = names[:cut], names[cut + 1:]
    out: list[dict] = []
    with _Group() as g:
        # the single-process stages around train on rank 0; train itself on every rank
        cut_train = before.index("train") if "train" in before else len(before)
        for part in (before[:cut_train], ["train"] if "train" in before else [], before[cut_train + 1:]):
            if part == ["train"]:
                out += _run_train(g, recipe, force="train" in force, options=options)
                continue
            err = None
            if g.rank == 0 and part:
                try:
                    out += build(recipe, force=tuple(f for f in force if f in part), options=options,
                                 only=tuple(part), until=part[-1])
                except Exception as e:  # noqa: BLE001
                    err = f"{type(e).__name__}: {e}"
            g.share_errors(err, f"{', '.join(part) or 'nothing'} (on rank 0)")
        # a forced stage before generate makes generate stale by its fingerprint; a forced
        # generate is forced here, once, by rank 0
        if "generate" in names:
            m = _run_generate(g, recipe, force="generate" in force, options=options)
            if m is not None:
                out.append(m)
        if g.rank == 0 and after:
            out += build(recipe, force=tuple(f for f in force if f in after), options=options, only=tuple(after))
    return out


__all__ = ["rank_world", "under_torchrun", "build_ranked", "generate_ranked"]
