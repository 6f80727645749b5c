"""The pixel space's lazy query views (PixelQueries) give the release filter exactly the
distances of the materialised views: same vectors, same two-stage search results (d1,
calibrated distance, which training tile) on real demo tiles and planted copies."""

from __future__ import annotations

import numpy as np
import torch

from synthpath.audit.filter import bank_index, search_images, view_chunks
from synthpath.audit.neighbours import DenseViews, calibrated_l2
from synthpath.features import PixelQueries, PixelSpace


def test_lazy_views_equal_materialised_views():
    sp = PixelSpace(32, device="cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    x[1, :, :20, :20] = 0.25  # textureless windows: the far point, in both paths
    dense = sp.embed_views(x)
    q = sp.query_views(x)
    assert isinstance(q, PixelQueries) and len(q) == 3 and q.n_views == sp.n_views and q.dim == sp.view_dim
    assert torch.allclose(q.materialise(), dense, atol=1e-6)
    assert bool((dense[1, :, -1] == -3.0).any())  # the flat patch did produce far-away views
    idx = torch.randint(0, sp.n_views, (3, 4, 5), generator=g)
    idx[:, 1] = idx[:, 0]  # repeated views are built once and returned at every place asked
    want = DenseViews(dense).take(idx)
    assert want.shape == (3, 4, 5, sp.view_dim)
    assert torch.allclose(q.take(idx), want, atol=1e-6)
    assert torch.allclose(q[1:3].take(idx[1:3]), want[1:3], atol=1e-6)
    assert sp.query_views(x[:0]).materialise().shape == (0, sp.n_views, sp.view_dim)


def test_lazy_filter_search_equals_materialised_on_demo_tiles_and_copies(demo_store):
    from synthpath.audit import copies
    from synthpath.tiles.store import TileStore

    store = TileStore(demo_store)
    idx = store.index
    cols = {c: idx.column(c).to_pylist() for c in ("tile_id", "level", "split")}
    level = 1
    train_ids = [t for t, lv, s in zip(cols["tile_id"], cols["level"], cols["split"]) if lv == level and s == "train"]
    hold_ids = [t for t, lv, s in zip(cols["tile_id"], cols["level"], cols["split"]) if lv == level and s == "holdout"]
    assert len(train_ids) > 32 and hold_ids  # more tiles than coarse candidates: all three stages run
    sp = PixelSpace(store.tile_px, device="cpu")
    bank = sp.embed(store.read_images(train_ids))
    pick = train_ids[:: max(1, len(train_ids) // 4)][:4]
    train = store.read_images(pick)
    sources = copies.tile_sources(store, pick)
    attacks = copies.attacks(store.tile_px)
    planted = [copies.plant(train, sources, attacks[a], seed=3) for a in ("exact", "rot90", "scale_0.9", "combo")]
    imgs = np.concatenate(planted + [store.read_images(hold_ids[:6])])
    x = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    n = 10
    chunks = list(view_chunks(sp, x))  # what the release filter and the audit search with
    assert chunks and all(isinstance(c, PixelQueries) for c in chunks)
    index = bank_index(bank, "cpu", sp)
    assert index.coarse is not None
    lazy = search_images(sp, index, x, n)  # lazy views
    dense = index.search(sp.embed_views(x), n)  # every view materialised
    assert torch.allclose(lazy.dist, dense.dist, atol=1e-5), (lazy.dist[:, 0], dense.dist[:, 0])
    assert torch.equal(lazy.index, dense.index)
    assert torch.allclose(calibrated_l2(lazy, n), calibrated_l2(dense, n), atol=1e-5)
    # the exact copies are found, at distance ~0, at their own training tile
    own = torch.tensor([train_ids.index(t) for t in pick])
    assert torch.equal(lazy.index[:4, 0], own) and bool((lazy.dist[:4, 0] < 1e-3).all())
