"""The generation plan: what to synthesise, decided before anything is sampled.

The plan is a pure function of the recipe (``generate`` section, levels, tile size,
classes) and, when ``generate.label_proportions`` is not given, of the training tiles'
label shares in the ingest store. Two runs of the plan on the same inputs give the same
plan, which is what lets many workers split the work without talking to each other and
lets an interrupted run resume.

Vocabulary:

* A **synthetic slide** has a label, a layout of ``layout_tiles`` coarsest-level tiles and
  a seed (``slide_seed``) from which its whole pyramid is synthesised.
* A **sample** is a multi-magnification *stack* cut from a slide: one coarsest-level tile
  and, at each finer level, one tile lying inside the tile chosen at the level above.
  Each sample has its own ``seed`` derived by a stable hash from the plan seed and its
  global index; that seed picks the stack's position (among stacks not yet taken in
  its slide). Its pixels are fully determined by ``(slide_seed, position)``, so
  :func:`regenerate_sample` can rebuild any single sample on its own.
* A **shard** is ``shard_samples`` consecutive samples (slide-major order), written as one
  WebDataset tar. Shards are packing only: they are written from finished slides, so a
  slide whose samples straddle two shards is still made once.
* A **group** is ``slides_per_group`` consecutive slides synthesised together (their tiles
  share model batches). Groups are fixed by the plan, so the batches, and therefore every
  pixel, are the same whichever worker makes a group, in one run or after a resume. A
  group is the unit of work of a rank (group ``g`` belongs to rank ``g % world``).

Modes (``generate.mode``). In ``stacks`` mode each slide gets ``samples_per_slide``
distinct stacks at random positions and only the tiles under them are made; in ``slides``
mode every stack of the layout is a sample (stack-number order), so the release holds
every tile of every level.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..pipeline import StageError
from ..recipe import Recipe
from ..units import level_name
from .stackgeom import PARENT_MARGIN, axis_chains, decode_stack, stacks_in_slide, window_grids, window_overlap

PLAN_VERSION = 2

#: most slides per group when ``generate.slides_per_group`` is not set
MAX_AUTO_GROUP = 8


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes, platforms and Python versions
    (unlike ``hash()``, which is salted per process)."""
    blob = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1


def largest_remainder(weights: list[float], total: int) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (Hamilton's method).

    Each share gets the floor of its quota; the leftover units go to the largest
    fractional parts, ties broken by position. Shares of zero weight stay zero.
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    w = [float(x) for x in weights]
    if any(x < 0 or not math.isfinite(x) for x in w):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    s = sum(w)
    if s <= 0:
        raise ValueError(f"weights must not all be zero, got {weights}")
    quotas = [x / s * total for x in w]
    counts = [int(math.floor(q)) for q in quotas]
    left = total - sum(counts)
    order = sorted(range(len(w)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order:
        if left == 0:
            break
        if w[i] > 0:
            counts[i] += 1
            left -= 1
    return counts


@dataclass(frozen=True)
class LevelPos:
    """Where a stack's tile lies at one level: row/col (in ``slides`` mode the grid of
    non-overlapping tiles; in ``stacks`` mode the index of synthesis's tile window) and
    pixel x/y in that
    level's image of the synthetic slide."""

    level: int
    mpp: float
    name: str
    row: int
    col: int
    x: int
    y: int


@dataclass(frozen=True)
class SamplePlan:
    index: int  # global sample index, 0..n_samples-1
    key: str  # WebDataset key (no dots)
    slide_index: int
    slide_id: str
    slide_seed: int
    seed: int  # this sample's own seed (chose its position)
    label: int
    label_name: str
    position: tuple[LevelPos, ...]  # coarsest first
    shard: int


@dataclass(frozen=True)
class SlidePlan:
    index: int
    slide_id: str
    label: int
    label_name: str
    seed: int
    samples: tuple[int, ...]  # global sample indices


@dataclass
class GenerationPlan:
    classes: list[str]
    levels: list[float]
    level_names: list[str]
    tile_px: int
    layout_tiles: tuple[int, int]
    seed: int
    shard_samples: int
    slides: list[SlidePlan]
    samples: list[SamplePlan]
    label_source: str  # "recipe" or "training tiles"
    label_weights: list[float] = field(default_factory=list)
    mode: str = "stacks"  # "stacks" or "slides" (generate.mode)
    slides_per_group: int = 1
    window_overlap: int = 0  # min overlap of synthesis's tile windows (px), passed to synthesis

    @property
    def n_groups(self) -> int:
        return math.ceil(len(self.slides) / self.slides_per_group) if self.slides else 0

    def group_slides(self, group: int) -> list[int]:
        """Slide indices of a group (consecutive slides)."""
        lo = group * self.slides_per_group
        return list(range(lo, min(lo + self.slides_per_group, len(self.slides))))

    def groups_for_rank(self, rank: int, world: int) -> list[int]:
        """Groups a worker makes: group index modulo world size equals its rank."""
        return [g for g in range(self.n_groups) if g % world == rank]

    def shards_of_slide(self, slide: int) -> list[int]:
        """The shards holding a slide's samples (one, or two or more when it straddles)."""
        return sorted({self.samples[i].shard for i in self.slides[slide].samples})

    def release_tiles(self, slide: int) -> dict[int, list[tuple[int, int, int, int]]]:
        """level -> sorted distinct pixel boxes ``(y0, x0, y1, x1)`` the slide's samples release."""
        out: dict[int, set] = {k: set() for k in range(len(self.levels))}
        px = self.tile_px
        for i in self.slides[slide].samples:
            for p in self.samples[i].position:
                out[p.level].add((p.y, p.x, p.y + px, p.x + px))
        return {k: sorted(v) for k, v in out.items()}

    def n_release_images(self) -> list[int]:
        """Distinct tile images released per level, over all slides."""
        n = [0] * len(self.levels)
        for s in range(len(self.slides)):
            for k, t in self.release_tiles(s).items():
                n[k] += len(t)
        return n

    def n_release_windows(self) -> list[int]:
        """Per level, the synthesis tile windows that the released pixels need, over all
        slides: in ``slides`` mode every window of the slide (all of it is released); in
        ``stacks`` mode one per distinct released tile (each is one window)."""
        if self.mode != "slides":
            return self.n_release_images()
        grids = window_grids(self.layout_tiles, self.levels, self.tile_px, self.window_overlap)
        return [len(ys) * len(xs) * len(self.slides) for ys, xs in grids]

    @property
    def n_shards(self) -> int:
        return max(1, math.ceil(len(self.samples) / self.shard_samples)) if self.samples else 0

    def shard_samples_of(self, shard: int) -> list[SamplePlan]:
        lo = shard * self.shard_samples
        return self.samples[lo: lo + self.shard_samples]

    def slide_px(self, level: int) -> tuple[int, int]:
        """(height, width) in pixels of a synthetic slide at ``level``."""
        f = grid_factor(self.levels, level)
        return self.layout_tiles[0] * f * self.tile_px, self.layout_tiles[1] * f * self.tile_px

    def to_json(self) -> dict:
        return {
            "version": PLAN_VERSION,
            "classes": self.classes,
            "levels": self.levels,
            "level_names": self.level_names,
            "tile_px": self.tile_px,
            "layout_tiles": list(self.layout_tiles),
            "seed": self.seed,
            "shard_samples": self.shard_samples,
            "n_shards": self.n_shards,
            "label_source": self.label_source,
            "label_weights": self.label_weights,
            "mode": self.mode,
            "slides_per_group": self.slides_per_group,
            "window_overlap": self.window_overlap,
            "slides": [asdict(s) for s in self.slides],
            "samples": [asdict(s) for s in self.samples],
        }

    def digest(self) -> str:
        """Hash of the whole plan; shards carry it so a changed plan never reuses them."""
        blob = json.dumps(self.to_json(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def grid_factor(levels: list[float], level: int) -> int:
    """How many tiles of ``level`` span one coarsest-level tile, per side."""
    r = levels[0] / levels[level]
    f = int(round(r))
    if abs(r - f) > 1e-6:
        raise StageError(f"levels {levels}: level {level} is not an integer zoom of level 0 ({r:g})")
    return f


def training_label_shares(ingest_dir: Path, n_classes: int, train_dir: Path | None = None) -> tuple[list[float], str]:
    """``(weights, source)``: the label shares of the training data.

    Under DP the train stage released them through a Gaussian mechanism inside epsilon
    (``train/ledger.json`` ``label_shares``, see :mod:`synthpath.train.label_shares`); they are
    read from there, and a DP ledger without them is an error (the exact counts would be a
    private statistic outside epsilon). Without DP (no guarantee anyway) they are the tile
    counts per class among the labelled *training* tiles at the coarsest level of the ingest
    store (``index.parquet``), falling back to all levels if level 0 has none."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ledger_p = Path(train_dir) / "ledger.json" if train_dir is not None else None
    if ledger_p is not None and ledger_p.is_file():
        try:
            ledger = json.loads(ledger_p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StageError(f"the privacy ledger {ledger_p} cannot be read ({e}); re-run `synthpath train`") from None
        if ledger.get("enabled"):
            block = ledger.get("label_shares") or {}
            shares = block.get("shares")
            if block.get("source") != "dp" or not isinstance(shares, list) or len(shares) != n_classes \
                    or any(not isinstance(v, (int, float)) or not v >= 0 for v in shares) or sum(shares) <= 0:
                raise StageError(f"{ledger_p}: the model was trained with DP but the ledger has no valid DP label "
                                 f"shares for {n_classes} classes; re-run `synthpath train`, or set "
                                 f"generate.label_proportions (public knowledge)")
            return [float(v) for v in shares], "training tiles, under DP (Gaussian mechanism inside epsilon)"
    path = Path(ingest_dir) / "index.parquet"
    if not path.is_file():
        raise StageError(f"the ingest store has no index: {path} is missing; re-run `synthpath ingest`")
    t = pq.read_table(path, columns=["level", "label", "split"])
    t = t.filter(pc.and_(pc.equal(t["split"], "train"), pc.greater_equal(t["label"], 0)))
    coarse = t.filter(pc.equal(t["level"], 0))
    if coarse.num_rows:
        t = coarse
    labels = np.asarray(t["label"].to_numpy(zero_copy_only=False), dtype=np.int64)
    if labels.size == 0:
        raise StageError(f"{path}: no labelled training tiles, so label shares are unknown; "
                         f"set generate.label_proportions in the recipe")
    if labels.max() >= n_classes:
        raise StageError(f"{path}: label {int(labels.max())} is out of range for {n_classes} classes")
    return np.bincount(labels, minlength=n_classes).astype(float).tolist(), "training tiles"


def _spread(labels_counts: list[int]) -> list[int]:
    """Order slide labels so each class is spread evenly over the slide sequence
    (class c's k-th slide sits at fractional position (k + 0.5) / count_c)."""
    items = []
    for c, n in enumerate(labels_counts):
        for k in range(n):
            items.append(((k + 0.5) / n, c, k))
    return [c for _, c, _ in sorted(items)]


def holdout_slide_ids(slides: list[dict] | list[SlidePlan], n_classes: int, test_fraction: float) -> set[str]:
    """Slide ids in the HF test split: about ``test_fraction`` of the synthetic slides,
    stratified by label (largest remainder over classes), taking each class's last slides.
    Accepts :class:`SlidePlan` objects or their dicts (as stored in ``plan.json``)."""
    rows = [s if isinstance(s, dict) else asdict(s) for s in slides]
    slide_labels = [int(r["label"]) for r in rows]
    n = len(slide_labels)
    if test_fraction <= 0 or n < 2:
        return set()
    n_test = min(n - 1, max(1, int(round(test_fraction * n))))
    per_class = [slide_labels.count(c) for c in range(n_classes)]
    take = largest_remainder(per_class, n_test)
    out: set[str] = set()
    for c in range(n_classes):
        idx = [i for i, lab in enumerate(slide_labels) if lab == c]
        if take[c]:
            out.update(rows[i]["slide_id"] for i in idx[len(idx) - min(take[c], len(idx)):])
    return out


def make_plan(recipe: Recipe, ingest_dir: Path | None = None, train_dir: Path | None = None) -> GenerationPlan:
    """Build the deterministic generation plan for ``recipe``.

    ``ingest_dir`` is needed only when ``generate.label_proportions`` is not set (the label
    shares then come from the training tiles). The plan reads only the ``generate``
    section, the levels, tile size and classes, so it changes exactly when those do.
    """
    g = recipe.generate
    classes = list(recipe.data.classes)
    levels = [float(x) for x in recipe.levels]
    tile_px = int(recipe.tile_px)
    layout = (int(g.layout_tiles[0]), int(g.layout_tiles[1]))
    if layout[0] < 1 or layout[1] < 1:
        raise StageError(f"generate.layout_tiles must be two positive integers, got {list(g.layout_tiles)}")

    if g.label_proportions:
        unknown = [k for k in g.label_proportions if k not in classes]
        if unknown:
            raise StageError(f"generate.label_proportions: unknown label(s) {unknown}; classes are {classes}")
        weights = [float(g.label_proportions.get(c, 0.0)) for c in classes]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise StageError(f"generate.label_proportions must be >= 0 and not all zero, got {g.label_proportions}")
        source = "recipe"
    else:
        if ingest_dir is None:
            raise StageError("generate.label_proportions is not set and no ingest store was given to take label shares from")
        weights, source = training_label_shares(ingest_dir, len(classes), train_dir)

    counts = largest_remainder(weights, g.n_slides)
    slide_labels = _spread(counts)

    factors = [grid_factor(levels, k + 1) // grid_factor(levels, k) for k in range(len(levels) - 1)]
    mode = str(getattr(g, "mode", "stacks"))
    if mode != "slides" and recipe.export.slides:
        raise StageError("export.slides (whole-slide TIFFs) needs generate.mode: slides; generate.mode: stacks makes "
                         "only the tiles under the sampled stacks, so a slide image would be mostly empty")
    overlap = window_overlap(tile_px)
    if mode == "slides":
        n_stacks = stacks_in_slide(layout, factors)
    else:  # stacks are nested synthesis windows, so each released tile is one generated tile
        grids = window_grids(layout, levels, tile_px, overlap)
        chains_y = axis_chains([gr[0] for gr in grids], factors, tile_px, PARENT_MARGIN)
        chains_x = axis_chains([gr[1] for gr in grids], factors, tile_px, PARENT_MARGIN)
        n_stacks = len(chains_y) * len(chains_x)
    per_slide = n_stacks if mode == "slides" else int(g.samples_per_slide)
    if mode != "slides" and g.samples_per_slide > n_stacks:
        raise StageError(
            f"generate.samples_per_slide = {g.samples_per_slide} but a slide of layout {list(layout)} with levels "
            f"{levels} holds only {n_stacks} distinct stacks; lower it or enlarge generate.layout_tiles"
        )
    names = [level_name(m) for m in levels]
    plan_seed = int(g.seed)

    slides: list[SlidePlan] = []
    samples: list[SamplePlan] = []
    for s, lab in enumerate(slide_labels):
        slide_id = f"syn{s:05d}"
        slide_seed = stable_seed("synthpath-slide", plan_seed, s)
        taken: set[int] = set()
        idxs = []
        for j in range(per_slide):
            i = len(samples)
            seed = stable_seed("synthpath-sample", plan_seed, i)
            if mode == "slides":
                code = j  # every stack, in stack-number order
            else:
                rng = np.random.default_rng(seed)
                free = n_stacks - len(taken)
                pick = int(rng.integers(free))
                # the pick-th stack number not yet taken in this slide (taken is small)
                code = pick
                for t in sorted(taken):
                    if t <= code:
                        code += 1
                taken.add(code)
            if mode == "slides":  # the plain grid of non-overlapping tiles, which covers the slide
                grid = decode_stack(code, layout, factors)
                pos = tuple(LevelPos(level=k, mpp=levels[k], name=names[k], row=r, col=c, x=c * tile_px, y=r * tile_px)
                            for k, (r, c) in enumerate(grid))
            else:  # row/col index the level's synthesis windows
                cy, cx = chains_y[code // len(chains_x)], chains_x[code % len(chains_x)]
                pos = tuple(LevelPos(level=k, mpp=levels[k], name=names[k], row=cy[k], col=cx[k], x=grids[k][1][cx[k]],
                                     y=grids[k][0][cy[k]]) for k in range(len(levels)))
            samples.append(SamplePlan(
                index=i, key=f"{slide_id}_{j:04d}", slide_index=s, slide_id=slide_id, slide_seed=slide_seed,
                seed=seed, label=lab, label_name=classes[lab], position=pos, shard=i // g.shard_samples,
            ))
            idxs.append(i)
        slides.append(SlidePlan(index=s, slide_id=slide_id, label=lab, label_name=classes[lab], seed=slide_seed,
                                samples=tuple(idxs)))
    group = getattr(g, "slides_per_group", None)
    if group is None:
        # enough slides that their coarsest tiles fill one model batch, at most MAX_AUTO_GROUP
        coarse = layout[0] * layout[1] if mode == "slides" else min(layout[0] * layout[1], per_slide)
        group = min(MAX_AUTO_GROUP, max(1, math.ceil(int(g.batch_size) / max(1, coarse))))
    return GenerationPlan(classes=classes, levels=levels, level_names=names, tile_px=tile_px, layout_tiles=layout,
                          seed=plan_seed, shard_samples=int(g.shard_samples), slides=slides, samples=samples,
                          label_source=source, label_weights=[float(w) for w in weights], mode=mode,
                          slides_per_group=int(group), window_overlap=overlap)
