"""The ``generate`` stage: bulk synthesis of slides, packed into WebDataset shards.

The slide is the unit of work. The plan (:mod:`synthpath.generate.plan`) is computed
identically by every worker; it splits the slides into fixed *groups* of consecutive
slides (``generate.slides_per_group``) whose tiles share model batches.

Work split. A worker's rank and the world size come from ``RANK``/``WORLD_SIZE``
(torchrun), else ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT`` (a Slurm array), else
0/1. Group ``g`` belongs to rank ``g % world``, so any number of workers up to the number of
groups is used. There is no collective communication: workers share only the file system.

Resume. Every worker writes into the same stage workdir, ``<output_dir>/generate.partial``
(the pipeline keeps it while its fingerprint matches). A finished slide is written as
``work/<slide_id>.tar`` (its samples' members, a deterministic tar), then its TIFF (if
``export.slides``) sits in ``slides/``, and last its done-marker ``work/<slide_id>.done.json``
(sha256, count, the tiles synthesis made). A worker skips groups whose slides are all
finished and redoes a group with any slide missing, *whole*: batch composition is a
function of the plan, never of where a run stopped, so a resumed run is byte-identical to
an uninterrupted one. A kill loses at most the group in flight.

Finalising. After its own groups, a worker checks whether all slides are finished. The
one that sees them all (and, with several workers, wins an exclusive claim file) packs the
shards from the slide tars (:mod:`synthpath.generate.packing`; shards are packing only),
writes ``shards/index.json``, removes ``work/`` and any temp file of killed workers, and
returns the stage summary; the pipeline renames ``generate.partial`` to ``generate``. A
worker that still sees slides pending raises :class:`ShardsPending` (a ``StageDeferred``)
after its own work is on disk. Re-running ``synthpath generate`` with no rank variables
makes whatever is missing and finalises. Canvases (memory maps of big slides) live in
``<output_dir>/.canvas/``, outside the stage folder, and are removed by their worker.

Every tile passes the audit's release filter: it is given to synthesis as ``tile_filter``
(flagged tiles are resampled there), and each stack is checked again before it is written;
a slide whose stack is still flagged is re-synthesised with a derived seed (``attempt`` in
the sample's JSON), at most ``generate.max_filter_retries`` times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from ..audit.gate import require_release
from ..pipeline import StageContext, StageError
from .packing import finalise, pack_all, slide_finished
from .plan import GenerationPlan, SamplePlan, make_plan
from .slidework import MEMMAP_BYTES, GroupSynth, crop_stack, sample_meta
from .writers import clear_unit, sample_members, write_json_atomic, write_unit

log = logging.getLogger("synthpath.generate")

__all__ = ["run", "rank_world", "resolve_device", "weights_hash", "finalise",
           "sample_meta", "crop_stack", "write_slide_tiff", "ShardsPending", "MEMMAP_BYTES"]


from .. import pipeline as _pipeline

# If the pipeline knows "this worker did its share; another one finalises" (a
# ``StageDeferred`` exception it treats as success without renaming the folder), use it;
# otherwise a pending worker ends with a StageError, which also keeps the folder unrenamed.
_DeferBase = getattr(_pipeline, "StageDeferred", StageError)


class ShardsPending(_DeferBase):
    """This worker finished its shards but others' are still missing (or another worker is
    finalising); the stage is not finalised by this process (see the module docstring)."""


def rank_world(env: dict | None = None) -> tuple[int, int]:
    """(rank, world size) from torchrun or Slurm array variables; (0, 1) by default
    (see :func:`synthpath.distributed.rank_world`)."""
    from ..distributed import rank_world as _rank_world

    return _rank_world(env)


def resolve_device(name: str, env: dict | None = None) -> torch.device:
    """``generate.device`` -> a torch device. ``auto``/``cuda`` under torchrun pick the
    worker's own GPU (``LOCAL_RANK``), so the workers of one node do not share GPU 0."""
    env = os.environ if env is None else env
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in env and torch.cuda.is_available():
        name = f"cuda:{int(env['LOCAL_RANK']) % torch.cuda.device_count()}"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StageError(f"generate.device is {name!r} but CUDA is not available")
    return dev


def weights_hash(path: Path) -> str:
    """Hash of a safetensors file's *content*: tensor names, dtypes, shapes and bytes in
    name order. (The file's own bytes also depend on header key order and metadata, which
    differ between equal checkpoints.)"""
    import struct

    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        for name in sorted(k for k in header if k != "__metadata__"):
            info = header[name]
            h.update(json.dumps([name, info["dtype"], info["shape"]]).encode())
            lo, hi = info["data_offsets"]
            f.seek(base + lo)
            left = hi - lo
            while left:
                b = f.read(min(left, 1 << 20))
                if not b:
                    raise StageError(f"{path} is truncated (tensor {name!r})")
                h.update(b)
                left -= len(b)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- slides
def write_slide_tiff(pyramid, path: Path) -> None:
    """A synthetic slide (a synthesis ``Pyramid``) as a pyramidal TIFF, written atomically."""
    from .tiff import write_pyramid_tiff

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.tiff")
    try:
        write_pyramid_tiff(pyramid, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_slide(s: int, made: dict, plan: GenerationPlan, *, model_hash: str, expect: dict, work_dir: Path,
                slides_dir: Path | None, on_sample: Callable[[SamplePlan], None] | None = None) -> dict:
    """Write one finished slide: its TIFF (if wanted), then its samples' tar and last its
    done-marker. Returns the marker."""
    sp = plan.slides[s]
    if slides_dir is not None:
        write_slide_tiff(made["pyramid"], slides_dir / f"{sp.slide_id}.tiff")
    members: dict[str, bytes] = {}
    hist: Counter = Counter()
    for i in sp.samples:
        sample = plan.samples[i]
        tiles = crop_stack(made["levels"], sample, plan.tile_px)
        images = {p.name: t for p, t in zip(sample.position, tiles)}
        members.update(sample_members(sample.key, images, sample.label,
                                      sample_meta(sample, plan, model_hash=model_hash, attempt=made["attempt"])))
        hist[sample.label_name] += 1
    marker = dict(expect, slide_id=sp.slide_id, count=len(sp.samples), keys=[plan.samples[i].key for i in sp.samples],
                  label_histogram=dict(sorted(hist.items())), attempt=made["attempt"],
                  tiles_generated=list(made["generated"]), filtered=int(made["filtered"]))
    out = write_unit(work_dir, sp.slide_id, members, marker)
    if on_sample is not None:
        for i in sp.samples:
            on_sample(plan.samples[i])
    return out


# ----------------------------------------------------------------------------- stage
def _load_model_and_filter(ctx: StageContext, device: torch.device):
    """The generation model (EMA weights, eval mode, prepared for the device) and the
    release filter. The one place the production path prepares its model."""
    from ..audit.filter import ReleaseFilter
    from ..models.checkpoint import load_model

    from ..models.prepare import prepare_model

    model = prepare_model(load_model(ctx.inputs["train"], device, ema=True), device,
                          compile=bool(ctx.recipe.generate.compile))
    flt = ReleaseFilter.load(ctx.inputs["audit"], device)
    return model, flt


def run(ctx: StageContext) -> dict:
    """Stage entry: this worker's groups of slides, then (if all slides are done) packing
    and the stage summary."""
    recipe = ctx.recipe
    rank, world = rank_world(ctx.options.get("env"))
    passed, overridden = require_release(ctx)
    plan = make_plan(recipe, ctx.inputs["ingest"], ctx.inputs.get("train"))
    work_dir = ctx.workdir / "work"
    work_dir.mkdir(parents=True, exist_ok=True)
    (ctx.workdir / "shards").mkdir(parents=True, exist_ok=True)
    want_tiff = bool(recipe.export.slides)
    slides_dir = ctx.workdir / "slides" if want_tiff else None
    write_json_atomic(ctx.workdir / "plan.json", plan.to_json())

    weights = Path(ctx.inputs["train"]) / "model.safetensors"
    if not weights.is_file():
        raise StageError(f"the trained model {weights} is missing; run `synthpath train` first")
    model_hash = weights_hash(weights)
    expect = {"plan_hash": plan.digest(), "model_hash": model_hash,
              "recipe_hash": recipe.section_hash("generate", "sampler")}

    def finished(s: int, verify: bool = True) -> dict | None:
        return slide_finished(plan, s, ctx.workdir, expect, want_tiff=want_tiff, verify_hash=verify)

    mine = plan.groups_for_rank(rank, world)
    to_make = [g for g in mine if not all(finished(s) for s in plan.group_slides(g))]
    log.info("generate: rank %d of %d owns %d of %d groups (%d slides each); %d to do", rank, world, len(mine),
             plan.n_groups, plan.slides_per_group, len(to_make))

    t0 = time.time()
    n_samples = n_slides = 0
    synth = None
    if to_make:
        from tqdm.auto import tqdm

        device = resolve_device(recipe.generate.device, ctx.options.get("env"))
        model, flt = _load_model_and_filter(ctx, device)
        canvas_dir = recipe.output_dir / ".canvas" / f"generate-r{rank}-{os.getpid()}"
        synth = GroupSynth(model, plan, recipe, device, tile_filter=flt, canvas_dir=canvas_dir)
        total = sum(len(plan.slides[s].samples) for g in to_make for s in plan.group_slides(g))
        hook = ctx.options.get("on_sample")
        with tqdm(total=total, unit="sample", desc=f"generate r{rank}/{world}", disable=ctx.options.get("quiet")) as bar:
            def on_sample(sample: SamplePlan) -> None:
                nonlocal n_samples
                n_samples += 1
                bar.update(1)
                if hook is not None:
                    hook(sample)

            try:
                for g in to_make:
                    group = plan.group_slides(g)
                    todo = [s for s in group if not finished(s)]
                    for s in todo:
                        clear_unit(work_dir, plan.slides[s].slide_id)
                    made = synth.group(group)  # the whole group: its batches are fixed by the plan
                    for s in todo:
                        write_slide(s, made[s], plan, model_hash=model_hash, expect=expect, work_dir=work_dir,
                                    slides_dir=slides_dir, on_sample=on_sample)
                        n_slides += 1
                    del made
                    dt = max(time.time() - t0, 1e-9)
                    bar.set_postfix(slides_s=f"{n_slides / dt:.3f}", tiles_s=f"{synth.tiles_made / dt:.1f}")
                    log.info("generate: group %d (slides %s) done (%d slides so far, %.1f s, %.2f tiles/s)", g,
                             ", ".join(plan.slides[s].slide_id for s in group), n_slides, dt, synth.tiles_made / dt)
                    for p in canvas_dir.glob("*.npy"):  # memory-mapped canvases of the finished group
                        p.unlink(missing_ok=True)
            finally:
                shutil.rmtree(canvas_dir, ignore_errors=True)
                try:
                    canvas_dir.parent.rmdir()  # .canvas/, once no worker uses it
                except OSError:
                    pass
    seconds = time.time() - t0

    # a cheap poll (marker and size; this worker's own slides were hashed above); the
    # finalising worker then checks the other workers' sha256s once
    mine_slides = {s for g in mine for s in plan.group_slides(g)}
    pending = [s for s in range(len(plan.slides)) if finished(s, verify=False) is None]
    if pending:
        raise ShardsPending(
            f"rank {rank} of {world} finished its slides; {len(pending)} of {len(plan.slides)} slides "
            f"({', '.join(plan.slides[s].slide_id for s in pending[:5])}{' ...' if len(pending) > 5 else ''}) are "
            f"still being made by other workers in {ctx.workdir}. The stage is finalised by the worker that finishes "
            f"last, or by re-running `synthpath generate` (without rank variables) after all workers are done."
        )
    if world > 1 and not _claim_finalise(ctx.workdir, rank):
        raise ShardsPending(f"rank {rank} of {world}: all slides are done and another worker is finalising "
                            f"{ctx.workdir}; if it was killed, re-run `synthpath generate` without rank variables")
    try:
        slide_markers = {s: finished(s, verify=s not in mine_slides) for s in range(len(plan.slides))}
        bad = [plan.slides[s].slide_id for s, m in slide_markers.items() if m is None]
        if bad:
            raise StageError(f"slides {', '.join(bad[:5])} in {work_dir} do not match their sha256 markers; delete "
                             f"them (and their .done.json) and re-run `synthpath generate`")
        markers = pack_all(plan, ctx.workdir, expect, slide_markers)
        return finalise(ctx.workdir, plan, markers, expect, audit_passed=passed, audit_overridden=overridden,
                        rank=rank, world=world, seconds=seconds, samples_made=n_samples, slides_made=n_slides,
                        tiles_made=synth.tiles_made if synth else 0, slide_markers=slide_markers,
                        mean_batch_fill=synth.mean_batch_fill() if synth else None,
                        batch_size=int(recipe.generate.batch_size),
                        filter_stats=getattr(synth.tile_filter, "stats", None) if synth else None)
    except BaseException:
        (ctx.workdir / ".finalised_by.json").unlink(missing_ok=True)  # let a re-run finalise
        raise


def _claim_finalise(workdir: Path, rank: int) -> bool:
    """Exactly one of several workers that all see every slide finished wins this (an
    exclusive file create), so the stage folder is packed and renamed once."""
    try:
        fd = os.open(workdir / ".finalised_by.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"rank": rank, "pid": os.getpid(), "time": time.time()}, f)
    return True
