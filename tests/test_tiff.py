"""Pyramidal TIFF: objective power, intermediate 2x levels, JPEG, opened by OpenSlide."""

from __future__ import annotations

import numpy as np
import openslide
import pytest

from synthpath.generate.synthesis import Pyramid
from synthpath.generate.tiff import half, write_pyramid_tiff


def _levels():
    rng = np.random.default_rng(0)
    fine = np.repeat(np.repeat(rng.integers(0, 256, (128, 160, 3), dtype=np.uint8), 4, 0), 4, 1)  # 512 x 640
    return [fine[::4, ::4].copy(), fine]  # 4 µm/px and 1 µm/px: 4x apart


def test_intermediate_levels_objective_power_and_zlib(tmp_path):
    coarse, fine = _levels()
    pyr = Pyramid(levels=[coarse, fine], mpp=[4.0, 1.0], tile_px=64, seed=3, label=1)
    path = write_pyramid_tiff(pyr, tmp_path / "s.tiff")
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.objective-power"] == "10"
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(1.0)
        # downsamples 1, 2 (inserted between levels 4x apart), 4 (synthesised, fits a 256 px tile)
        assert [round(d) for d in s.level_downsamples] == [1, 2, 4]
        assert np.array_equal(np.asarray(s.read_region((0, 0), 0, (640, 512)).convert("RGB")), fine)
        assert np.array_equal(np.asarray(s.read_region((0, 0), 2, (160, 128)).convert("RGB")), coarse)
        assert np.array_equal(np.asarray(s.read_region((0, 0), 1, (320, 256)).convert("RGB")), half(fine))


def test_levels_below_the_coarsest(tmp_path):
    _, fine = _levels()
    path = write_pyramid_tiff(Pyramid(levels=[fine], mpp=[0.5], tile_px=64, seed=0, label=None), tmp_path / "f.tiff")
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.objective-power"] == "20"
        assert [round(d) for d in s.level_downsamples] == [1, 2, 4]  # 640 -> 320 -> 160 px (one tile)
        assert np.array_equal(np.asarray(s.read_region((0, 0), 2, (160, 128)).convert("RGB")), half(half(fine)))


def test_jpeg(tmp_path):
    pytest.importorskip("imagecodecs")
    yy, xx = np.mgrid[0:512, 0:640]
    fine = np.stack([128 + 100 * np.sin(xx / 23.0), 128 + 90 * np.cos(yy / 17.0), 120 + 0 * xx], -1).astype(np.uint8)
    pyr = Pyramid(levels=[half(half(fine)), fine], mpp=[4.0, 1.0], tile_px=64, seed=3, label=1)
    z = write_pyramid_tiff(pyr, tmp_path / "z.tiff")
    j = write_pyramid_tiff(pyr, tmp_path / "j.tiff", compression="jpeg", jpeg_quality=90)
    import tifffile
    with tifffile.TiffFile(j) as t, tifffile.TiffFile(z) as tz:
        assert {p.compression.name for p in t.pages} == {"JPEG"}
        assert {p.compression.name for p in tz.pages} == {"ADOBE_DEFLATE"}
    with openslide.OpenSlide(str(j)) as s:
        got = np.asarray(s.read_region((0, 0), 0, (640, 512)).convert("RGB")).astype(int)
        assert np.abs(got - fine).mean() < 3  # lossy but faithful
        assert s.properties["openslide.objective-power"] == "10"
    with pytest.raises(ValueError, match="compression"):
        write_pyramid_tiff(pyr, tmp_path / "x.tiff", compression="lzw")


def test_half_rounds_box_average():
    a = np.zeros((4, 6, 3), np.uint8)
    a[0, 0], a[1, 1] = 255, 1
    h = half(a, band=1)
    assert h.shape == (2, 3, 3) and h[0, 0, 0] == (255 + 1 + 2) // 4 and h[1:].max() == 0
