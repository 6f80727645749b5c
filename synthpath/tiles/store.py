"""The tile store: Parquet shards of PNG tiles plus a cheap index (docs/architecture.md §1).

Layout of a store folder::

    tiles/part-00000.parquet ...   one row per tile: the columns of SCHEMA, image = PNG bytes
    index.parquet                  the same rows without ``image``
    store.json                     {"levels", "tile_px", "classes", "n_tiles", ...}

Shards are written with small row groups so that a reader can fetch a few tiles without
decoding a whole shard. Every file is written to a temporary name and moved into place.
"""

from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

from ..atomic import write_json

META_FIELDS = [
    pa.field("tile_id", pa.string(), nullable=False),
    pa.field("slide_id", pa.string(), nullable=False),
    pa.field("patient_id", pa.string(), nullable=False),
    pa.field("level", pa.int16(), nullable=False),
    pa.field("mpp", pa.float32(), nullable=False),
    pa.field("x", pa.int64(), nullable=False),
    pa.field("y", pa.int64(), nullable=False),
    pa.field("size0", pa.int64(), nullable=False),
    pa.field("parent_id", pa.string(), nullable=True),
    pa.field("label", pa.int16(), nullable=False),
    pa.field("label_name", pa.string(), nullable=True),
    pa.field("split", pa.string(), nullable=False),
    pa.field("tissue_fraction", pa.float32(), nullable=False),
]
INDEX_SCHEMA = pa.schema(META_FIELDS)
SCHEMA = pa.schema(META_FIELDS + [pa.field("image", pa.binary(), nullable=False)])
META_COLUMNS = [f.name for f in META_FIELDS]
SPLITS = ("train", "holdout")
ROW_GROUP_TILES = 64


class TileStoreError(ValueError):
    """A tile store is missing, malformed, or a record does not fit the schema."""


def tile_id(slide_id: str, level: int, x: int, y: int) -> str:
    return f"{slide_id}/L{level}/{x}_{y}"


def encode_png(image: np.ndarray | Image.Image, compress_level: int = 3) -> bytes:
    """RGB uint8 [H, W, 3] (or a PIL image) -> PNG bytes."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)



def _atomic_parquet(table: pa.Table, path: Path, row_group_size: int | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, row_group_size=row_group_size)
    os.replace(tmp, path)


class TileStoreWriter:
    """Streams tiles into shards of ``shard_tiles`` rows; :meth:`close` writes the index and
    ``store.json``. Use :meth:`add` for one record (a dict with every column of
    :data:`SCHEMA`; ``image`` may be PNG bytes or an RGB uint8 array) or :meth:`add_table`
    for a pyarrow table with the schema's columns.
    """

    def __init__(self, root: Path | str, *, levels: list[float], tile_px: int, classes: list[str],
                 shard_tiles: int = 2048, row_group_tiles: int = ROW_GROUP_TILES):
        self.root = Path(root)
        self.levels = [float(v) for v in levels]
        self.tile_px = int(tile_px)
        self.classes = list(classes)
        self.shard_tiles = int(shard_tiles)
        self.row_group_tiles = int(row_group_tiles)
        (self.root / "tiles").mkdir(parents=True, exist_ok=True)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._shards: list[str] = []
        self._index: list[pa.Table] = []
        self._seen: set[str] = set()
        self._closed = False

    # ---------------------------------------------------------------- adding
    def add(self, record: dict) -> None:
        rec = dict(record)
        missing = [c for c in SCHEMA.names if c not in rec]
        if missing:
            raise TileStoreError(f"tile record {rec.get('tile_id', '?')!r} lacks column(s) {missing}")
        if not isinstance(rec["image"], (bytes, bytearray)):
            arr = np.asarray(rec["image"])
            if arr.shape != (self.tile_px, self.tile_px, 3) or arr.dtype != np.uint8:
                raise TileStoreError(f"tile {rec['tile_id']!r}: image must be uint8 "
                                     f"[{self.tile_px}, {self.tile_px}, 3], got {arr.dtype} {list(arr.shape)}")
            rec["image"] = encode_png(arr)
        self.add_table(pa.Table.from_pylist([rec], schema=SCHEMA))

    def add_table(self, table: pa.Table) -> None:
        if self._closed:
            raise TileStoreError("the writer is closed")
        try:
            table = table.select(SCHEMA.names).cast(SCHEMA)
        except (KeyError, pa.ArrowInvalid, ValueError) as e:
            raise TileStoreError(f"tile table does not fit the store schema: {e}") from None
        self._check(table)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.shard_tiles:
            self._flush(self.shard_tiles)

    def _check(self, table: pa.Table) -> None:
        ids = table.column("tile_id").to_pylist()
        dup = [t for t in ids if t in self._seen]
        if dup or len(set(ids)) != len(ids):
            raise TileStoreError(f"duplicate tile id(s) in the store: {(dup or ids)[:3]}")
        self._seen.update(ids)
        splits = set(table.column("split").to_pylist())
        if not splits <= set(SPLITS):
            raise TileStoreError(f"split must be one of {SPLITS}, got {sorted(splits - set(SPLITS))}")
        levels = table.column("level").to_numpy()
        if levels.size and (levels.min() < 0 or levels.max() >= len(self.levels)):
            raise TileStoreError(f"tile level out of range 0..{len(self.levels) - 1}")
        labels = table.column("label").to_numpy()
        if labels.size and (labels.min() < -1 or labels.max() >= len(self.classes)):
            raise TileStoreError(f"tile label out of range -1..{len(self.classes) - 1}")

    def _flush(self, n: int) -> None:
        if not self._pending_rows:
            return
        table = pa.concat_tables(self._pending).combine_chunks()
        head, rest = table.slice(0, n), table.slice(n)
        name = f"part-{len(self._shards):05d}.parquet"
        _atomic_parquet(head, self.root / "tiles" / name, row_group_size=self.row_group_tiles)
        self._shards.append(name)
        self._index.append(head.drop_columns(["image"]))
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    # ---------------------------------------------------------------- closing
    def close(self, extra: dict | None = None) -> dict:
        """Write the last shard, ``index.parquet`` and ``store.json``; return store.json."""
        if self._closed:
            raise TileStoreError("the writer is already closed")
        self._flush(self._pending_rows)
        index = pa.concat_tables(self._index) if self._index else INDEX_SCHEMA.empty_table()
        _atomic_parquet(index, self.root / "index.parquet")
        meta = {
            "levels": self.levels,
            "tile_px": self.tile_px,
            "classes": self.classes,
            "n_tiles": index.num_rows,
            "shards": [f"tiles/{s}" for s in self._shards],
            "format": "synthpath-tile-store/1",
        }
        meta.update(extra or {})
        write_json(self.root / "store.json", meta)
        self._closed = True
        return meta


def write_tile_store(root: Path | str, records: Iterable[dict], *, levels: list[float], tile_px: int,
                     classes: list[str], shard_tiles: int = 2048, extra: dict | None = None) -> "TileStore":
    """Write a whole store from an iterable of records (see :class:`TileStoreWriter`)."""
    writer = TileStoreWriter(root, levels=levels, tile_px=tile_px, classes=classes, shard_tiles=shard_tiles)
    for rec in records:
        writer.add(rec)
    writer.close(extra)
    return TileStore(root)


class TileStore:
    """Reader of a tile store folder."""

    def __init__(self, root: Path | str, *, cache_row_groups: int = 8):
        self.root = Path(root)
        meta_path = self.root / "store.json"
        if not meta_path.is_file():
            raise TileStoreError(f"{self.root}: not a tile store (no store.json); run `synthpath ingest` first")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise TileStoreError(f"{meta_path}: not valid JSON ({e})") from None
        for key in ("levels", "tile_px", "classes", "n_tiles"):
            if key not in self.meta:
                raise TileStoreError(f"{meta_path}: missing key {key!r}")
        self.levels: list[float] = [float(v) for v in self.meta["levels"]]
        self.tile_px: int = int(self.meta["tile_px"])
        self.classes: list[str] = list(self.meta["classes"])
        shards = self.meta.get("shards") or sorted(
            str(p.relative_to(self.root)) for p in (self.root / "tiles").glob("part-*.parquet"))
        self.shards = [self.root / s for s in shards]
        self._index: pa.Table | None = None
        self._where: dict[str, tuple[int, int, int]] | None = None
        self._rg_cache: OrderedDict[tuple[int, int], list[bytes]] = OrderedDict()
        self._rg_cache_size = cache_row_groups

    def __len__(self) -> int:
        return int(self.meta["n_tiles"])

    def __repr__(self) -> str:
        return f"TileStore({str(self.root)!r}, n_tiles={len(self)}, levels={self.levels}, tile_px={self.tile_px})"

    @property
    def index(self) -> pa.Table:
        """All tile metadata (no images), in shard order."""
        if self._index is None:
            self._index = pq.read_table(self.root / "index.parquet")
        return self._index

    def _locations(self) -> dict[str, tuple[int, int, int]]:
        """tile_id -> (shard, row group, row within the group), read from the shards' tile_id
        column only."""
        if self._where is None:
            where: dict[str, tuple[int, int, int]] = {}
            for si, shard in enumerate(self.shards):
                pf = pq.ParquetFile(shard)
                for rg in range(pf.num_row_groups):
                    ids = pf.read_row_group(rg, columns=["tile_id"]).column(0).to_pylist()
                    for r, t in enumerate(ids):
                        where[t] = (si, rg, r)
            self._where = where
        return self._where

    def _row_group_images(self, shard: int, rg: int) -> list[bytes]:
        key = (shard, rg)
        if key in self._rg_cache:
            self._rg_cache.move_to_end(key)
            return self._rg_cache[key]
        imgs = pq.ParquetFile(self.shards[shard]).read_row_group(rg, columns=["image"]).column(0).to_pylist()
        self._rg_cache[key] = imgs
        while len(self._rg_cache) > self._rg_cache_size:
            self._rg_cache.popitem(last=False)
        return imgs

    def read_png(self, tile_ids: list[str]) -> list[bytes]:
        """PNG bytes of the given tiles, in the given order."""
        where = self._locations()
        out: list[bytes] = []
        for t in tile_ids:
            if t not in where:
                raise TileStoreError(f"{self.root}: no tile {t!r} in the store")
            s, rg, r = where[t]
            out.append(self._row_group_images(s, rg)[r])
        return out

    def read_images(self, tile_ids: list[str]) -> np.ndarray:
        """Decoded tiles, uint8 [N, H, W, 3], in the given order."""
        pngs = self.read_png(list(tile_ids))
        if not pngs:
            return np.zeros((0, self.tile_px, self.tile_px, 3), dtype=np.uint8)
        return np.stack([decode_png(b) for b in pngs])

    def iter_batches(self, batch_size: int = 256, columns: list[str] | None = None,
                     filter: "pc.Expression | dict | None" = None) -> Iterator[pa.RecordBatch]:
        """Stream rows from the shards as pyarrow RecordBatches (``image`` holds PNG bytes).

        ``filter`` is a pyarrow expression (``pc.field("split") == "train"``) or a dict
        ``{column: value or list of values}``.
        """
        if isinstance(filter, dict):
            expr = None
            for col, val in filter.items():
                e = pc.field(col).isin(list(val)) if isinstance(val, (list, tuple, set)) else pc.field(col) == val
                expr = e if expr is None else expr & e
            filter = expr
        if not self.shards:
            return
        ds = pads.dataset([str(s) for s in self.shards], format="parquet", schema=SCHEMA)
        # Parquet hands back row-group-sized pieces; regroup them into full batches.
        pending: list[pa.RecordBatch] = []
        rows = 0
        for b in ds.to_batches(columns=columns, filter=filter, batch_size=batch_size):
            if b.num_rows == 0:
                continue
            pending.append(b)
            rows += b.num_rows
            while rows >= batch_size:
                table = pa.Table.from_batches(pending).combine_chunks()
                yield table.slice(0, batch_size).to_batches()[0]
                rest = table.slice(batch_size)
                pending = rest.to_batches() if rest.num_rows else []
                rows = rest.num_rows
        if rows:
            yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
