"""Packing finished slides into WebDataset shards, and the generate stage's summary.

Workers write one tar per finished slide (``work/<slide_id>.tar`` and its done-marker).
Once every slide is finished, the one finalising worker packs the shards from them:
shard ``i`` holds samples ``i * shard_samples ...`` in plan order, whatever slides they
come from. Packing reads bytes and writes tars; it never synthesises, so a slide that
straddles two shards is made once. Shard tars are deterministic (see
:mod:`synthpath.generate.writers`), so a packed shard is byte-identical whichever worker
made its slides.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

from ..pipeline import StageError
from .plan import GenerationPlan
from .writers import finished_marker, finished_unit, shard_name, sweep_temp, write_json_atomic, write_shard


def read_tar_members(path: Path) -> dict[str, bytes]:
    """name -> bytes of every regular member of a tar."""
    out = {}
    with tarfile.open(path, "r") as tar:
        for m in tar:
            if m.isfile():
                out[m.name] = tar.extractfile(m).read()
    return out


def pack_shard(shard: int, plan: GenerationPlan, work_dir: Path, shard_dir: Path, expect: dict,
               slide_markers: dict[int, dict]) -> dict:
    """Write shard ``shard`` from the finished slides' tars; returns its done-marker."""
    samples = plan.shard_samples_of(shard)
    members: dict[str, bytes] = {}
    hist: Counter = Counter()
    for s in sorted({x.slide_index for x in samples}):
        sid = plan.slides[s].slide_id
        if s not in slide_markers:
            raise StageError(f"{shard_name(shard)} needs slide {sid}, which is not finished in {work_dir}")
        have = read_tar_members(Path(work_dir) / f"{sid}.tar")
        for x in samples:
            if x.slide_index != s:
                continue
            part = {n: b for n, b in have.items() if n.split(".", 1)[0] == x.key}
            if not part:
                raise StageError(f"slide tar {Path(work_dir) / (sid + '.tar')} has no sample {x.key}")
            members.update(part)
    for x in samples:
        hist[x.label_name] += 1
    marker = dict(expect, count=len(samples), keys=[x.key for x in samples], label_histogram=dict(sorted(hist.items())))
    return write_shard(shard_dir, shard, members, marker)


def pack_all(plan: GenerationPlan, workdir: Path, expect: dict, slide_markers: dict[int, dict]) -> dict[int, dict]:
    """Every shard's done-marker, packing the shards not yet finished."""
    shard_dir = Path(workdir) / "shards"
    markers = {}
    for i in range(plan.n_shards):
        m = finished_marker(shard_dir, i, expect)
        if m is None:
            m = pack_shard(i, plan, Path(workdir) / "work", shard_dir, expect, slide_markers)
        markers[i] = m
    return markers


def release_ratio(plan: GenerationPlan, slide_markers: dict[int, dict]) -> dict:
    """Tiles generated per tile released, per level and in total. A tile is one of
    synthesis's tile windows. Released = the windows the released pixels need (``slides``
    mode: every window of every slide; ``stacks`` mode: one per distinct released tile);
    generated = the windows synthesis made for the slides (as each slide's marker recorded
    them, including whole-slide re-syntheses after the release filter). 1.0 means no
    generated tile is thrown away."""
    released = plan.n_release_windows()
    gen = [0] * len(plan.levels)
    known = True
    for s in range(len(plan.slides)):
        m = slide_markers.get(s)
        if m is None or "tiles_generated" not in m:
            known = False
            continue
        for k, v in enumerate(m["tiles_generated"]):
            gen[k] += int(v)
    images = {"distinct_images_released": sum(plan.n_release_images()),
              "distinct_images_released_per_level": plan.n_release_images()}
    if not known:
        return {**images, "tiles_released": sum(released), "tiles_released_per_level": released, "tiles_generated": None,
                "generated_per_released": None}
    return {
        **images,
        "tiles_released": sum(released),
        "tiles_released_per_level": released,
        "tiles_generated": sum(gen),
        "tiles_generated_per_level": gen,
        "generated_per_released": round(sum(gen) / max(1, sum(released)), 4),
        "generated_per_released_per_level": [round(g / max(1, r), 4) for g, r in zip(gen, released)],
        "filtered_in_synthesis": sum(int(slide_markers[s].get("filtered", 0)) for s in slide_markers),
    }


def finalise(workdir: Path, plan: GenerationPlan, markers: dict[int, dict], expect: dict, **info) -> dict:
    """Check the union of shards is exactly the plan, write ``shards/index.json``, remove
    the per-slide work files and any temp file left by killed workers, and return the stage
    summary."""
    workdir = Path(workdir)
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
    slide_markers = info.pop("slide_markers", None) or {}
    if slide_markers:  # per-slide statistics survive the removal of work/ (see slide_finished)
        index["slides"] = [{k: slide_markers[s][k] for k in ("slide_id", "attempt", "tiles_generated", "filtered")
                            if k in slide_markers[s]} for s in sorted(slide_markers)]
    write_json_atomic(workdir / "shards" / "index.json", index)
    ratio = release_ratio(plan, slide_markers)
    secs = info.pop("seconds", 0.0)
    samples_made = info.pop("samples_made", 0)
    slides_made = info.pop("slides_made", 0)
    tiles_made = info.pop("tiles_made", 0)
    fill = info.pop("mean_batch_fill", None)
    batch_size = info.pop("batch_size", None)
    shutil.rmtree(workdir / "work", ignore_errors=True)  # every slide is in the shards now
    swept = sweep_temp(workdir)
    slides_dir = workdir / "slides"
    return {
        "n_samples": len(keys),
        "n_slides": len(plan.slides),
        "n_shards": plan.n_shards,
        "mode": plan.mode,
        "slides_per_group": plan.slides_per_group,
        "levels": plan.level_names,
        "mpp": plan.levels,
        "tile_px": plan.tile_px,
        "layout_tiles": list(plan.layout_tiles),
        "label_histogram": dict(sorted(hist.items())),
        "label_source": plan.label_source,
        "slide_tiffs": sorted(p.name for p in slides_dir.glob("*.tiff")) if slides_dir.is_dir() else [],
        **ratio,
        "this_run": {"samples": samples_made, "slides": slides_made, "tiles": tiles_made, "seconds": round(secs, 3),
                     "tiles_per_s": round(tiles_made / secs, 3) if secs > 0 and tiles_made else None,
                     "mean_batch_fill": fill, "batch_size": batch_size},
        "temp_files_removed": len(swept),
        **expect,
        **info,
    }


def slide_finished(plan: GenerationPlan, s: int, workdir: Path, expect: dict, *, want_tiff: bool,
                   verify_hash: bool = True) -> dict | None:
    """A slide's done-marker if the slide is finished: its tar and marker are current in
    ``work/``, or (after packing removed ``work/``) every shard holding its samples is
    finished (its statistics then come from ``shards/index.json``). A slide whose TIFF is
    wanted and missing is not finished."""
    sid = plan.slides[s].slide_id
    if want_tiff and not (Path(workdir) / "slides" / f"{sid}.tiff").is_file():
        return None
    m = finished_unit(Path(workdir) / "work", sid, dict(expect, slide_id=sid), verify_hash=verify_hash)
    if m is not None:
        return m
    shard_dir = Path(workdir) / "shards"
    if all(finished_marker(shard_dir, i, expect, verify_hash=verify_hash) for i in plan.shards_of_slide(s)):
        got = {"slide_id": sid, "packed": True}
        try:
            index = json.loads((shard_dir / "index.json").read_text())
            stats = {x["slide_id"]: x for x in index.get("slides", []) if isinstance(x, dict)}
            if index.get("plan_hash") == expect.get("plan_hash") and sid in stats:
                got.update(stats[sid])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return got
    return None
