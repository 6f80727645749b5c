"""The ``generate`` stage: bulk synthesis into WebDataset shards, sharded over workers.

Work split. The plan (:mod:`synthpath.generate.plan`) is computed identically by every
worker. A worker's rank and the world size come from ``RANK``/``WORLD_SIZE`` (torchrun),
else ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT`` (a Slurm array), else 0/1. Shard
``i`` belongs to rank ``i % world``. There is no collective communication: workers share
only the file system.

Resume. Every worker writes into the same stage workdir, ``<output_dir>/generate.partial``
(the pipeline keeps it while its fingerprint matches). Its shards go to ``shards/`` through
:func:`synthpath.generate.writers.write_shard` (temp name, rename, then a done-marker). On
start a worker skips its shards whose marker and sha256 check out and redoes the others, so
a killed run, re-run, ends with exactly the planned samples.

Finalising with several workers. After its own shards, a worker checks whether *all*
planned shards are finished. The one that sees them all finished returns the stage
summary, and the pipeline renames ``generate.partial`` to ``generate``. A worker that
still sees other ranks' shards pending raises :class:`ShardsPending` (a ``StageError``)
after its own work is safely on disk, so the pipeline does not finalise a half-made stage;
rerunning ``synthpath generate`` once all workers are done (any rank, or no rank
variables at all) then only verifies the shards and finalises. With Slurm arrays, run a
final single task (``WORLD_SIZE`` unset) after the array, or let the last task finish it.

Every tile passes the audit's release filter: it is given to synthesis as
``tile_filter`` (flagged tiles are resampled there), and each stack is checked again
before it is written; a slide whose stack is still flagged is re-synthesised with a
derived seed (``attempt`` in the sample's JSON), at most ``generate.max_filter_retries``
times.
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

import numpy as np
import torch

from ..pipeline import ReleaseBlocked, StageContext, StageError
from .plan import GenerationPlan, SamplePlan, grid_factor, make_plan, stable_seed
from .writers import clear_partial, finished_marker, sample_members, shard_name, write_json_atomic, write_shard

log = logging.getLogger("synthpath.generate")

#: slides (all levels being made at once) larger than this are kept as memory maps on disk
MEMMAP_BYTES = 2 << 30


from .. import pipeline as _pipeline

# If the pipeline knows "this worker did its share; another one finalises" (a
# ``StageDeferred`` exception it treats as success without renaming the folder), use it;
# otherwise a pending worker ends with a StageError, which also keeps the folder unrenamed.
_DeferBase = getattr(_pipeline, "StageDeferred", StageError)


class ShardsPending(_DeferBase):
    """This worker finished its shards but others' are still missing (or another worker is
    finalising); the stage is not finalised by this process (see the module docstring)."""


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


def audit_passed(audit_dir: Path) -> tuple[bool, dict]:
    """Read ``audit/report.json``: (passed, report). A missing or unreadable report is an
    error, never a pass."""
    path = Path(audit_dir) / "report.json"
    if not path.is_file():
        raise StageError(f"the audit report {path} is missing; run `synthpath audit` first")
    try:
        rep = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StageError(f"the audit report {path} cannot be read: {e}") from None
    if not isinstance(rep, dict) or not isinstance(rep.get("passed"), bool):
        raise StageError(f"the audit report {path} has no boolean 'passed' key")
    return rep["passed"], rep


def release_allowed(ctx: StageContext, audit_dir: Path) -> tuple[bool, bool]:
    """(audit passed, override used). Raises :class:`ReleaseBlocked` if the audit failed
    and neither ``--allow-failed-audit`` nor ``export.allow_failed_audit`` is set."""
    passed, rep = audit_passed(audit_dir)
    override = bool(ctx.options.get("allow_failed_audit")) or bool(ctx.recipe.export.allow_failed_audit)
    if not passed and not override:
        failed = [k for k, v in (rep.get("checks") or {}).items() if isinstance(v, dict) and v.get("passed") is False]
        raise ReleaseBlocked(
            f"the audit in {audit_dir / 'report.json'} failed (checks: {', '.join(failed) or 'see report.md'}); "
            f"nothing is released. Fix the model (more privacy, more data) or pass --allow-failed-audit "
            f"(the dataset card then says so first)"
        )
    return passed, (not passed and override)


# ----------------------------------------------------------------------------- synthesis
def crop_stack(levels: list[np.ndarray], sample: SamplePlan, tile_px: int) -> list[np.ndarray]:
    """Cut a sample's tiles (coarsest first) out of a slide pyramid."""
    out = []
    for pos, img in zip(sample.position, levels):
        tile = img[pos.y: pos.y + tile_px, pos.x: pos.x + tile_px]
        if tile.shape[:2] != (tile_px, tile_px):
            raise StageError(
                f"sample {sample.key}: level {pos.name} of slide {sample.slide_id} is {img.shape[1]}x{img.shape[0]} px, "
                f"too small for a tile at ({pos.x}, {pos.y})"
            )
        out.append(np.ascontiguousarray(tile))
    return out


def _to_filter_input(tiles: list[np.ndarray], device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(np.stack(tiles)).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class SlideSynth:
    """Synthesises whole slides for the plan (model, sampler, filter bound once), with a
    small cache so a slide whose samples span two shards is made once per process."""

    def __init__(self, model, plan: GenerationPlan, recipe, device: torch.device, tile_filter=None,
                 canvas_dir: Path | None = None):
        self.model = model
        self.plan = plan
        self.recipe = recipe
        self.device = device
        self.tile_filter = tile_filter
        self.max_retries = int(recipe.generate.max_filter_retries)
        self._cache: dict[int, tuple[list[np.ndarray], int, object]] = {}
        self.tiles_made = 0
        self.n_filtered = 0  # tiles the filter sent back inside synthesis
        self.canvas_dir = canvas_dir

    def _synth(self, slide_indices: list[int], attempts: dict[int, int]) -> dict[int, tuple[list[np.ndarray], object]]:
        from . import synthesis

        plan = self.plan
        specs = []
        for s in slide_indices:
            sp = plan.slides[s]
            seed = sp.seed if attempts[s] == 0 else stable_seed("synthpath-retry", sp.seed, attempts[s])
            specs.append((sp.label, seed))
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else torch.autocast("cpu", enabled=False))
        # big slides keep their levels as memory maps on disk, so RAM holds only tiles in flight
        canvas = self.canvas_dir if self.slide_bytes() * len(specs) > MEMMAP_BYTES else None
        with torch.no_grad(), autocast:
            pyrs = synthesis.synthesize_slides(
                self.model, [lab for lab, _ in specs], plan.layout_tiles, plan.levels, [sd for _, sd in specs],
                sampler=self.recipe.sampler, tile_filter=self.tile_filter, device=self.device,
                batch_size=self.recipe.generate.batch_size, max_retries=self.max_retries, workdir=canvas)
        out = {}
        for s, pyr in zip(slide_indices, pyrs):
            levels = [np.asarray(a) for a in pyr.levels]
            for k, a in enumerate(levels):
                want = plan.slide_px(k)
                if a.dtype != np.uint8 or a.shape != (*want, 3):
                    raise StageError(f"synthesis returned level {k} of slide {plan.slides[s].slide_id} as "
                                     f"{a.dtype} {a.shape}; expected uint8 {(*want, 3)}")
            out[s] = (levels, pyr)
            self.n_filtered += int(getattr(pyr, "n_filtered", 0))
            self.tiles_made += sum(getattr(pyr, "tiles_per_level", None) or [
                plan.layout_tiles[0] * plan.layout_tiles[1] * grid_factor(plan.levels, k) ** 2
                for k in range(len(plan.levels))]) + int(getattr(pyr, "n_filtered", 0))
        return out

    def slide_bytes(self) -> int:
        """RAM one slide's pyramid takes (uint8 RGB, all levels)."""
        return sum(h * w * 3 for h, w in (self.plan.slide_px(k) for k in range(len(self.plan.levels))))

    def slides_per_call(self) -> int:
        """Slides synthesised together (their tiles share batches): as many as fit in
        ``MEMMAP_BYTES`` of canvas, at least one."""
        return max(1, MEMMAP_BYTES // max(1, self.slide_bytes()))

    def _flagged(self, s: int, levels: list[np.ndarray]) -> bool:
        """True if any planned stack of slide ``s`` has a tile the release filter flags."""
        if self.tile_filter is None:
            return False
        stacks = [crop_stack(levels, self.plan.samples[i], self.plan.tile_px) for i in self.plan.slides[s].samples]
        for k in range(len(self.plan.levels)):
            with torch.no_grad():
                flags = self.tile_filter(_to_filter_input([st[k] for st in stacks], self.device), k)
            if bool(torch.as_tensor(flags).any()):
                return True
        return False

    def slides(self, slide_indices: list[int]) -> dict[int, tuple[list[np.ndarray], int, object]]:
        """slide index -> (pyramid levels as arrays, attempt, the synthesis Pyramid)."""
        need = [s for s in slide_indices if s not in self._cache]
        attempts = {s: 0 for s in need}
        while need:
            made = {}
            step = self.slides_per_call()
            for i in range(0, len(need), step):
                made.update(self._synth(need[i:i + step], attempts))
            again = []
            for s in need:
                if self._flagged(s, made[s][0]):
                    if attempts[s] >= self.max_retries:
                        raise StageError(
                            f"slide {self.plan.slides[s].slide_id}: the release filter still flags a tile after "
                            f"{attempts[s] + 1} syntheses (generate.max_filter_retries = {self.max_retries}); the model "
                            f"reproduces training tiles: retrain with more privacy or raise the retry limit"
                        )
                    attempts[s] += 1
                    again.append(s)
                else:
                    self._cache[s] = (made[s][0], attempts[s], made[s][1])
            need = again
        got = {s: self._cache[s] for s in slide_indices}
        keep = set(slide_indices[-1:])  # the last slide may continue in the next shard
        self._cache = {s: v for s, v in self._cache.items() if s in keep}
        return got


# ----------------------------------------------------------------------------- samples
def sample_meta(sample: SamplePlan, plan: GenerationPlan, *, model_hash: str, attempt: int) -> dict:
    """The ``{key}.json`` of a sample."""
    return {
        "key": sample.key,
        "label": sample.label,
        "label_name": sample.label_name,
        "classes": plan.classes,
        "levels": [{"name": p.name, "mpp": p.mpp, "level": p.level} for p in sample.position],
        "position": [{"level": p.name, "row": p.row, "col": p.col, "x": p.x, "y": p.y} for p in sample.position],
        "tile_px": plan.tile_px,
        "seed": sample.seed,
        "slide_seed": sample.slide_seed,
        "attempt": attempt,
        "sample_index": sample.index,
        "slide_id": sample.slide_id,
        "slide_px": [list(plan.slide_px(k)) for k in range(len(plan.levels))],
        "model_hash": model_hash,
        "synthetic": True,
    }


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


def build_shard(shard: int, plan: GenerationPlan, synth: SlideSynth, *, model_hash: str, expect: dict,
                shard_dir: Path, slides_dir: Path | None, on_sample: Callable[[SamplePlan], None] | None = None) -> dict:
    """Synthesise, check and write one shard; returns its done-marker."""
    samples = plan.shard_samples_of(shard)
    slide_ids = sorted({s.slide_index for s in samples})
    members: dict[str, bytes] = {}
    hist: Counter = Counter()
    made = synth.slides(slide_ids)
    if slides_dir is not None:
        for s in slide_ids:
            first = plan.slides[s].samples[0]
            if plan.samples[first].shard == shard:  # the shard holding a slide's first sample owns its TIFF
                write_slide_tiff(made[s][2], slides_dir / f"{plan.slides[s].slide_id}.tiff")
    for sample in samples:
        levels, attempt, _ = made[sample.slide_index]
        tiles = crop_stack(levels, sample, plan.tile_px)
        images = {p.name: t for p, t in zip(sample.position, tiles)}
        members.update(sample_members(sample.key, images, sample.label,
                                      sample_meta(sample, plan, model_hash=model_hash, attempt=attempt)))
        hist[sample.label_name] += 1
        if on_sample is not None:
            on_sample(sample)
    marker = dict(expect, count=len(samples), keys=[s.key for s in samples],
                  label_histogram=dict(sorted(hist.items())))
    return write_shard(shard_dir, shard, members, marker)


# ----------------------------------------------------------------------------- stage
def _load_model_and_filter(ctx: StageContext, device: torch.device):
    from ..audit.filter import ReleaseFilter
    from ..models.checkpoint import load_model

    model = load_model(ctx.inputs["train"], device, ema=True)
    model.eval()
    if ctx.recipe.generate.compile:
        model = torch.compile(model)
    flt = ReleaseFilter.load(ctx.inputs["audit"], device)
    return model, flt


def run(ctx: StageContext) -> dict:
    """Stage entry: this worker's shards, then (if all are done) the stage summary."""
    recipe = ctx.recipe
    rank, world = rank_world(ctx.options.get("env"))
    passed, overridden = release_allowed(ctx, ctx.inputs["audit"])
    plan = make_plan(recipe, ctx.inputs["ingest"], ctx.inputs.get("train"))
    shard_dir = ctx.workdir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    slides_dir = ctx.workdir / "slides" if recipe.export.slides else None
    write_json_atomic(ctx.workdir / "plan.json", plan.to_json())

    weights = Path(ctx.inputs["train"]) / "model.safetensors"
    if not weights.is_file():
        raise StageError(f"the trained model {weights} is missing; run `synthpath train` first")
    model_hash = weights_hash(weights)
    expect = {"plan_hash": plan.digest(), "model_hash": model_hash,
              "recipe_hash": recipe.section_hash("generate", "sampler")}

    mine = plan.shards_for_rank(rank, world)
    to_make = [s for s in mine if finished_marker(shard_dir, s, expect) is None]
    if slides_dir is not None:  # a finished shard whose TIFF went missing is redone
        for s in mine:
            if s in to_make:
                continue
            for sl in {x.slide_index for x in plan.shard_samples_of(s)}:
                first = plan.samples[plan.slides[sl].samples[0]]
                if first.shard == s and not (slides_dir / f"{plan.slides[sl].slide_id}.tiff").is_file():
                    to_make.append(s)
                    break
        to_make.sort()
    log.info("generate: rank %d of %d owns %d of %d shards; %d to do", rank, world, len(mine), plan.n_shards, len(to_make))

    t0 = time.time()
    n_done_samples = 0
    synth = None
    if to_make:
        from tqdm.auto import tqdm

        device = resolve_device(recipe.generate.device, ctx.options.get("env"))
        model, flt = _load_model_and_filter(ctx, device)
        synth = SlideSynth(model, plan, recipe, device, tile_filter=flt, canvas_dir=ctx.workdir / f"canvas_r{rank}")
        total = sum(len(plan.shard_samples_of(s)) for s in to_make)
        hook = ctx.options.get("on_sample")
        slides_seen: set[int] = set()
        with tqdm(total=total, unit="sample", desc=f"generate r{rank}/{world}", disable=ctx.options.get("quiet")) as bar:
            def on_sample(sample: SamplePlan) -> None:
                nonlocal n_done_samples
                n_done_samples += 1
                slides_seen.add(sample.slide_index)
                dt = max(time.time() - t0, 1e-9)
                bar.update(1)
                bar.set_postfix(slides_s=f"{len(slides_seen) / dt:.3f}", tiles_s=f"{synth.tiles_made / dt:.1f}")
                if hook is not None:
                    hook(sample)

            try:
                for s in to_make:
                    clear_partial(shard_dir, s)
                    build_shard(s, plan, synth, model_hash=model_hash, expect=expect, shard_dir=shard_dir,
                                slides_dir=slides_dir, on_sample=on_sample)
                    dt = max(time.time() - t0, 1e-9)
                    log.info("generate: %s done (%d samples so far, %.1f s, %.2f tiles/s, %.3f slides/s)",
                             shard_name(s), n_done_samples, dt, synth.tiles_made / dt, len(slides_seen) / dt)
                    # memory-mapped canvases of finished slides (a mapping still in use stays valid)
                    for p in synth.canvas_dir.glob("*.npy"):
                        p.unlink(missing_ok=True)
            finally:
                shutil.rmtree(synth.canvas_dir, ignore_errors=True)
    seconds = time.time() - t0

    # a cheap poll (marker and size; this worker's own shards were hashed when checked or
    # written above); the finalising worker then checks the other workers' sha256s once
    mine_set = set(mine)
    markers = {s: finished_marker(shard_dir, s, expect, verify_hash=False) for s in range(plan.n_shards)}
    pending = [s for s, m in markers.items() if m is None]
    if pending:
        raise ShardsPending(
            f"rank {rank} of {world} finished its shards; {len(pending)} of {plan.n_shards} shards "
            f"({', '.join(shard_name(s) for s in pending[:5])}{' ...' if len(pending) > 5 else ''}) are still "
            f"being made by other workers in {shard_dir}. The stage is finalised by the worker that finishes last, "
            f"or by re-running `synthpath generate` after all workers are done."
        )
    if world > 1 and not _claim_finalise(ctx.workdir, rank):
        raise ShardsPending(f"rank {rank} of {world}: all shards are done and another worker is finalising {ctx.workdir}")
    bad = [s for s in markers if s not in mine_set and finished_marker(shard_dir, s, expect) is None]
    if bad:
        (ctx.workdir / ".finalised_by.json").unlink(missing_ok=True)
        raise StageError(f"shards {', '.join(shard_name(s) for s in bad[:5])} in {shard_dir} do not match their "
                         f"sha256 markers; delete them (and their .done.json) and re-run `synthpath generate`")
    return finalise(ctx.workdir, plan, markers, expect, audit_passed=passed, audit_overridden=overridden,
                    rank=rank, world=world, seconds=seconds, samples_made=n_done_samples,
                    tiles_made=synth.tiles_made if synth else 0,
                    filtered_in_synthesis=synth.n_filtered if synth else 0,
                    filter_stats=getattr(synth.tile_filter, "stats", None) if synth else None)


def _claim_finalise(workdir: Path, rank: int) -> bool:
    """Exactly one of several workers that all see every shard finished wins this (an
    exclusive file create), so the stage folder is renamed once."""
    try:
        fd = os.open(workdir / ".finalised_by.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"rank": rank, "pid": os.getpid(), "time": time.time()}, f)
    return True


def finalise(workdir: Path, plan: GenerationPlan, markers: dict[int, dict], expect: dict, **info) -> dict:
    """Check the union of shards is exactly the plan, write ``shards/index.json`` and
    return the stage summary."""
    keys = [k for s in sorted(markers) for k in markers[s]["keys"]]
    planned = [s.key for s in plan.samples]
    if keys != planned:
        missing = sorted(set(planned) - set(keys))[:5]
        dup = [k for k, n in Counter(keys).items() if n > 1][:5]
        raise StageError(f"the shards in {workdir / 'shards'} do not match the plan: missing {missing}, duplicated {dup}")
    hist: Counter = Counter()
    for m in markers.values():
        hist.update(m["label_histogram"])
    index = {
        "n_samples": len(keys),
        "n_shards": plan.n_shards,
        "shards": [{"file": markers[s]["file"], "count": markers[s]["count"], "sha256": markers[s]["sha256"]}
                   for s in sorted(markers)],
        **expect,
    }
    write_json_atomic(workdir / "shards" / "index.json", index)
    secs = info.pop("seconds", 0.0)
    samples_made = info.pop("samples_made", 0)
    tiles_made = info.pop("tiles_made", 0)
    slides_dir = workdir / "slides"
    return {
        "n_samples": len(keys),
        "n_slides": len(plan.slides),
        "n_shards": plan.n_shards,
        "levels": plan.level_names,
        "mpp": plan.levels,
        "tile_px": plan.tile_px,
        "layout_tiles": list(plan.layout_tiles),
        "label_histogram": dict(sorted(hist.items())),
        "label_source": plan.label_source,
        "slide_tiffs": sorted(p.name for p in slides_dir.glob("*.tiff")) if slides_dir.is_dir() else [],
        "this_run": {"samples": samples_made, "tiles": tiles_made, "seconds": round(secs, 3),
                     "tiles_per_s": round(tiles_made / secs, 3) if secs > 0 and tiles_made else None},
        **expect,
        **info,
    }
