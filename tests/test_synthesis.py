"""Tests for whole-slide synthesis, the pyramidal TIFF writer and the quality metrics.

The models are real, untrained SynthUNets kept very small (8 channels) with one or two
solver steps, so a 3-level slide takes seconds on a CPU."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import torch

from synthpath.generate.quality import consistency, pyramid_seams, seam_score
from synthpath.generate.synthesis import (
    Pyramid,
    dependency_waves,
    known_mask,
    synthesize_slide,
    synthesize_slides,
    tile_positions,
)
from synthpath.generate.tiff import write_pyramid_tiff
from synthpath.models import SynthUNet
from synthpath.pipeline import StageError
from synthpath.recipe import SamplerConfig

FAST = SamplerConfig(name="dpmpp_2m", steps=1, guidance_scale=1.0, zoom_start=0.5)



def _micro(px: int) -> SynthUNet:
    torch.manual_seed(0)
    m = SynthUNet(num_classes=2, tile_px=px, channels=8, mults=(1, 2), num_res_blocks=1, attn_max_res=0)
    with torch.no_grad():  # wake the zero-initialised layers so the untrained net is not the identity
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def m64() -> SynthUNet:
    return _micro(64)


@pytest.fixture(scope="module")
def m32() -> SynthUNet:
    return _micro(32)


def test_tile_positions_and_waves():
    assert tile_positions(64, 64, 16) == [0]
    assert tile_positions(128, 64, 16) == [0, 32, 64]
    ys = tile_positions(256, 64, 16)
    assert ys[0] == 0 and ys[-1] == 192 and all(64 - (b - a) >= 16 for a, b in zip(ys, ys[1:]))
    waves = dependency_waves(ys, ys, 64)
    seen = {}
    for n, wave in enumerate(waves):
        for i, j in wave:
            seen[(i, j)] = n
        for a in wave:  # no two tiles of one wave overlap
            for b in wave:
                if a != b:
                    assert abs(ys[a[0]] - ys[b[0]]) >= 64 or abs(ys[a[1]] - ys[b[1]]) >= 64
    assert len(seen) == len(ys) ** 2
    # every overlapping earlier neighbour (left, top-left, top, top-right) is in an earlier wave
    assert seen[(1, 1)] > max(seen[(1, 0)], seen[(0, 0)], seen[(0, 1)], seen[(0, 2)])
    assert max(len(w) for w in waves) > 1  # there is something to batch


def test_known_mask_is_top_and_left_strips():
    ys = tile_positions(256, 64, 16)  # stride 48, overlap 16
    done = np.zeros((len(ys), len(ys)), dtype=bool)
    done[0, :] = True
    done[1, 0] = True
    m = known_mask(done, 1, 1, ys, ys, 64)
    want = np.zeros((64, 64), dtype=np.float32)
    want[:16, :] = 1
    want[:, :16] = 1
    assert np.array_equal(m, want)
    assert known_mask(np.zeros_like(done), 1, 1, ys, ys, 64).sum() == 0


def test_three_level_pyramid_and_tiff(m64, tmp_path):
    pyr = synthesize_slide(m64, 1, (2, 2), [2.0, 1.0, 0.5], seed=7, sampler=FAST, batch_size=16)
    assert pyr.shapes == [(128, 128), (256, 256), (512, 512)]
    assert all(a.dtype == np.uint8 and a.shape[2] == 3 for a in pyr.levels)
    assert pyr.mpp == [2.0, 1.0, 0.5] and pyr.tile_px == 64 and pyr.seed == 7 and pyr.label == 1
    assert pyr.n_filtered == 0
    assert all(a.std() > 0 for a in pyr.levels)  # every pixel was generated, not left blank

    path = write_pyramid_tiff(pyr, tmp_path / "slide.tiff")
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_count == 3
        assert s.level_dimensions == ((512, 512), (256, 256), (128, 128))
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)
        region = np.asarray(s.read_region((0, 0), 2, (128, 128)).convert("RGB"))
        assert np.array_equal(region, pyr.levels[0])
        fine = np.asarray(s.read_region((64, 128), 0, (100, 50)).convert("RGB"))
        assert np.array_equal(fine, pyr.levels[2][128:178, 64:164])

    q = consistency(pyr)
    assert [d["level"] for d in q] == [1, 2] and all(np.isfinite(d["ssim"]) for d in q)
    assert [d["level"] for d in pyramid_seams(pyr)] == [0, 1, 2]


def test_same_seed_same_slide_and_batching_independent(m32):
    kw = dict(sampler=FAST, batch_size=8)
    a = synthesize_slide(m32, 0, (1, 2), [1.0, 0.5], seed=3, **kw)
    b = synthesize_slide(m32, 0, (1, 2), [1.0, 0.5], seed=3, **kw)
    for x, y in zip(a.levels, b.levels):
        assert np.array_equal(x, y)
    # the same slide made together with another one (shared batches) comes out the same
    other, again = synthesize_slides(m32, [1, 0], (1, 2), [1.0, 0.5], [99, 3], **kw)
    for x, y in zip(a.levels, again.levels):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    assert not np.array_equal(other.levels[0], a.levels[0])
    c = synthesize_slide(m32, 0, (1, 2), [1.0, 0.5], seed=4, **kw)
    assert not np.array_equal(c.levels[0], a.levels[0])


def test_known_neighbours_are_continued(m32):
    """Overlapping tiles: each later tile keeps the pixels its neighbours already made."""
    pyr = synthesize_slide(m32, 1, (1, 2), [1.0], seed=5, sampler=FAST, seams="inpaint")
    img = pyr.levels[0]
    xs = tile_positions(64, 32, 8)
    assert xs == [0, 16, 32]
    # the first tile made alone (same seed) survives whole: the next tile, overlapping its
    # right half, was given that half as known pixels and returned it unchanged
    first = synthesize_slide(m32, 1, (1, 1), [1.0], seed=5, sampler=FAST).levels[0]
    assert np.abs(first.astype(int) - img[:, :32].astype(int)).max() <= 1
    # feathered seams (the default) keep the known pixels too, except the feather_px columns
    # next to the new tile's own pixels, which cross-fade into them
    fe = synthesize_slide(m32, 1, (1, 2), [1.0], seed=5, sampler=FAST)
    assert fe.seams == "feather" and fe.feather_px == 4
    assert np.abs(first[:, :28].astype(int) - fe.levels[0][:, :28].astype(int)).max() <= 1
    assert np.abs(first[:, 28:32].astype(int) - fe.levels[0][:, 28:32].astype(int)).max() > 1


def test_without_seam_inpainting_neighbours_are_overwritten(m32):
    """The seam ablation: with ``inpaint_seams=False`` a tile gets no known pixels, so the next
    tile overwrites the overlap with its own unrelated pixels."""
    kw = dict(sampler=FAST, seed=5)
    first = synthesize_slide(m32, 1, (1, 1), [1.0], **kw).levels[0]
    pyr = synthesize_slide(m32, 1, (1, 2), [1.0], inpaint_seams=False, **kw)
    assert pyr.inpaint_seams is False  # pyramid_seams then measures at the tile origins
    plain = pyr.levels[0]
    assert np.abs(first[:, :16].astype(int) - plain[:, :16].astype(int)).max() <= 1  # not overlapped: same
    assert np.abs(first[:, 16:32].astype(int) - plain[:, 16:32].astype(int)).mean() > 5  # overwritten


def test_tile_filter_regenerates_near_copies(m32):
    levels, layout = [1.0], (1, 2)
    # hard seams, so each final window is exactly the tile the filter saw (feathering would
    # cross-fade the first tile's last columns into the second tile afterwards)
    FAST = SamplerConfig(name="dpmpp_2m", steps=1, guidance_scale=1.0, zoom_start=0.5)
    kw = dict(seams="inpaint")
    ref = synthesize_slide(m32, 0, layout, levels, seed=11, sampler=FAST, **kw)
    px = 32
    xs = tile_positions(64, px, px // 4)
    ref_tiles = torch.stack([torch.from_numpy(ref.levels[0][:, x:x + px]).permute(2, 0, 1).float() / 127.5 - 1 for x in xs])
    calls = []

    def near_copy(images: torch.Tensor, level: int) -> torch.Tensor:
        """Flags tiles within a small L2 distance of any reference ("training") tile."""
        calls.append(images.shape[0])
        d = torch.cdist(images.flatten(1), ref_tiles.flatten(1)).amin(1) / images[0].numel() ** 0.5
        return d < 0.02

    out = synthesize_slide(m32, 0, layout, levels, seed=11, sampler=FAST, tile_filter=near_copy, **kw)
    # the first attempt reproduces the reference exactly, so its first tile is flagged and regenerated
    assert out.n_filtered >= 1
    assert sum(calls) == 3 + out.n_filtered
    final = torch.stack([torch.from_numpy(out.levels[0][:, x:x + px]).permute(2, 0, 1).float() / 127.5 - 1 for x in xs])
    assert not near_copy(final, 0).any()

    with pytest.raises(StageError, match="still flagged"):
        synthesize_slide(m32, 0, layout, levels, seed=11, sampler=FAST, max_retries=1,
                         tile_filter=lambda im, lv: torch.ones(im.shape[0], dtype=torch.bool))


def test_bad_levels_and_labels(m32):
    with pytest.raises(StageError, match="integer zoom"):
        synthesize_slide(m32, 0, (1, 1), [1.0, 0.4], seed=0, sampler=FAST)
    with pytest.raises(StageError, match="outside"):
        synthesize_slide(m32, 7, (1, 1), [1.0], seed=0, sampler=FAST)


def _pyr(levels: list[np.ndarray]) -> Pyramid:
    return Pyramid(levels=levels, mpp=[2.0 / 2**k for k in range(len(levels))], tile_px=32, seed=0, label=None)


def test_consistency_metric():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    base = np.stack([128 + 60 * np.sin(xx / 7), 128 + 60 * np.cos(yy / 9), 128 + 40 * np.sin((xx + yy) / 11)], -1)
    base = base.astype(np.uint8)
    same = _pyr([base, base.repeat(2, 0).repeat(2, 1), base.repeat(4, 0).repeat(4, 1)])
    q = consistency(same)
    assert all(d["psnr"] > 40 and d["ssim"] > 0.99 for d in q)
    noise = _pyr([base, rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)])
    (d,) = consistency(noise)
    assert d["psnr"] < 20 and d["ssim"] < 0.3


def test_seam_score():
    yy, xx = np.mgrid[0:128, 0:128].astype(float)
    smooth = np.stack([128 + 50 * np.sin(xx / 13) * np.cos(yy / 17)] * 3, -1).astype(np.uint8)
    s = seam_score(smooth, 32)
    assert 0.8 < s < 1.2
    seamed = smooth.astype(int)
    for by in range(0, 128, 32):
        for bx in range(0, 128, 32):
            seamed[by:by + 32, bx:bx + 32] += ((by // 32 + bx // 32) % 2) * 25
    seamed = np.clip(seamed, 0, 255).astype(np.uint8)
    assert seam_score(seamed, 32) > 3.0
    # overlapping grid: borders at j * stride + overlap
    assert seam_score(smooth, 32, 24) == pytest.approx(1.0, abs=0.2)
    with pytest.raises(ValueError, match="stride"):
        seam_score(smooth, 32, 40)
