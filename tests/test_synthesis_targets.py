"""Synthesis at scale: the parent crop reads only what it needs, targets generate only their
dependency closure, batches fill across slides, and bad labels fail loudly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from synthpath.generate.synthesis import _parent_crop, synthesize_slide, synthesize_slides
from synthpath.generate.tiling import cover, level_grids, needed_tiles, zoom_factors
from synthpath.models import SynthUNet
from synthpath.pipeline import StageError
from synthpath.recipe import SamplerConfig

FAST = SamplerConfig(name="dpmpp_2m", steps=1, guidance_scale=1.0, zoom_start=0.5)


@pytest.fixture(scope="module")
def m32() -> SynthUNet:
    torch.manual_seed(0)
    m = SynthUNet(num_classes=2, tile_px=32, channels=8, mults=(1, 2), num_res_blocks=1, attn_max_res=0)
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m.eval()


@pytest.mark.parametrize("f", [2, 4])
def test_parent_crop_equals_whole_level_resize(f):
    rng = np.random.default_rng(0)
    parent = rng.integers(0, 256, (96, 120, 3), dtype=np.uint8)
    whole = Image.fromarray(parent)
    px = 32
    for y, x in [(0, 0), (f * 96 - px, f * 120 - px), (37, 75), (f * 40 + 3, 1)]:
        box = (x / f, y / f, (x + px) / f, (y + px) / f)
        want = np.asarray(whole.resize((px, px), Image.BICUBIC, box=box))
        assert np.array_equal(_parent_crop(parent, y, x, px, f), want), (y, x)


def test_parent_crop_reads_only_the_footprint():
    class Level:
        """A level that records every region read from it."""
        def __init__(self, a):
            self.a, self.shape, self.reads = a, a.shape, []

        def __getitem__(self, idx):
            out = self.a[idx]
            self.reads.append(out.shape[:2])
            return out

    lv = Level(np.zeros((4096, 4096, 3), dtype=np.uint8))
    out = _parent_crop(lv, 1000, 2000, 32, 2)
    assert out.shape == (32, 32, 3)
    assert lv.reads == [(16 + 6, 16 + 6)]  # the 16 px footprint plus a 3 px margin each side


def test_cover_is_minimal_and_exact_for_a_window():
    pos = [0, 24, 48, 72, 96]
    assert cover(pos, 32, 24, 56) == [1]  # exactly one window
    assert cover(pos, 32, 0, 128) == [0, 1, 2, 3, 4][: len(cover(pos, 32, 0, 128))]
    assert cover(pos, 32, 30, 60) == [1, 2]
    with pytest.raises(ValueError, match="outside"):
        cover(pos, 32, 100, 140)


def test_needed_tiles_closure():
    levels, px = [2.0, 1.0, 0.5], 32
    grids = level_grids((2, 2), levels, px, 8)
    f = zoom_factors(levels)
    ys, xs = grids[2]
    need = needed_tiles([(2, ys[3], xs[4], ys[3] + px, xs[4] + px)], grids, f, px)
    assert need[2] == {(3, 4)}
    assert 1 <= len(need[1]) <= 4 and 1 <= len(need[0]) <= 4
    # the closure covers the finer tile's parent footprint (+ margin) on each level above
    for k in (2, 1):
        (pys, pxs), (cys, cxs) = grids[k - 1], grids[k]
        for (i, j) in need[k]:
            y, x = cys[i] // 2, cxs[j] // 2
            ok = np.zeros((pys[-1] + px, pxs[-1] + px), bool)
            for (a, b) in need[k - 1]:
                ok[pys[a]:pys[a] + px, pxs[b]:pxs[b] + px] = True
            assert ok[max(0, y - 3):y + px // 2 + 3, max(0, x - 3):x + px // 2 + 3].all()
    with pytest.raises(ValueError, match="outside"):
        needed_tiles([(2, 0, 0, 10**6, 10)], grids, f, px)
    with pytest.raises(ValueError, match="level"):
        needed_tiles([(3, 0, 0, 1, 1)], grids, f, px)


def test_targets_generate_only_the_closure(m32):
    levels, layout = [1.0, 0.5], (2, 2)
    grids = level_grids(layout, levels, 32, 8)
    ys, xs = grids[1]
    box = (1, ys[2], xs[2], ys[2] + 32, xs[2] + 32)
    full, part = synthesize_slides(m32, [0, 0], layout, levels, [5, 5], sampler=FAST, batch_size=64,
                                   targets=[None, [box]])
    assert full.tiles_per_level == full.grid_tiles_per_level == [len(g[0]) * len(g[1]) for g in grids]
    assert part.tiles_per_level[1] == 1 and part.tiles_per_level[0] < full.tiles_per_level[0]
    lv = part.levels[1]
    assert lv[ys[2]:ys[2] + 32, xs[2]:xs[2] + 32].std() > 0  # made
    outside = np.ones(lv.shape[:2], bool)
    outside[ys[2]:ys[2] + 32, xs[2]:xs[2] + 32] = False
    assert lv[outside].max() == 0  # nothing else of the finer level was generated
    # the same box generated alone, in its own call, comes out the same (nothing else leaks in)
    alone = synthesize_slide(m32, 0, layout, levels, 5, sampler=FAST, targets=[box])
    assert np.array_equal(alone.levels[1], part.levels[1])
    assert part.batch_fill > 0 and full.model_calls == part.model_calls


def test_batches_fill_across_slides(m32):
    pyrs = synthesize_slides(m32, [0, 1, 0, 1], (1, 1), [1.0], [1, 2, 3, 4], sampler=FAST, batch_size=4)
    assert pyrs[0].batch_fill == 4.0 and pyrs[0].model_calls == 1


def test_label_equal_to_num_classes_is_an_error(m32):
    with pytest.raises(StageError, match="outside the model's 2 classes"):
        synthesize_slide(m32, 2, (1, 1), [1.0], seed=0, sampler=FAST)
