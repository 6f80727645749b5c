"""The release filter as an attacker tries it: planted copies of real demo training tiles
under dihedral transforms, half-tile shifts with real neighbouring tissue, scale, stain,
JPEG and blur; the filter failing closed on missing/corrupt files and NaN thresholds; and
every window of a released TIFF level checked (a copy planted between generation windows
is caught)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from synthpath.audit.filter import ReleaseFilter, ReleaseFilterError
from synthpath.audit.verify import verify_canvas, window_origins
from synthpath.features import PixelSpace


# --------------------------------------------------------------------------- a tiny filter + model
sys.path.insert(0, str(Path(__file__).parent))
from generate_common import filter_run_dirs, generate_ctx  # noqa: E402
from generate_common import train_tiles as _train_tiles  # noqa: E402


def _run_dirs(tmp_path: Path, *, slides: bool = False, tau: float = 0.3):
    """Recipe + upstream folders: a tiny untrained model, a passing audit report and a
    ReleaseFilter on random 'training' tiles (pixel space) with a tight threshold."""
    return filter_run_dirs(tmp_path, name="copyfilter",
                           generate={"n_slides": 2, "samples_per_slide": 1, "mode": "slides" if slides else "stacks",
                                     "max_filter_retries": 2},
                           export_slides=slides, thresholds={"d1": tau, "cal": 0.5})


_ctx = generate_ctx


# --------------------------------------------------------------------------- fails closed
def test_filter_fails_closed_on_missing_corrupt_and_mismatched_files(tmp_path):
    from synthpath.generate import runner

    recipe, dirs = _run_dirs(tmp_path)
    folder = dirs["audit"] / "filter"
    flt = ReleaseFilter.load(dirs["audit"], device="cpu")
    assert flt(_train_tiles()[:4], 1).all(), "exact training tiles are copies"

    path = folder / "train_pixel_L1.safetensors"
    saved = path.read_bytes()
    path.unlink()
    with pytest.raises(ReleaseFilterError, match=r"train_pixel_L1\.safetensors is missing"):
        ReleaseFilter.load(dirs["audit"], device="cpu")
    # generation loads the filter the same way and stops with the same error
    with pytest.raises(ReleaseFilterError, match=r"train_pixel_L1\.safetensors is missing"):
        runner._load_model_and_filter(_ctx(recipe, dirs), torch.device("cpu"))
    with pytest.raises(ReleaseFilterError, match=r"train_pixel_L1\.safetensors is missing"):
        runner.run(_ctx(recipe, dirs))
    assert not list((recipe.output_dir / "generate.partial" / "shards").glob("*.tar"))

    path.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(ReleaseFilterError, match=r"train_pixel_L1\.safetensors is corrupt"):
        ReleaseFilter.load(dirs["audit"], device="cpu")
    path.write_bytes(saved)
    ReleaseFilter.load(dirs["audit"], device="cpu")

    doc = json.loads((folder / "filter.json").read_text())
    bad = json.loads(json.dumps(doc))
    bad["n_train"]["pixel/L0"] = 99
    (folder / "filter.json").write_text(json.dumps(bad))
    with pytest.raises(ReleaseFilterError, match=r"train_pixel_L0\.safetensors holds 12 .* n_train\[pixel/L0\] = 99"):
        ReleaseFilter.load(dirs["audit"], device="cpu")
    bad = json.loads(json.dumps(doc))
    del bad["n_train"]
    (folder / "filter.json").write_text(json.dumps(bad))
    with pytest.raises(ReleaseFilterError, match="missing key 'n_train'"):
        ReleaseFilter.load(dirs["audit"], device="cpu")


def test_nan_or_missing_threshold_is_an_error_not_a_pass(tmp_path):
    from synthpath.generate import runner

    recipe, dirs = _run_dirs(tmp_path)
    cfg = dirs["audit"] / "filter" / "filter.json"
    doc = json.loads(cfg.read_text())
    doc["thresholds"]["pixel"]["1"]["d1"] = float("nan")
    cfg.write_text(json.dumps(doc))  # json writes the bare token NaN, which json.loads accepts
    with pytest.raises(ReleaseFilterError, match=r"filter\.json: threshold 'd1' of space 'pixel' at level 1 is nan"):
        ReleaseFilter.load(dirs["audit"], device="cpu")
    with pytest.raises(ReleaseFilterError, match="is nan, not a finite number"):
        runner.run(_ctx(recipe, dirs))
    assert not list((recipe.output_dir / "generate.partial" / "shards").glob("*.tar"))
    del doc["thresholds"]["pixel"]["0"]
    doc["thresholds"]["pixel"]["1"]["d1"] = 0.3
    cfg.write_text(json.dumps(doc))
    with pytest.raises(ReleaseFilterError, match="no threshold for space 'pixel' at level 0"):
        ReleaseFilter.load(dirs["audit"], device="cpu")
    # a filter built in memory with a NaN threshold is refused too
    space = PixelSpace(16)
    with pytest.raises(ReleaseFilterError, match="not a finite number"):
        ReleaseFilter({"pixel": space}, {("pixel", 0): space.embed(_train_tiles())},
                      {"pixel": {0: {"d1": float("nan"), "cal": 0.5}}}, n=3, levels=[1.0])


# --------------------------------------------------------------------------- every released pixel
def test_canvas_verification_catches_a_copy_between_generation_windows(tmp_path):
    from synthpath.generate.synthesis import tile_positions

    _, dirs = _run_dirs(tmp_path)
    flt = ReleaseFilter.load(dirs["audit"], device="cpu")
    assert flt.shift_tolerance_px == 8
    rng = np.random.default_rng(5)
    canvas = [rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8),
              rng.integers(0, 255, size=(48, 48, 3), dtype=np.uint8)]
    clean = verify_canvas(flt, canvas, 16)
    assert clean.passed and clean.stride == 8 and clean.windows == [1, 25]
    assert window_origins(48, 16, 8) == [0, 8, 16, 24, 32] and window_origins(44, 16, 8)[-1] == 28
    # a training tile pasted where no generation window sits (generation windows start at 0, 11, 21, 32)
    gen = tile_positions(48, 16, 4)
    y, x = 5, 27
    assert y not in gen and x not in gen
    tile = ((_train_tiles()[3].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    planted = [canvas[0], canvas[1].copy()]
    planted[1][y:y + 16, x:x + 16] = tile
    caught = verify_canvas(flt, planted, 16)
    assert not caught.passed and all(k == 1 for k, _, _ in caught.flagged)
    assert any(abs(a - y) <= 4 and abs(b - x) <= 4 for _, a, b in caught.flagged)


def test_every_window_of_released_tiff_levels_passed(tmp_path, monkeypatch):
    """Generation with TIFF slides: the finished canvas is verified before a TIFF is written;
    a slide whose canvas holds a copy (planted between generation windows, as a seam overwrite
    could) is re-synthesised, and every window of every level of the written TIFF passes."""
    import tifffile

    from synthpath.generate import runner, synthesis

    recipe, dirs = _run_dirs(tmp_path, slides=True)
    tile = ((_train_tiles()[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    real = synthesis.synthesize_slides
    calls = {"n": 0}

    def planting(*args, **kwargs):
        pyrs = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:  # the first synthesis leaves a training tile at (3, 9) of the finest level
            pyrs[0].levels[1][3:19, 9:25] = tile
        return pyrs

    monkeypatch.setattr(synthesis, "synthesize_slides", planting)
    summary = runner.run(_ctx(recipe, dirs))
    assert calls["n"] >= 2, "the slide with the planted copy was re-synthesised"
    flt = ReleaseFilter.load(dirs["audit"], device="cpu")
    tiffs = sorted((recipe.output_dir / "generate.partial" / "slides").glob("*.tiff"))
    assert [p.name for p in tiffs] == summary["slide_tiffs"] and len(tiffs) == 2
    for p in tiffs:
        with tifffile.TiffFile(p) as tf:
            pages = [pg.asarray() for pg in tf.pages]
        levels = pages[::-1]  # TIFF: finest first; synthesis: coarsest first
        assert [a.shape[:2] for a in levels] == [(16, 16), (32, 32)]
        check = verify_canvas(flt, levels, 16, stride=1)  # every 16-px window, at every offset
        assert check.passed and check.windows == [1, 17 * 17], check.flagged
        assert not (levels[1][3:19, 9:25] == tile).all()


# --------------------------------------------------------------------------- planted copies, real tiles
@pytest.fixture(scope="module")
def pixel_calibrated(demo_store, tmp_path_factory):
    """The audit's calibration with the pixel space alone on the real demo tile store."""
    from synthpath.audit.report import calibrate
    from synthpath.recipe import AuditConfig
    from synthpath.tiles.store import TileStore

    store = TileStore(demo_store)
    cfg = AuditConfig(feature_spaces=["pixel"], k_neighbours=10, holdout_quantile=0.01, device="cpu")
    return store, calibrate(store, cfg, tmp_path_factory.mktemp("copy_cal"), device="cpu", seed=0)


def test_planted_copies_under_transforms_are_caught(pixel_calibrated):
    from synthpath.audit import copies

    store, cal = pixel_calibrated
    level = 1  # 1 µm/px: the level with the most context per tile in the tiny demo
    ids = cal.train_ids[level]
    pick = list(range(0, len(ids), max(1, len(ids) // 16)))[:16]
    train = store.read_images([ids[i] for i in pick])
    sources = copies.tile_sources(store, [ids[i] for i in pick])
    attacks = copies.attacks(store.tile_px)
    t = store.tile_px
    for name in ("flip_h", "rot90", "transpose", f"shift_{t // 2}px_diag", f"shift_{t // 2},-{t // 4}px",
                 "scale_1.1", "stain_jitter", "jpeg_q50", "blur_s1.5"):
        planted = copies.plant(train, sources, attacks[name], seed=1)
        x = torch.from_numpy(planted).permute(0, 3, 1, 2).float() / 127.5 - 1
        res = cal.filter.check(x, level)["pixel"]
        assert res["copy"].all(), f"{name}: missed {int((~res['copy']).sum())} of {len(pick)} (d1 {res['d1']})"
    # held-out patients' real tiles: at most 2% flagged by the same rule over the whole holdout
    # (the rate the copy gate tests against; benchmarks/bench_copies.py also measures it out of
    # sample, leaving one holdout patient out of the calibration)
    from synthpath.audit.calibration import holdout_false_positive_rate

    fpr = holdout_false_positive_rate(cal)
    assert fpr["n"] >= 200 and fpr["rate"] <= 0.02, fpr
    # at this level (43 holdout tiles) the 1% quantile lies between the two smallest distances, so
    # the rule can flag at most the one tile that is smallest in both d1 and the calibrated distance
    th = cal.thresholds["pixel"][level]
    d1 = torch.cat(cal.holdout_d1[("pixel", level)])
    cl = torch.cat(cal.holdout_cal[("pixel", level)])
    assert d1.numel() >= 40
    assert int(((d1 <= th["d1"]) & (cl <= th["cal"])).sum()) <= 1


def test_zoomed_half_shifted_copies_with_every_part_cropped_are_caught(pixel_calibrated):
    """The hard case at 1 µm/px: a training tile zoomed in to 0.9 and moved by (-T/2, T/2 - 3)
    px, real neighbouring tissue filling the rest. The copy keeps only ~26 x 29 px of its
    source, so no half-tile reference part lies wholly inside it: only the masked matching of
    border-cropped parts (synthpath/audit/overhang.py) finds it. NOT yet every such copy
    (the issue's target): 2 of these 16 are still missed (see RESULTS.md, issue 12 (h12c))."""
    from synthpath.audit import copies
    from synthpath.audit.filter import bank_index, search_images

    store, cal = pixel_calibrated
    level, t = 1, store.tile_px
    ids = cal.train_ids[level]
    pick = list(range(0, len(ids), max(1, len(ids) // 16)))[:16]
    sources = copies.tile_sources(store, [ids[i] for i in pick])
    planted = np.stack([s.read(-(t // 2), t // 2 - 3, 0.9) for s in sources])
    x = torch.from_numpy(planted).permute(0, 3, 1, 2).float() / 127.5 - 1
    res = cal.filter.check(x, level)["pixel"]
    assert int(res["copy"].sum()) >= 14, f"flagged {int(res['copy'].sum())} of 16 (d1 {res['d1']}, cal {res['cal']})"
    # the crop is what defeats whole-part matching: against its own source tile no copy is
    # within the threshold without the partial overlaps, and about half are with them (the
    # flagged rest are nearest to another training tile)
    bank = cal.train_features[("pixel", level)]
    tau = cal.thresholds["pixel"][level]["d1"]
    near = {}
    for ov in (0, 2):
        sp = PixelSpace(t, device="cpu", overhang_cells=ov)
        d = torch.stack([search_images(sp, bank_index(bank[i:i + 1], "cpu", sp), x[j:j + 1], 1).dist[0, 0]
                         for j, i in enumerate(pick)])
        near[ov] = int((d <= tau).sum())
    assert near[0] == 0 and near[2] >= 8, (near, tau)  # measured: 0 and 9 of 16 (tau 0.280)


def test_held_out_offset_windows_stay_within_the_rate(pixel_calibrated):
    """Held-out real windows the thresholds never saw (16-px offsets, wholly inside one
    held-out patient's tiles) are flagged at no more than 2% at 1 µm/px (where the 43 grid
    tiles can only say 0 or 1 flag)."""
    from synthpath.audit.holdout_windows import offset_windows, rate_interval

    store, cal = pixel_calibrated
    level = 1
    imgs, pats, where = offset_windows(store, level)
    assert len(imgs) == len(pats) == len(where) and all(dy or dx for _, dy, dx in where)
    holdout_pats = {p for p, s in zip(store.index.column("patient_id").to_pylist(),
                                      store.index.column("split").to_pylist()) if s == "holdout"}
    assert set(pats) <= holdout_pats  # no training patient's pixels in any window
    x = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    flags = cal.filter(x, level)
    r = rate_interval(int(flags.sum()), len(flags))
    assert r["n"] >= 100 and r["rate"] <= 0.02, r
