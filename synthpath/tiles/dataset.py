"""A torch Dataset over a tile store (docs/architecture.md §1).

Each item is a tile with its conditioning: the parent tile's crop that covers it,
upsampled to ``tile_px`` (zeros and ``has_parent = False`` at the coarsest level), the
level as log-mpp, the label and the patient index.

PNG bytes are decoded lazily, item by item. For stores up to ``in_memory_bytes`` the
compressed bytes of the selected tiles (and their parents) are held in memory; larger
stores are read row group by row group through :class:`~synthpath.tiles.store.TileStore`.
Parent lookups (row of each tile's parent, and the crop box inside it) are computed once.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .store import TileStore, TileStoreError, decode_png


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)


class TileDataset(Dataset):
    """Tiles of one split (``"train"``, ``"holdout"`` or ``"all"``) and optional level subset."""

    def __init__(self, store: TileStore | Path | str, split: str | None = "train", levels: list[int] | None = None,
                 *, in_memory_bytes: int = 1 << 30):
        self.store = store if isinstance(store, TileStore) else TileStore(store)
        if split not in ("train", "holdout", "all", None):
            raise TileStoreError(f"split must be 'train', 'holdout' or 'all', got {split!r}")
        idx = self.store.index
        cols = {c: idx.column(c).to_numpy(zero_copy_only=False) for c in
                ("tile_id", "patient_id", "level", "mpp", "x", "y", "size0", "parent_id", "label", "split")}
        n_all = len(cols["tile_id"])
        sel = np.ones(n_all, dtype=bool)
        if split not in ("all", None):
            sel &= cols["split"] == split
        if levels is not None:
            bad = [lv for lv in levels if not 0 <= lv < len(self.store.levels)]
            if bad:
                raise TileStoreError(f"levels {bad} out of range 0..{len(self.store.levels) - 1}")
            sel &= np.isin(cols["level"], np.asarray(levels))
        self.rows = np.flatnonzero(sel)
        self._cols = cols
        self.tile_px = self.store.tile_px
        self.tile_ids: list[str] = [cols["tile_id"][r] for r in self.rows]
        self.levels = self.store.levels
        self.patients: list[str] = sorted(set(cols["patient_id"][self.rows].tolist()))
        pindex = {p: i for i, p in enumerate(self.patients)}
        self._patient = np.array([pindex[cols["patient_id"][r]] for r in self.rows], dtype=np.int64)
        self._level = cols["level"][self.rows].astype(np.int64)
        self._log_mpp = np.log(np.asarray(self.store.levels, dtype=np.float64))[self._level].astype(np.float32)
        self._label = cols["label"][self.rows].astype(np.int64)

        # Parent lookups: the store row of each tile's parent and the crop box inside it.
        row_of = {t: i for i, t in enumerate(cols["tile_id"])}
        self._parent_row = np.full(len(self.rows), -1, dtype=np.int64)
        self._parent_box = np.zeros((len(self.rows), 4), dtype=np.float64)
        for k, r in enumerate(self.rows):
            pid = cols["parent_id"][r]
            if pid is None or (isinstance(pid, float) and math.isnan(pid)):
                continue
            pr = row_of.get(pid)
            if pr is None:
                raise TileStoreError(f"{self.store.root}: tile {cols['tile_id'][r]!r} names parent {pid!r}, "
                                     f"which is not in the store")
            scale = self.tile_px / float(cols["size0"][pr])
            x0 = (cols["x"][r] - cols["x"][pr]) * scale
            y0 = (cols["y"][r] - cols["y"][pr]) * scale
            side = cols["size0"][r] * scale
            self._parent_row[k] = pr
            self._parent_box[k] = (x0, y0, x0 + side, y0 + side)

        needed = np.unique(np.concatenate([self.rows, self._parent_row[self._parent_row >= 0]]))
        total = sum(p.stat().st_size for p in self.store.shards)
        self._png: dict[int, bytes] | None = None
        if total <= in_memory_bytes:
            pngs = self.store.read_png([cols["tile_id"][r] for r in needed])
            self._png = dict(zip(needed.tolist(), pngs))
        self._decode = lru_cache(maxsize=512)(self._decode_row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_decode", None)  # the decode cache is per process
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._decode = lru_cache(maxsize=512)(self._decode_row)

    def _decode_row(self, row: int) -> np.ndarray:
        if self._png is not None:
            data = self._png[row]
        else:
            data = self.store.read_png([self._cols["tile_id"][row]])[0]
        return decode_png(data)

    def parent_crop(self, i: int) -> np.ndarray | None:
        """uint8 [H, W, 3]: the part of item ``i``'s parent that covers it, upsampled."""
        pr = int(self._parent_row[i])
        if pr < 0:
            return None
        parent = Image.fromarray(self._decode(pr))
        box = tuple(float(v) for v in self._parent_box[i])
        return np.asarray(parent.resize((self.tile_px, self.tile_px), Image.BICUBIC, box=box), dtype=np.uint8)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        image = _to_tensor(self._decode(int(self.rows[i])))
        crop = self.parent_crop(i)
        parent = torch.zeros_like(image) if crop is None else _to_tensor(crop)
        return {
            "image": image,
            "parent": parent,
            "has_parent": torch.tensor(crop is not None),
            "level": torch.tensor(self._level[i], dtype=torch.int64),
            "log_mpp": torch.tensor(self._log_mpp[i], dtype=torch.float32),
            "label": torch.tensor(self._label[i], dtype=torch.int64),
            "patient": torch.tensor(self._patient[i], dtype=torch.int64),
            "index": torch.tensor(i, dtype=torch.int64),
        }

    # ------------------------------------------------------------------ helpers
    @property
    def labels(self) -> np.ndarray:
        """int64 [N] labels of the items (-1 = unlabelled)."""
        return self._label.copy()

    @property
    def item_levels(self) -> np.ndarray:
        return self._level.copy()

    @property
    def item_patients(self) -> np.ndarray:
        return self._patient.copy()

    def patient_groups(self) -> dict[int, list[int]]:
        """patient index -> item indices (for patient-level DP sampling)."""
        groups: dict[int, list[int]] = {p: [] for p in range(len(self.patients))}
        for i, p in enumerate(self._patient.tolist()):
            groups[p].append(i)
        return groups
