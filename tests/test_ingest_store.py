"""Tile store writer/reader and the TileDataset (docs/architecture.md §1)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from synthpath.tiles.dataset import TileDataset
from synthpath.tiles.store import SCHEMA, TileStore, TileStoreError, tile_id, write_tile_store


def _records(rng, tile_px=8):
    """A two-level tree: one parent (16 level-0 px) with four children, plus one lone parent."""
    recs = []

    def rec(slide, level, x, y, size0, parent, patient, split, label):
        img = rng.integers(0, 256, (tile_px, tile_px, 3), dtype=np.uint8)
        recs.append({"tile_id": tile_id(slide, level, x, y), "slide_id": slide, "patient_id": patient,
                     "level": level, "mpp": [2.0, 1.0][level], "x": x, "y": y, "size0": size0,
                     "parent_id": parent, "label": label, "label_name": ["a", "b"][label] if label >= 0 else None,
                     "split": split, "tissue_fraction": 0.9, "image": img})

    rec("s", 0, 0, 0, 16, None, "p1", "train", 0)
    for dy in (0, 8):
        for dx in (0, 8):
            rec("s", 1, dx, dy, 8, "s/L0/0_0", "p1", "train", 1 if dx else 0)
    rec("t", 0, 32, 0, 16, None, "p2", "holdout", -1)
    return recs


def test_store_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    recs = _records(rng)
    store = write_tile_store(tmp_path / "st", recs, levels=[2.0, 1.0], tile_px=8, classes=["a", "b"], shard_tiles=4)
    meta = json.loads((tmp_path / "st" / "store.json").read_text())
    assert meta["n_tiles"] == 6 and meta["levels"] == [2.0, 1.0] and meta["classes"] == ["a", "b"]
    assert len(store.shards) == 2 and all(p.is_file() for p in store.shards)
    assert store.index.num_rows == 6 and "image" not in store.index.column_names
    assert store.index.schema.field("level").type == pa.int16()
    ids = [r["tile_id"] for r in recs]
    got = store.read_images(ids[::-1])
    assert got.shape == (6, 8, 8, 3) and got.dtype == np.uint8
    for r, img in zip(recs[::-1], got):
        assert np.array_equal(img, r["image"])
    batches = list(store.iter_batches(batch_size=4, columns=["tile_id", "split", "image"]))
    assert [b.num_rows for b in batches] == [4, 2]
    train = list(store.iter_batches(batch_size=10, filter={"split": "train"}))
    assert sum(b.num_rows for b in train) == 5
    lvl = list(store.iter_batches(batch_size=10, filter=pc.field("level") == 0, columns=["tile_id"]))
    assert sorted(lvl[0].column(0).to_pylist()) == ["s/L0/0_0", "t/L0/32_0"]
    with pytest.raises(TileStoreError, match="no tile 'nope'"):
        store.read_images(["nope"])


def test_writer_rejects_bad_records(tmp_path):
    rng = np.random.default_rng(1)
    recs = _records(rng)
    with pytest.raises(TileStoreError, match="duplicate tile id"):
        write_tile_store(tmp_path / "a", recs + recs[:1], levels=[2.0, 1.0], tile_px=8, classes=["a", "b"])
    bad = dict(recs[0], image=np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(TileStoreError, match=r"image must be uint8 \[8, 8, 3\]"):
        write_tile_store(tmp_path / "b", [bad], levels=[2.0, 1.0], tile_px=8, classes=["a", "b"])
    with pytest.raises(TileStoreError, match="split must be one of"):
        write_tile_store(tmp_path / "c", [dict(recs[0], split="test")], levels=[2.0, 1.0], tile_px=8, classes=["a", "b"])
    with pytest.raises(TileStoreError, match="lacks column"):
        write_tile_store(tmp_path / "d", [{"tile_id": "x"}], levels=[2.0], tile_px=8, classes=["a"])
    with pytest.raises(TileStoreError, match="not a tile store"):
        TileStore(tmp_path / "nothing")
    assert set(SCHEMA.names) >= {"tile_id", "parent_id", "image", "split", "size0"}


def test_dataset_items_and_parent_quadrant(tmp_path):
    rng = np.random.default_rng(2)
    recs = _records(rng)
    write_tile_store(tmp_path / "st", recs, levels=[2.0, 1.0], tile_px=8, classes=["a", "b"])
    ds = TileDataset(tmp_path / "st", split="train")
    assert len(ds) == 5 and ds.patients == ["p1"]
    parent = recs[0]["image"]
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
        assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
        rec = recs[i]
        assert torch.allclose(item["image"], torch.from_numpy(rec["image"]).permute(2, 0, 1).float() / 127.5 - 1)
        assert item["level"].item() == rec["level"] and item["label"].item() == rec["label"]
        assert item["log_mpp"].item() == pytest.approx(np.log(rec["mpp"]))
        assert item["index"].item() == i and item["patient"].item() == 0
        if rec["level"] == 0:
            assert not item["has_parent"] and torch.count_nonzero(item["parent"]) == 0
            continue
        assert item["has_parent"]
        # The parent crop is the parent's quadrant that covers this child, upsampled 2x.
        # (Resampled from the whole parent, so the filter sees real pixels across the crop edge.)
        x0, y0 = rec["x"] / 2, rec["y"] / 2
        want = np.asarray(Image.fromarray(parent).resize((8, 8), Image.BICUBIC, box=(x0, y0, x0 + 4, y0 + 4)),
                          dtype=np.float32)
        got = (item["parent"].permute(1, 2, 0).numpy() + 1) * 127.5
        assert np.abs(got - want).max() < 1.0
        other = [parent[:4, :4], parent[:4, 4:], parent[4:, :4], parent[4:, 4:]]
        errs = [np.abs(got - np.asarray(Image.fromarray(o).resize((8, 8), Image.BICUBIC), np.float32)).mean()
                for o in other]
        assert int(np.argmin(errs)) == (rec["y"] // 8) * 2 + rec["x"] // 8
    assert ds.patient_groups() == {0: [0, 1, 2, 3, 4]}
    hold = TileDataset(tmp_path / "st", split="holdout")
    assert len(hold) == 1 and hold[0]["label"].item() == -1
    assert len(TileDataset(tmp_path / "st", split="all", levels=[1])) == 4


def test_dataset_on_the_real_slide(demo_store):
    store = TileStore(demo_store)
    ds = TileDataset(store, split="train")
    hold = TileDataset(store, split="holdout")
    assert set(ds.patients).isdisjoint(hold.patients)
    groups = ds.patient_groups()
    assert sorted(i for g in groups.values() for i in g) == list(range(len(ds)))
    loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 3, 64, 64) and batch["parent"].shape == (16, 3, 64, 64)
    assert batch["has_parent"].dtype == torch.bool
    assert torch.equal(batch["has_parent"], batch["level"] > 0)
    # A child and the upsampled parent crop show the same tissue: low-frequency content agrees.
    fine = [i for i in range(len(ds)) if ds.item_levels[i] == 2][:20]
    diffs = []
    for i in fine:
        it = ds[i]
        a = torch.nn.functional.avg_pool2d(it["image"][None], 16)
        b = torch.nn.functional.avg_pool2d(it["parent"][None], 16)
        diffs.append((a - b).abs().mean().item())
    assert np.median(diffs) < 0.08
