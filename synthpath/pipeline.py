"""The stage pipeline: typed artifacts in folders, each with a manifest.

A stage is a function ``run(ctx) -> summary`` that writes into ``ctx.workdir``. The
workdir is ``<output_dir>/<stage>.partial``; when the stage returns, a
``manifest.json`` is written there and the folder is renamed to ``<output_dir>/<stage>``
in one step, so a half-finished stage never looks finished.

A stage's *fingerprint* is the hash of the recipe sections it reads plus the manifest
hashes of the stages it reads from. ``build`` skips a stage whose finished manifest has
the current fingerprint and re-runs it, and so everything downstream, when it changes.
A ``.partial`` folder whose ``fingerprint.json`` matches is kept, so resumable stages
(train, generate) carry on where an interrupted run stopped.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__
from .atomic import write_json
from .interrupt import Interrupted, critical
from .recipe import Recipe

log = logging.getLogger("synthpath")

MANIFEST = "manifest.json"


class StageError(RuntimeError):
    """A stage failed in a way the user must act on (the message says how)."""


class ReleaseBlocked(StageError):
    """The audit failed, so nothing may be exported."""


class StageDeferred(StageError):
    """This worker did its share, but the stage is not finished yet (other workers of a
    torchrun/Slurm job still run). Not a failure: the CLI prints it and exits 0, and the
    ``.partial`` folder is left for the worker that completes the stage."""


@dataclass
class StageContext:
    recipe: Recipe
    name: str
    workdir: Path  # write here; it becomes the stage's folder when the stage returns
    inputs: dict[str, Path]  # upstream stage name -> finished folder
    options: dict = field(default_factory=dict)  # CLI options (strict, allow_failed_audit, ...)

    @property
    def output_dir(self) -> Path:
        return self.recipe.output_dir


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # recipe sections this stage reads
    inputs: tuple[str, ...]  # upstream stages whose artifacts it reads
    run: Callable[[StageContext], dict]
    help: str = ""
    # called even when the stage's output is up to date: returns True to re-run it anyway,
    # or raises to refuse (the release gate of generate and export, a failed audit)
    precheck: Callable[[Recipe, dict], bool] | None = None
    # inputs from outside the run folder that the stage reads (e.g. train.init_from's weights):
    # returns a dict of their content hashes, part of the fingerprint, so that new contents at
    # the same path re-run the stage
    external: Callable[[Recipe], dict] | None = None


ORDER = ("ingest", "train", "audit", "generate", "export", "evaluate")


def _registry() -> dict[str, Stage]:
    """The built-in stages by name (see :mod:`synthpath.stages`)."""
    from .stages import BUILTIN

    return {s.name: s for s in BUILTIN}


def stages() -> list[Stage]:
    """The stages in pipeline order."""
    reg = _registry()
    return [reg[n] for n in ORDER if n in reg]


def get_stage(name: str) -> Stage:
    known = {s.name: s for s in stages()}
    if name not in known:
        raise StageError(f"unknown stage {name!r}; stages are {', '.join(known)}")
    return known[name]


def stage_dir(recipe: Recipe, name: str) -> Path:
    return recipe.output_dir / name


def read_manifest(folder: Path) -> dict | None:
    p = folder / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def manifest_hash(manifest: dict) -> str:
    core = {k: manifest[k] for k in ("stage", "fingerprint", "finished_at") if k in manifest}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(recipe: Recipe, stage: Stage) -> tuple[str, dict[str, str]]:
    """The stage's fingerprint and the input manifest hashes it was made from."""
    input_hashes: dict[str, str] = {}
    for up in stage.inputs:
        m = read_manifest(stage_dir(recipe, up))
        if m is None:
            raise StageError(
                f"stage {stage.name!r} needs the output of {up!r}, which is missing in {stage_dir(recipe, up)}; "
                f"run `synthpath {up}` (or `synthpath build`) first"
            )
        input_hashes[up] = manifest_hash(m)
    core = {"stage": stage.name, "sections": recipe.section_hash(*stage.sections), "inputs": input_hashes}
    external = stage.external(recipe) if stage.external is not None else None
    if external:  # only when there is one, so that other runs keep their fingerprints
        core["external"] = external
    blob = json.dumps(core, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], input_hashes


def is_current(recipe: Recipe, stage: Stage) -> bool:
    m = read_manifest(stage_dir(recipe, stage.name))
    if m is None:
        return False
    try:
        fp, _ = fingerprint(recipe, stage)
    except StageError:
        return False
    return m.get("fingerprint") == fp


_TEMP_NAME = re.compile(r"\.tmp\d*(\.[A-Za-z0-9]+)?$")


def remove_temp_files(folder: Path) -> list[Path]:
    """Delete temp files and folders (``x.tmp``, ``x.tmp<pid>``, ``x.tmp.png``, ``.x.tmp<pid>``)
    that an interrupted atomic writer left under ``folder``, so none survives into a
    finished stage folder; returns what was removed."""
    gone: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return gone
    for p in sorted(folder.rglob("*"), key=lambda q: len(q.parts), reverse=True):  # deepest first
        if _TEMP_NAME.search(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def run_stage(recipe: Recipe, name: str, *, force: bool = False, options: dict | None = None) -> dict:
    """Run one stage if its output is missing or stale (or ``force``); return its manifest."""
    stage = get_stage(name)
    final = stage_dir(recipe, name)
    fp, input_hashes = fingerprint(recipe, stage)
    existing = read_manifest(final)
    if existing is not None and existing.get("fingerprint") == fp and not force and stage.precheck is not None:
        force = bool(stage.precheck(recipe, dict(options or {})))
    if existing is not None and existing.get("fingerprint") == fp and not force:
        log.info("stage %s is up to date (%s); skipping", name, final)
        return existing

    recipe.output_dir.mkdir(parents=True, exist_ok=True)
    work = recipe.output_dir / f"{name}.partial"
    fp_file = work / "fingerprint.json"
    if work.exists():
        try:
            same = json.loads(fp_file.read_text()).get("fingerprint") == fp
        except FileNotFoundError:
            # Another worker of the same job may have just created the folder and not yet
            # written its fingerprint: adopt the folder rather than wipe its work.
            same = not force
        except (OSError, json.JSONDecodeError):
            same = False
        if force or not same:
            shutil.rmtree(work)
        else:
            log.info("resuming stage %s from %s", name, work)
    work.mkdir(parents=True, exist_ok=True)
    if not fp_file.exists():
        write_json(fp_file, {"fingerprint": fp})

    ctx = StageContext(
        recipe=recipe,
        name=name,
        workdir=work,
        inputs={up: stage_dir(recipe, up) for up in stage.inputs},
        options=dict(options or {}),
    )
    t0 = time.time()
    try:
        summary = stage.run(ctx) or {}
    except Interrupted as e:  # the CLI says where the partial work is and how to resume
        e.stage, e.partial = name, work
        raise
    manifest = {
        "stage": name,
        "fingerprint": fp,
        "recipe_name": recipe.name,
        "recipe_section_hash": recipe.section_hash(*stage.sections),
        "recipe_sections": list(stage.sections),
        "inputs": input_hashes,
        "synthpath_version": __version__,
        "started_at": _dt.datetime.fromtimestamp(t0, _dt.timezone.utc).isoformat(),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "seconds": round(time.time() - t0, 3),
        "summary": summary,
    }
    # A signal arriving now waits until the stage is finished and in place (interrupt.critical).
    with critical():
        fp_file.unlink(missing_ok=True)
        remove_temp_files(work)
        write_json(work / MANIFEST, manifest)
        # Swap into place: the old folder (if any) is moved aside first, then removed.
        if final.exists():
            trash = recipe.output_dir / f"{name}.old"
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(final, trash)
            os.replace(work, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(work, final)
    return manifest


def build(
    recipe: Recipe,
    *,
    force: tuple[str, ...] = (),
    until: str | None = None,
    options: dict | None = None,
    only: tuple[str, ...] | None = None,
) -> list[dict]:
    """Run the stages in order. A forced or re-run stage makes everything after it stale
    automatically, because their fingerprints include its new manifest hash."""
    out = []
    for stage in stages():
        if only is not None and stage.name not in only:
            continue
        if stage.name == "evaluate" and not recipe.evaluate.enabled:
            continue
        out.append(run_stage(recipe, stage.name, force=stage.name in force, options=options))
        if until and stage.name == until:
            break
    return out
