"""Data-parallel training: one process per GPU through ``torchrun`` (or Slurm's ``srun``).

The environment names the process: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT`` (torchrun), or ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` with
``MASTER_ADDR``/``MASTER_PORT`` exported by the batch script (srun). ``torch.distributed``
runs on NCCL with GPUs and gloo on the CPU.

One logical step on ``W`` processes (see docs/architecture.md, "Training on several GPUs"):

1. rank 0 draws the step's units (Poisson under DP, from its private stream) and broadcasts
   the list: the sampling is global, so the accountant's q is the one used;
2. the batch is cut into the same physical chunks as on one process, and chunk ``j`` goes to
   rank ``j mod W``; the public row randomness of a chunk (tile draws, t, noise, dropout) is
   seeded from (recipe seed, step, j), so a chunk's rows are the same whichever rank runs it;
3. every rank accumulates its chunks' gradients (non-DP: the mean's share; DP: the sum of
   clipped unit gradients, each whole unit -- every row of a tile or a patient -- on one rank);
4. under DP, rank 0 adds the Gaussian noise, drawn from its private stream, to its own sum;
5. one all-reduce (sum) of the flattened gradient, the same on every rank afterwards, so the
   optimiser step leaves every replica identical (what DDP's gradient averaging does; done
   once per logical step after accumulation, which also allows ranks with different numbers
   of chunks under Poisson sampling).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

log = logging.getLogger("synthpath.train")
_OURS = False  # whether this module opened the process group (data-parallel training)
_SHARED = False  # the stage runner's group is lent to training (``build`` under torchrun, see shared_group)
_NCCL = None  # NCCL group for gradients when the lent group is gloo and training runs on GPUs


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # where collectives run (the GPU under NCCL)
    group: object = None  # process group of the gradient all-reduce (None: the default group)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def broadcast_object(self, obj):
        """``obj`` from rank 0 on every rank."""
        if not self.active:
            return obj
        box = [obj if self.main else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Element-wise sums over ranks, in one flat all-reduce."""
        if not self.active or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1).float().to(self.device or t.device) for t in tensors])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM, group=self.group)
        out, i = [], 0
        for t in tensors:
            out.append(flat[i:i + t.numel()].view(t.shape).to(device=t.device, dtype=t.dtype))
            i += t.numel()
        return out

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def check_replicas(self, step: int, *modules: torch.nn.Module) -> None:
        """Raise unless every rank starts at the same step with bit-identical weights (a rank
        that resumed another checkpoint, or could not see rank 0's folder, would otherwise
        train a diverging replica while the all-reduce still succeeds)."""
        if not self.active:
            return
        h = hashlib.sha256(str(step).encode())
        for m in modules:
            for k, v in m.state_dict().items():
                h.update(k.encode())
                h.update(v.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        seen: list = [None] * self.world
        tdist.all_gather_object(seen, (step, h.hexdigest()))
        if len({d for _, d in seen}) > 1:
            raise RuntimeError("the ranks do not hold the same training state: " + "; ".join(
                f"rank {r} at step {s} (weights {d[:12]})" for r, (s, d) in enumerate(seen))
                + "; every rank must see rank 0's train folder (a shared file system)")

    def my_chunks(self, chunks: list) -> list[tuple[int, list]]:
        """``(global chunk index, chunk)`` for the chunks this rank runs."""
        return [(j, c) for j, c in enumerate(chunks) if j % self.world == self.rank]


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or Slurm's environment; (0, 1, 0) if neither."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def context(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join (or create) the process group the environment describes; returns the context and
    this process's device (``cuda:LOCAL_RANK`` on GPUs)."""
    global _OURS, _NCCL
    rank, world, local = env_world()
    if world <= 1:
        return DistContext(), device
    if tdist.is_initialized() and not _OURS and not _SHARED:
        # a group opened by the pipeline's own runner (``build`` under torchrun: rank 0 runs
        # the single-process stages while the others wait): train on this process alone
        log.info("train runs on rank %d alone (the process group belongs to the stage runner); use "
                 "`torchrun ... synthpath train` for data-parallel training", rank)
        return DistContext(), device
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    joined = tdist.is_initialized()  # already joined (a worker rank's CLI): no second barrier
    if not joined:
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local))
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        _OURS = True
    if tdist.get_world_size() != world or tdist.get_rank() != rank:
        raise RuntimeError(f"process group is rank {tdist.get_rank()} of {tdist.get_world_size()}, "
                           f"the environment says {rank} of {world}")
    group = None
    if _SHARED and device.type == "cuda" and tdist.get_backend() != "nccl":
        if _NCCL is None:  # every rank creates it at the same point (train's first lines), once
            _NCCL = tdist.new_group(backend="nccl")
        group = _NCCL
    ctx = DistContext(rank=rank, world=world, local_rank=local, device=device, group=group)
    if not joined:
        ctx.barrier()
    return ctx, device


@contextlib.contextmanager
def shared_group():
    """Within the block, :func:`context` trains data-parallel on the process group the stage
    runner opened (``synthpath build`` under torchrun: gloo for its barriers, plus an NCCL
    group for the gradients when training runs on GPUs) instead of on rank 0 alone."""
    global _SHARED, _NCCL
    _SHARED = True
    try:
        yield
    finally:
        _SHARED, _NCCL = False, None


def is_worker_rank() -> bool:
    """True in a data-parallel process other than rank 0."""
    rank, world, _ = env_world()
    return world > 1 and rank != 0


def run_train_worker(recipe, *, force: bool = False, options: dict | None = None) -> dict:
    """``synthpath train`` (or the train stage of ``synthpath build``) on a rank other than 0:
    rank 0 runs the stage (its folder, manifest and every artifact); this rank trains alongside
    it in rank 0's ``train.partial`` folder and writes nothing. It joins the process group
    first, and reads that folder only as rank 0 directs (:func:`~synthpath.train.trainer.train`)."""
    from ..pipeline import fingerprint, get_stage, read_manifest, stage_dir
    from .trainer import resolve_device, train

    stage = get_stage("train")
    fp, _ = fingerprint(recipe, stage)
    existing = read_manifest(stage_dir(recipe, "train"))
    if existing is not None and existing.get("fingerprint") == fp and not force:
        return existing  # rank 0 skips the up-to-date stage too
    context(resolve_device(recipe.train.device))
    opts = options or {}
    summary = train(recipe, stage_dir(recipe, "ingest"), recipe.output_dir / "train.partial",
                    stop_after=opts.get("train_stop_after"), progress=False)
    return {"stage": "train", "summary": summary}


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    """Seed of a chunk's public row randomness: a stable hash of (recipe seed, step, chunk)."""
    h = hashlib.sha256(f"synthpath-rows/{seed}/{step}/{chunk}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)
