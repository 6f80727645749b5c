"""Synthesis of one group of slides for the ``generate`` stage, and the samples cut from it.

A group (``plan.group_slides(g)``) is synthesised in one call of
:func:`synthpath.generate.synthesis.synthesize_slides`, so its slides' tiles share model
batches. Which slides share a batch is therefore fixed by the plan, never by where a run
was interrupted or which worker makes the group: the pixels of a slide are a function of
the plan (and the weights) alone. A resumed group is synthesised whole again, even if some
of its slides were already written.

In ``stacks`` mode synthesis is asked only for the tiles the slide's samples release
(``targets``: per slide, boxes ``(level, y0, x0, y1, x1)``), when the synthesis module
supports it; synthesis adds the neighbour context their seams need. In ``slides`` mode the
whole pyramid is made and released.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import numpy as np
import torch

from ..pipeline import StageError
from .plan import GenerationPlan, SamplePlan, grid_factor, stable_seed

log = logging.getLogger("synthpath.generate")

#: groups whose canvases (all levels, all slides) exceed this are kept as memory maps on disk
MEMMAP_BYTES = 2 << 30


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


def _to_filter_input(tiles: list[np.ndarray], device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(np.stack(tiles)).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def target_boxes(plan: GenerationPlan, slide: int) -> list[tuple[int, int, int, int, int]]:
    """The boxes ``(level, y0, x0, y1, x1)`` (half-open, level pixels) a slide releases:
    synthesis's ``targets`` entry for the slide."""
    return [(k, *b) for k, boxes in sorted(plan.release_tiles(slide).items()) for b in boxes]


def generated_counts(pyr, plan: GenerationPlan) -> list[int]:
    """Model tiles synthesis made per level for one slide (not counting filter retries),
    as the synthesis reports them; a synthesis that reports none made the whole layout."""
    for name in ("generated_per_level", "tiles_generated"):
        got = getattr(pyr, name, None)
        if got:
            return [int(v) for v in got]
    per = getattr(pyr, "tiles_per_level", None)
    if per:
        return [int(v) for v in per]
    return [plan.layout_tiles[0] * plan.layout_tiles[1] * grid_factor(plan.levels, k) ** 2
            for k in range(len(plan.levels))]


class GroupSynth:
    """Synthesises groups of slides for the plan (model, sampler and release filter bound
    once). Every tile passes the release filter inside synthesis; each planned stack is
    checked again afterwards, and a slide whose stack is still flagged is re-synthesised
    with a derived seed (``attempt``), at most ``generate.max_filter_retries`` times."""

    def __init__(self, model, plan: GenerationPlan, recipe, device: torch.device, tile_filter=None,
                 canvas_dir: Path | None = None):
        from . import synthesis

        self.model = model
        self.plan = plan
        self.recipe = recipe
        self.device = device
        self.tile_filter = tile_filter
        self.max_retries = int(recipe.generate.max_filter_retries)
        self.canvas_dir = canvas_dir
        self.tiles_made = 0  # model tiles made in this process (with retries)
        self.n_filtered = 0  # tiles the filter sent back inside synthesis
        self.model_calls = 0  # model batches run in this process
        self.batched_tiles = 0.0  # tiles those batches held
        self.targets_supported = "targets" in inspect.signature(synthesis.synthesize_slides).parameters

    def mean_batch_fill(self) -> float | None:
        """Mean tiles per model batch in this process (``generate.batch_size`` is the cap)."""
        return round(self.batched_tiles / self.model_calls, 3) if self.model_calls else None

    def slide_bytes(self) -> int:
        """RAM one slide's full pyramid takes (uint8 RGB, all levels)."""
        return sum(h * w * 3 for h, w in (self.plan.slide_px(k) for k in range(len(self.plan.levels))))

    def _synth(self, slides: list[int], attempts: dict[int, int]) -> dict[int, tuple[list[np.ndarray], object, list[int]]]:
        from . import synthesis

        plan = self.plan
        labels, seeds = [], []
        for s in slides:
            sp = plan.slides[s]
            labels.append(sp.label)
            seeds.append(sp.seed if attempts[s] == 0 else stable_seed("synthpath-retry", sp.seed, attempts[s]))
        kw = {"overlap": plan.window_overlap} if plan.window_overlap else {}
        if plan.mode == "stacks" and self.targets_supported:
            kw["targets"] = [target_boxes(plan, s) for s in slides]
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else torch.autocast("cpu", enabled=False))
        # big groups keep their levels as memory maps on disk, so RAM holds only tiles in flight
        canvas = self.canvas_dir if self.slide_bytes() * len(slides) > MEMMAP_BYTES else None
        with torch.no_grad(), autocast:
            pyrs = synthesis.synthesize_slides(
                self.model, labels, plan.layout_tiles, plan.levels, seeds, sampler=self.recipe.sampler,
                tile_filter=self.tile_filter, device=self.device, batch_size=self.recipe.generate.batch_size,
                max_retries=self.max_retries, workdir=canvas, **kw)
        if pyrs:  # batch statistics are per synthesis call (shared by its slides)
            calls = int(getattr(pyrs[0], "model_calls", 0))
            self.model_calls += calls
            self.batched_tiles += float(getattr(pyrs[0], "batch_fill", 0.0)) * calls
        out = {}
        for s, pyr in zip(slides, pyrs):
            levels = [np.asarray(a) for a in pyr.levels]
            for k, a in enumerate(levels):
                want = plan.slide_px(k)
                if a.dtype != np.uint8 or a.shape != (*want, 3):
                    raise StageError(f"synthesis returned level {k} of slide {plan.slides[s].slide_id} as "
                                     f"{a.dtype} {a.shape}; expected uint8 {(*want, 3)}")
            counts = generated_counts(pyr, plan)
            filtered = int(getattr(pyr, "n_filtered", 0))
            self.n_filtered += filtered
            self.tiles_made += sum(counts) + filtered
            out[s] = (levels, pyr, counts, filtered)
        return out

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
        if self.recipe.export.slides or self.recipe.generate.mode == "slides":
            # the whole canvas is released (TIFF, every grid tile): every window of every level must pass
            from ..audit.verify import verify_canvas

            check = verify_canvas(self.tile_filter, levels, self.plan.tile_px, device=self.device, stop_at_first=True)
            if not check.passed:
                log.warning("slide %s: finished canvas window (level, y, x) %s is flagged; re-synthesising",
                            self.plan.slides[s].slide_id, check.flagged[0])
                return True
        return False

    def group(self, slides: list[int]) -> dict[int, dict]:
        """slide index -> {levels, attempt, pyramid, generated (per level, all attempts), filtered}."""
        attempts = {s: 0 for s in slides}
        spent = {s: [0] * len(self.plan.levels) for s in slides}
        filtered = {s: 0 for s in slides}
        done: dict[int, dict] = {}
        need = list(slides)
        while need:
            made = self._synth(need, attempts)  # a retry round is a fixed subset too: deterministic
            again = []
            for s in need:
                levels, pyr, counts, nf = made[s]
                spent[s] = [a + b for a, b in zip(spent[s], counts)]
                filtered[s] += nf
                if self._flagged(s, levels):
                    if attempts[s] >= self.max_retries:
                        raise StageError(
                            f"slide {self.plan.slides[s].slide_id}: the release filter still flags a tile after "
                            f"{attempts[s] + 1} syntheses (generate.max_filter_retries = {self.max_retries}); the model "
                            f"reproduces training tiles: retrain with more privacy or raise the retry limit"
                        )
                    attempts[s] += 1
                    again.append(s)
                else:
                    done[s] = {"levels": levels, "attempt": attempts[s], "pyramid": pyr,
                               "generated": spent[s], "filtered": filtered[s]}
            need = again
        return {s: done[s] for s in slides}
