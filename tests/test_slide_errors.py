"""The true reason for a slide ingest cannot use, and ``validate`` finding it first:
a truncated real SVS, a file without resolution, a slide folder whose glob matches
nothing, strict mode, and a full or read-only output disk."""

from __future__ import annotations

import errno
import logging
import shutil

import numpy as np
import pytest
import tifffile

from synthpath.cli import main
from synthpath.pipeline import StageError, run_stage
from synthpath.recipe import parse_recipe
from synthpath.slides.diagnose import tiff_damage
from synthpath.slides.mpp import MppError
from synthpath.slides.reader import SlideOpenError, open_slide
from synthpath.slides.testdata import tissue_image


def _recipe_dict(tmp_path, data: dict) -> dict:
    return {"name": "t", "output_dir": str(tmp_path / "run"), "data": {"classes": ["a"], **data},
            "ingest": {"tiling": {"levels": [1.0, 0.5], "tile_px": 32}, "tissue": {"min_tissue_fraction": 0.2},
                       "workers": 1}}


def _write_recipe(tmp_path, data: dict) -> str:
    import yaml

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(_recipe_dict(tmp_path, data)))
    return str(p)


@pytest.fixture
def small_tiff(make_pyramid_tiff):
    return make_pyramid_tiff("small.tif", size=(256, 256), levels=1)


@pytest.fixture
def truncated_svs(tmp_path, demo_slide_path):
    """The real Aperio slide cut to 90 % of its bytes, as an interrupted copy leaves it."""
    data = demo_slide_path.read_bytes()
    p = tmp_path / "cut.svs"
    p.write_bytes(data[: int(len(data) * 0.9)])
    return p


def test_intact_slides_are_not_reported_damaged(demo_slide_path, pyramid_tiff):
    assert tiff_damage(demo_slide_path) is None
    assert tiff_damage(pyramid_tiff) is None


@pytest.mark.parametrize("mpp", [None, 0.5])
def test_truncated_svs_reports_truncation_and_openslides_message(truncated_svs, mpp):
    with pytest.raises(SlideOpenError) as ei:
        open_slide(truncated_svs, mpp)
    msg = str(ei.value)
    assert str(truncated_svs) in msg and "truncated" in msg
    assert "past the end of the" in msg  # where the file stops short
    assert "OpenSlide says" in msg and "Unsupported or missing image file" in msg  # OpenSlide's own words
    assert "decoder error" not in msg and "resolution" not in msg


def test_truncated_data_with_intact_directories_is_found(tmp_path):
    # A TIFF whose directories come first and whose pixel data was cut off.
    p = tmp_path / "front.tif"
    tifffile.imwrite(p, tissue_image(256, 256, seed=1), tile=(64, 64), compression="zlib")
    raw = p.read_bytes()
    cut = tmp_path / "front_cut.tif"
    cut.write_bytes(raw[: len(raw) - 2000])
    assert tiff_damage(p) is None
    assert "image data of directory 0 ends at byte" in tiff_damage(cut)
    with pytest.raises(SlideOpenError, match="truncated"):
        open_slide(cut, 0.5)


def test_ingest_and_validate_name_the_truncated_slide(tmp_path, truncated_svs, capsys):
    recipe = _write_recipe(tmp_path, {"slides": [{"path": str(truncated_svs), "mpp": 0.5, "label": "a"}]})
    assert main(["validate", recipe]) == 2
    err = capsys.readouterr().err
    assert "data.slides.0.path" in err and "truncated" in err and "Traceback" not in err
    with pytest.raises(StageError, match=r"(?s)cut\.svs: the file is truncated"):
        run_stage(parse_recipe(_recipe_dict(tmp_path, {"slides": [{"path": str(truncated_svs), "mpp": 0.5,
                                                                   "label": "a"}]})), "ingest")


def test_no_mpp_message_describes_the_file_and_names_the_override_key(tmp_path):
    p = tmp_path / "scan_07.tif"
    tifffile.imwrite(p, tissue_image(128, 128, seed=3), resolution=(1, 1), resolutionunit="NONE")
    with pytest.raises(MppError) as ei:
        open_slide(p, slide_id="scan_07")
    msg = str(ei.value)
    assert "XResolution = 1" in msg and "'none'" in msg and "no physical unit" in msg
    assert "no TIFF XResolution" not in msg
    assert "data.mpp_overrides: {scan_07: <µm per pixel>}" in msg


def test_validate_catches_a_slide_without_mpp(tmp_path, make_pyramid_tiff, capsys):
    bare = make_pyramid_tiff("bare.tif", size=(256, 256), levels=1, with_mpp=False)
    recipe = _write_recipe(tmp_path, {"slides": [{"path": str(bare), "slide_id": "s1"}]})
    assert main(["validate", recipe]) == 2
    err = capsys.readouterr().err
    assert "data.slides.0.path" in err and "data.mpp_overrides: {s1:" in err
    # With the override the same recipe validates.
    recipe = _write_recipe(tmp_path, {"slides": [{"path": str(bare), "slide_id": "s1"}], "mpp_overrides": {"s1": 0.5}})
    assert main(["validate", recipe]) == 0


def test_validate_catches_an_empty_glob(tmp_path, make_pyramid_tiff, capsys):
    make_pyramid_tiff("slides/one.tif", size=(256, 256), levels=1)
    recipe = _write_recipe(tmp_path, {"slide_dir": str(tmp_path / "slides")})  # default glob *.svs
    assert main(["validate", recipe]) == 2
    err = capsys.readouterr().err
    assert "data.slide_glob" in err and "'*.svs' matches no file" in err and "1 .tif" in err
    with pytest.raises(StageError, match="data.slide_glob"):
        run_stage(parse_recipe(_recipe_dict(tmp_path, {"slide_dir": str(tmp_path / "slides")})), "ingest")
    recipe = _write_recipe(tmp_path, {"slide_dir": str(tmp_path / "slides"), "slide_glob": "*.tif"})
    assert main(["validate", recipe]) == 0


def test_strict_stops_without_a_skipping_warning(tmp_path, truncated_svs, small_tiff, caplog):
    r = parse_recipe(_recipe_dict(tmp_path, {"slides": [{"path": str(truncated_svs), "mpp": 0.5, "label": "a"},
                                                        {"path": str(small_tiff), "label": "a"}]}))
    with caplog.at_level(logging.WARNING):
        with pytest.raises(StageError, match="strict mode: slide 'cut' failed"):
            run_stage(r, "ingest", options={"strict": True})
    assert "skipping slide" not in caplog.text
    assert not (r.output_dir / "ingest").exists()


def test_ingest_blames_a_full_disk_not_the_slide(tmp_path, small_tiff, monkeypatch, caplog):
    import synthpath.slides.ingest as ingest

    class FullDiskWriter:
        def __init__(self, path, schema):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ingest.pq, "ParquetWriter", FullDiskWriter)
    r = parse_recipe(_recipe_dict(tmp_path, {"slides": [{"path": str(small_tiff), "label": "a"}]}))
    with caplog.at_level(logging.WARNING):
        with pytest.raises(StageError) as ei:
            run_stage(r, "ingest")
    msg = str(ei.value)
    assert "the disk is full" in msg and str(r.output_dir / "ingest.partial") in msg
    assert "skipping slide" not in caplog.text and "no slide could be ingested" not in msg
    assert not (r.output_dir / "ingest").exists()


@pytest.mark.parametrize("err,text", [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full"),
                                      (errno.EACCES, "permission denied")])
def test_cli_write_failures_name_the_path_and_finish_nothing(tmp_path, small_tiff, monkeypatch, capsys, err, text):
    import synthpath.pipeline as pipeline

    real = pipeline.write_json

    def failing(path, obj, **kw):
        if path.name == "manifest.json":  # the stage ran; finishing it fails
            raise OSError(err, errno.errorcode[err], str(path))
        return real(path, obj, **kw)

    monkeypatch.setattr(pipeline, "write_json", failing)
    recipe = _write_recipe(tmp_path, {"slides": [{"path": str(small_tiff), "label": "a"}]})
    assert main(["ingest", recipe]) == 1
    e = capsys.readouterr().err
    assert text in e and "manifest.json" in e and "Traceback" not in e and "run the same command again" in e
    out = tmp_path / "run"
    assert not (out / "ingest").exists() and (out / "ingest.partial").is_dir()
    monkeypatch.setattr(pipeline, "write_json", real)
    assert main(["ingest", recipe]) == 0 and (out / "ingest" / "manifest.json").is_file()


def test_cli_names_a_full_disk_in_a_library_error(tmp_path, small_tiff, monkeypatch, capsys):
    # safetensors reports ENOSPC as its own exception type, not OSError.
    import synthpath.slides.ingest as ingest

    class SafetensorError(Exception):
        pass

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(ingest, "summarize", full)
    recipe = _write_recipe(tmp_path, {"slides": [{"path": str(small_tiff), "label": "a"}]})
    assert main(["ingest", recipe]) == 1
    e = capsys.readouterr().err
    assert "the disk is full" in e and str(tmp_path / "run") in e and "Traceback" not in e
    assert not (tmp_path / "run" / "ingest").exists()


def test_output_dir_made_read_only_outside_the_recipe(tmp_path, small_tiff, monkeypatch, capsys):
    # As root, chmod cannot make a folder read-only, so mkdir's EACCES is simulated.
    from pathlib import Path

    real = Path.mkdir

    def denied(self, *a, **k):
        if self == tmp_path / "run":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", denied)
    recipe = _write_recipe(tmp_path, {"slides": [{"path": str(small_tiff), "label": "a"}]})
    assert main(["ingest", recipe]) == 1
    e = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'run'}: permission denied" in e and "Traceback" not in e
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
