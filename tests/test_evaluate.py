"""Evaluation: fidelity metrics on planted distributions, classifier utility on toy tasks,
the standalone example script, and the evaluate stage on a tiny built pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synthpath.evaluate import fidelity as fid
from synthpath.evaluate import utility as ut

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- toy data
def textures(n: int, seed: int, size: int = 16, noise: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes of coloured textures: 0 = pinkish horizontal stripes, 1 = purple vertical
    stripes, with random phase, period and pixel noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    imgs = np.empty((n, size, size, 3), dtype=np.float64)
    grid = np.arange(size)
    for i in range(n):
        period = rng.uniform(3, 6)
        phase = rng.uniform(0, 2 * np.pi)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * grid / period + phase)
        pattern = wave[:, None] * np.ones(size)[None, :] if y[i] == 0 else np.ones(size)[:, None] * wave[None, :]
        base = np.array([220, 120, 170]) if y[i] == 0 else np.array([130, 80, 190])
        imgs[i] = base * (0.6 + 0.4 * pattern[..., None])
    imgs += rng.normal(0, noise, imgs.shape)
    return np.clip(imgs, 0, 255).astype(np.uint8), y


HP = ut.Hyper(epochs=4, batch_size=32, lr=3e-3, val_fraction=0.2)


# --------------------------------------------------------------------------- FID / KID / PR
def test_fid_zero_for_identical_and_grows_with_noise():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 16))
    assert fid.frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    prev = 0.0
    for sigma in (0.2, 0.5, 1.0, 2.0):
        f = fid.frechet_distance(real, real + rng.normal(0, sigma, real.shape))
        assert f > prev
        prev = f


def test_fid_matches_closed_form_for_gaussians():
    # diagonal covariances: FID = |mu1-mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2))
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    expect = 1 + 0 + 4 + (1 + 4 - 4) + (4 + 1 - 4) + (9 + 1 - 6)
    assert fid.frechet_from_stats(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-9)
    # rank-deficient covariances (fewer samples than dimensions) stay real and finite
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 50)), rng.normal(size=(12, 50))
    v = fid.frechet_distance(a, b)
    assert np.isfinite(v) and v > 0


def test_kid_near_zero_for_same_distribution_and_grows():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 8))
    same = rng.normal(size=(300, 8))
    k0 = fid.kernel_inception_distance(real, same, subsets=20, subset_size=100, seed=0)
    k1 = fid.kernel_inception_distance(real, same + 0.5, subsets=20, subset_size=100, seed=0)
    k2 = fid.kernel_inception_distance(real, same + 1.5, subsets=20, subset_size=100, seed=0)
    assert abs(k0["mean"]) < 3 * k0["std"] + 1e-3
    assert k0["mean"] < k1["mean"] < k2["mean"]
    assert k1["mean"] > 3 * k1["std"]


def test_precision_recall_on_planted_modes():
    rng = np.random.default_rng(3)
    mode_a = rng.normal(0, 1, size=(200, 4))
    mode_b = rng.normal(0, 1, size=(200, 4)) + 12.0
    real = np.concatenate([mode_a, mode_b])
    # synthetic covers only mode A: precise but half the recall
    only_a = rng.normal(0, 1, size=(200, 4))
    pr = fid.precision_recall(real, only_a)
    assert pr["precision"] > 0.9
    assert 0.35 < pr["recall"] < 0.6
    # synthetic far from the data: no precision, no recall
    far = rng.normal(0, 1, size=(200, 4)) - 30.0
    pr = fid.precision_recall(real, far)
    assert pr["precision"] < 0.05 and pr["recall"] < 0.05
    # same distribution: both high
    pr = fid.precision_recall(real, np.concatenate([rng.normal(0, 1, (200, 4)), rng.normal(0, 1, (200, 4)) + 12]))
    assert pr["precision"] > 0.8 and pr["recall"] > 0.8


def test_bad_features_are_named():
    with pytest.raises(ValueError, match="synthetic"):
        fid.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4))[:, :3][:1])
    with pytest.raises(ValueError, match="dimensions differ"):
        fid.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(np.full((5, 3), np.nan), np.zeros((5, 3)))


def test_random_crops_native_resolution_and_seeded():
    slide = np.arange(40 * 30 * 3, dtype=np.uint32).reshape(40, 30, 3).astype(np.uint8)
    a = fid.pyramid_crops([slide], 5, 8, seed=0)
    b = fid.pyramid_crops([slide], 5, 8, seed=0)
    assert a.shape == (5, 8, 8, 3) and np.array_equal(a, b)
    # each crop is a verbatim window of the slide
    for c in a:
        hits = [(y, x) for y in range(33) for x in range(23) if np.array_equal(slide[y:y + 8, x:x + 8], c)]
        assert hits
    with pytest.raises(ValueError, match="smaller than the crop"):
        fid.random_crops([slide[:4]], 1, 8, seed=0)


# --------------------------------------------------------------------------- utility
def test_auroc_and_metrics():
    y = np.array([0, 0, 1, 1])
    assert ut.auroc_binary(y == 1, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
    m = ut.classification_metrics(y, probs, 2)
    assert m["accuracy"] == pytest.approx(0.75) and m["auroc"] == pytest.approx(0.75)
    assert m["confusion"] == [[2, 0], [1, 1]]
    ci = ut.mean_ci([0.8, 0.9, 1.0])
    assert ci["mean"] == pytest.approx(0.9) and ci["ci_low"] < 0.9 < ci["ci_high"]


def test_validation_is_carved_by_group():
    labels = np.array([0, 1] * 10)
    groups = np.repeat(np.arange(5), 4)
    mask = ut.carve_validation(labels, groups, 0.2, seed=0)
    assert 0 < mask.sum() < 20
    # no group on both sides
    assert not set(groups[mask]) & set(groups[~mask])


def test_tstr_equals_trtr_when_synthetic_is_the_training_set():
    x, y = textures(240, seed=0)
    tx, ty = textures(160, seed=1)
    perm = np.random.default_rng(5).permutation(len(y))
    real = ut.Split(x, y)
    synth = ut.Split(x[perm], y[perm])
    test = ut.Split(tx, ty)
    trtr = ut.run_setting(real, test, 2, HP, seeds=[0, 1])
    tstr = ut.run_setting(synth, test, 2, HP, seeds=[0, 1])
    a, b = trtr["summary"]["balanced_accuracy"]["mean"], tstr["summary"]["balanced_accuracy"]["mean"]
    assert a > 0.9 and b > 0.9
    assert abs(a - b) < 0.08
    assert 0.9 < ut.ratio(tstr, trtr, "balanced_accuracy") < 1.1
    # deterministic on CPU
    again = ut.run_setting(real, test, 2, HP, seeds=[0])
    assert again["runs"][0]["accuracy"] == trtr["runs"][0]["accuracy"]


def test_tstr_at_chance_with_shuffled_labels():
    x, y = textures(240, seed=0)
    tx, ty = textures(200, seed=1)
    shuffled = np.random.default_rng(9).permutation(y)
    tstr = ut.run_setting(ut.Split(x, shuffled), ut.Split(tx, ty), 2, HP, seeds=[0, 1])
    s = tstr["summary"]
    assert 0.3 < s["balanced_accuracy"]["mean"] < 0.7
    assert 0.25 < s["auroc"]["mean"] < 0.75


def test_unknown_classifier_is_a_clear_error():
    with pytest.raises(ValueError, match="evaluate.classifier"):
        ut.build_classifier("resnet18_not_here", 2)


# --------------------------------------------------------------------------- example script
def write_hf_dataset(folder: Path, n_train: int = 96, n_test: int = 64) -> None:
    """A tiny dataset in the released layout: Parquet splits, image_<level> columns, ClassLabel."""
    import datasets
    from PIL import Image

    feats = datasets.Features({"image_20x": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"]),
                               "slide_id": datasets.Value("string")})
    (folder / "data").mkdir(parents=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = textures(n, seed=seed)
        ds = datasets.Dataset.from_dict(
            {"image_20x": [Image.fromarray(im) for im in x], "label": y.tolist(),
             "slide_id": [f"s{i % 4}" for i in range(n)]}, features=feats)
        ds.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))


def test_example_script_trains_from_hf_dataset(tmp_path, capsys):
    write_hf_dataset(tmp_path / "hf")
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_classifier.py"), str(tmp_path / "hf"),
         "--level", "image_20x", "--epochs", "3", "--lr", "3e-3"],
        capture_output=True, text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
                                                           "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("test accuracy:")]
    assert line, out.stdout
    assert float(line[0].split()[2]) > 0.8
    # a wrong column name is a clear error (checked in-process: no second interpreter start)
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_classifier", ROOT / "examples" / "train_classifier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(tmp_path / "hf"), "--level", "image_40x"]) == 2
    assert "image_40x" in capsys.readouterr().err


# --------------------------------------------------------------------------- the stage
def build_world(root: Path, *, n_patients: int = 6, per_patient: int = 8, n_syn: int = 24, tile: int = 16):
    """A tiny tile store (real train/holdout patients, two levels) and an exported HF dataset
    in the release layout, both built through their public formats."""
    import datasets
    from PIL import Image

    from synthpath.tiles.store import write_tile_store

    levels = [1.0, 0.5]
    classes = ["a", "b"]
    recs = []
    for p in range(n_patients):
        x, y = textures(per_patient * 2, seed=100 + p, size=tile)
        for i in range(per_patient * 2):
            lv = i % 2
            recs.append({"tile_id": f"s{p}/L{lv}/{i}_0", "slide_id": f"s{p}", "patient_id": f"p{p}", "level": lv,
                         "mpp": levels[lv], "x": i * 64, "y": 0, "size0": 64, "parent_id": None,
                         "label": int(y[i]), "label_name": classes[int(y[i])],
                         "split": "holdout" if p >= n_patients - 2 else "train", "tissue_fraction": 1.0,
                         "image": x[i]})
    write_tile_store(root / "ingest", recs, levels=levels, tile_px=tile, classes=classes)
    (root / "ingest" / "manifest.json").write_text("{}")
    feats = datasets.Features({"image_10x": datasets.Image(), "image_20x": datasets.Image(),
                               "label": datasets.ClassLabel(names=classes), "slide_id": datasets.Value("string")})
    data = root / "export" / "hf" / "data"
    data.mkdir(parents=True)
    x, y = textures(n_syn, seed=7, size=tile)
    ds = datasets.Dataset.from_dict(
        {"image_10x": [Image.fromarray(im) for im in x],
         "image_20x": [Image.fromarray(np.ascontiguousarray(im[:, ::-1])) for im in x],  # same class, mirrored
         "label": y.tolist(), "slide_id": [f"syn{i % 4}" for i in range(n_syn)]}, features=feats)
    ds.to_parquet(str(data / "train-00000-of-00001.parquet"))
    # what the card writer reads from the upstream stages (their documented files)
    (root / "export" / "export.json").write_text(json.dumps({
        "classes": classes, "level_names": ["10x", "20x"],
        "splits": {"train": {"num_examples": n_syn, "num_bytes": 1, "files": ["data/train-00000-of-00001.parquet"],
                             "slides": [f"syn{i}" for i in range(4)]}}}))
    (root / "audit").mkdir()
    (root / "audit" / "report.json").write_text(json.dumps({"passed": True, "checks": {}}))
    # two synthetic slides as pyramidal TIFFs (MODEL's writer): a 64 px mosaic of textures at
    # 20x and its 2x box-downsample at 10x
    from synthpath.generate.synthesis import Pyramid
    from synthpath.generate.tiff import write_pyramid_tiff

    for k in range(2):
        xs, _ = textures(16, seed=50 + k, size=tile)
        fine = xs.reshape(4, 4, tile, tile, 3).transpose(0, 2, 1, 3, 4).reshape(4 * tile, 4 * tile, 3)
        coarse = fine.reshape(2 * tile, 2, 2 * tile, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
        write_pyramid_tiff(Pyramid(levels=[coarse, fine], mpp=levels, tile_px=tile, seed=k, label=0),
                           root / "generate" / "slides" / f"syn{k}.tiff")
    (root / "generate" / "shards").mkdir(parents=True)
    (root / "generate" / "shards" / "index.json").write_text(json.dumps({"shards": []}))
    return levels, classes


def tiny_recipe(root: Path, levels, classes, **evaluate):
    from synthpath.recipe import parse_recipe

    ev = {"epochs": 2, "batch_size": 16, "seeds": [0, 1], "max_fidelity_samples": 8, "lr": 3e-3}
    ev.update(evaluate)
    return parse_recipe({
        "name": "evaltest", "output_dir": str(root), "seed": 0,
        "data": {"slides": [{"path": str(root / "none.svs")}], "classes": classes},
        "ingest": {"tiling": {"levels": levels, "tile_px": 16}},
        "evaluate": ev,
    }, check_files=False)


def test_stage_writes_report_plots_and_card(tmp_path):
    from synthpath.pipeline import StageContext
    from synthpath.evaluate import stage

    levels, classes = build_world(tmp_path)
    recipe = tiny_recipe(tmp_path, levels, classes)
    work = tmp_path / "evaluate.partial"
    work.mkdir()
    ctx = StageContext(recipe=recipe, name="evaluate", workdir=work,
                       inputs={"ingest": tmp_path / "ingest", "export": tmp_path / "export"})
    summary = stage.run(ctx)
    report = json.loads((work / "report.json").read_text())
    assert set(report["levels"]) == {"10x", "20x"}
    for name in ("10x", "20x"):
        lv = report["levels"][name]
        assert lv["counts"] == {"real_train": 32, "real_holdout": 16, "synthetic": 24,
                                "real_holdout_per_class": lv["counts"]["real_holdout_per_class"],
                                "synthetic_per_class": lv["counts"]["synthetic_per_class"]}
        for s in ("tstr", "trtr", "mixed"):
            assert [r["seed"] for r in lv["utility"][s]["runs"]] == [0, 1]
            assert lv["utility"][s]["n_test"] == 16
        assert lv["utility"]["tstr_trtr_ratio"]["balanced_accuracy"] is not None
        assert lv["fidelity"]["feature_space"] == "efficientnet" and lv["fidelity"]["fid"] >= 0
        assert lv["fidelity"]["n_real"] == 8 and lv["fidelity"]["n_synthetic"] == 8
        assert (work / f"confusion_tstr_{name}.png").stat().st_size > 0
        assert (work / f"real_vs_synthetic_{name}.png").stat().st_size > 0
        assert lv["pfid"]["n_crops"] == 8 and lv["pfid"]["crop_px"] == 8 and lv["pfid"]["pfid"] >= 0
    assert report["cascade"]["n_slides"] == 2
    # the 10x level IS the box-downsampled 20x level: consistency is near perfect
    assert report["cascade"]["per_level"]["20x"]["ssim_vs_coarser"] > 0.95
    assert report["slide_errors"] == []
    assert (work / "metrics.png").stat().st_size > 0
    assert summary["levels"]["20x"]["tstr_balanced_accuracy"] is not None
    assert not (work / "hf_cache").exists()
    card = (tmp_path / "export" / "hf" / "README.md").read_text()
    section = card.lower().split("utility and fidelity", 1)[1].split("\n## ", 1)[0]
    assert "not evaluated yet" not in section
    assert "tstr_balanced_accuracy" in section and "efficientnet" in section


def test_fid_gram_route_equals_covariance_route():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(30, 64)) * 1.3 + 0.2
    low_rank = fid.frechet_distance(a, b)  # N < D: cross-Gram nuclear norm
    full = fid.frechet_from_stats(*fid.gaussian_stats(a), *fid.gaussian_stats(b))  # D x D eigen route
    assert low_rank == pytest.approx(full, rel=1e-6)


def test_feature_space_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="evaluate.feature_checkpoint"):
        fid.load_feature_space("inception", None)
    with pytest.raises(FileNotFoundError, match="not found"):
        fid.load_feature_space("checkpoint", tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown feature space"):
        fid.load_feature_space("vgg", None)
