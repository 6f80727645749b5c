"""The release filter: the audit's near-copy test, run on every generated tile.

``ReleaseFilter.load(audit_dir, device)`` gives a callable
``flt(images [N,3,H,W] in [-1,1], level) -> BoolTensor [N]`` (on the CPU); True means the
tile is a near-copy of a training tile in ANY feature space and must not be released.

The test per space and level is the one the audit calibrated on the patient-disjoint
holdout (:mod:`synthpath.audit.neighbours`): a tile is a copy when its distance to the
nearest training tile at that level is at most ``tau_d`` AND Carlini's calibrated ℓ2
(d1 / mean of the n nearest) is at most ``tau_cal``.

Files, all under ``<audit_dir>/filter/`` (never exported):
- ``filter.json``: spaces (with what is needed to rebuild them), levels, n, thresholds;
- ``train_<space>_L<level>.safetensors``: the training tiles' features (float16), one
  file per space and level (an empty level has an empty file), ``n_train`` rows each;
- ``encoder.safetensors`` / ``encoder.json``: the learned space's encoder, if used.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from synthpath.features import (CheckpointSpace, EfficientNetSpace, FeatureSpace, FeatureSpaceError, PixelSpace,
                                resolve_device)

from synthpath.atomic import write_json

from .overhang import overhang_table
from .neighbours import NeighbourIndex, Neighbours, TwoStageIndex, calibrated_l2, is_copy, search_chunks

FILTER_DIR = "filter"
FILTER_JSON = "filter.json"


class ReleaseFilterError(FeatureSpaceError):
    """The release filter's files are missing or do not fit the images given to it."""


def space_spec(space: FeatureSpace) -> dict:
    """What :func:`build_space` needs to rebuild ``space`` in another process."""
    if isinstance(space, PixelSpace):
        return {"name": "pixel", "tile_px": space.tile_px, "grid": space.grid, "blur_sigma": space.blur_sigma,
                "min_std": space.min_std, "substeps": space.substeps, "scales": list(space.scales), "dihedral_views": space.dihedral_views,
                "layout": space.layout, "candidates": space.candidates, "overhang_cells": space.overhang_cells}
    if isinstance(space, EfficientNetSpace):
        return {"name": "efficientnet", "image_px": space.image_px, "l2": space.l2}
    if isinstance(space, CheckpointSpace):
        return {"name": "checkpoint", "path": str(space.path), "arch": space.arch, "l2": space.l2}
    if space.name == "learned":
        return {"name": "learned"}
    raise ReleaseFilterError(f"cannot save feature space {space.name!r} in a release filter")


def build_space(spec: dict, folder: Path, device) -> FeatureSpace:
    spec = dict(spec)
    name = spec.pop("name", None)
    if name == "pixel":
        try:
            return PixelSpace(spec.pop("tile_px"), device=device, **spec)
        except (TypeError, KeyError) as e:
            raise ReleaseFilterError(f"{folder / FILTER_JSON}: the pixel space's settings {spec} do not fit this "
                                     f"version of synthpath ({e}); re-run `synthpath audit`") from None
    if name == "efficientnet":
        return EfficientNetSpace(device=device, **spec)
    if name == "checkpoint":
        return CheckpointSpace(spec.pop("path"), device=device, **spec)
    if name == "learned":
        from .encoder import LearnedSpace

        return LearnedSpace.load(folder, device=device)
    raise ReleaseFilterError(f"{folder / FILTER_JSON}: unknown feature space {name!r}")


def _feat_file(folder: Path, space: str, level: int) -> Path:
    return folder / f"train_{space}_L{level}.safetensors"


def bank_index(features: Tensor, device=None, space: FeatureSpace | None = None) -> NeighbourIndex | TwoStageIndex:
    """The filter's search index over one space and level: the features as the filter stores
    them (float16), resident on ``device`` with their norms. The audit calibrates its
    thresholds on these same indexes, so the filter reproduces the audit's distances.

    For the pixel space (thousands of query views per tile) it is a two-stage index: a coarse
    retrieval of ``space.candidates`` training tiles, then the exact distance over every view
    and part to those (:class:`~synthpath.audit.neighbours.TwoStageIndex`)."""
    feats = features.detach().to(torch.float16).cpu()
    if isinstance(space, PixelSpace):
        sub, nbr = space._grid_views()
        return TwoStageIndex(feats, parts=space.parts, coarse=space.coarse if space.has_coarse else (lambda v: v),
                             search_views=sub, neighbours=nbr, candidates=space.candidates, device=device,
                             overhang=overhang_table(space), overhang_cells=space.overhang_cells)
    return NeighbourIndex(feats, device=device)


def view_chunks(space: FeatureSpace, images, chunk: int = 16):
    """The query views of ``images`` a few tiles at a time (``space.query_views``: the pixel
    space's are lazy, its ~27k views per tile are built only where the search reads them)."""
    for i in range(0, len(images), chunk):
        yield space.query_views(images[i:i + chunk])


def search_images(space: FeatureSpace, index, images, k: int, chunk: int = 16) -> Neighbours:
    """The ``k`` nearest training tiles of every image (its query views against ``index``)."""
    return search_chunks(view_chunks(space, images, chunk), [index], k)[0]


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


class ReleaseFilter:
    """Near-copy test against the training tiles, per level, in every audit feature space.

    Fails closed: every (space, level) must have its training features and finite
    thresholds; anything missing or malformed raises :class:`ReleaseFilterError` naming the
    file, never "not a copy". Each (space, level) bank is put on the device once (a
    :class:`~synthpath.audit.neighbours.NeighbourIndex`) and reused by every call."""

    def __init__(self, spaces: dict[str, FeatureSpace], train_features: dict[tuple[str, int], Tensor],
                 thresholds: dict[str, dict[int, dict[str, float]]], *, n: int, levels: list[float],
                 device=None, folder: Path | None = None,
                 indexes: dict[tuple[str, int], NeighbourIndex | TwoStageIndex] | None = None):
        self.spaces = spaces
        self.train_features = train_features
        self.thresholds = thresholds
        self.n = int(n)
        self.levels = list(levels)
        self.device = resolve_device(device)
        self.folder = folder
        where = str(folder / FILTER_JSON) if folder is not None else "the release filter"
        for name in spaces:
            for lv in range(len(self.levels)):
                if (name, lv) not in train_features:
                    raise ReleaseFilterError(f"{where}: no training features for space {name!r} at level {lv} "
                                             f"({_feat_file(folder or Path('filter'), name, lv).name})")
                th = (thresholds.get(name) or {}).get(lv)
                if not isinstance(th, dict):
                    raise ReleaseFilterError(f"{where}: no threshold for space {name!r} at level {lv}")
                for key in ("d1", "cal"):
                    if not _finite_number(th.get(key)):
                        raise ReleaseFilterError(f"{where}: threshold {key!r} of space {name!r} at level {lv} is "
                                                 f"{th.get(key)!r}, not a finite number; re-run `synthpath audit`")
        self._indexes: dict[tuple[str, int], NeighbourIndex | TwoStageIndex] = dict(indexes or {})
        self.stats: dict[str, Any] = {"checked": 0, "flagged": 0, "flagged_by_space": {s: 0 for s in spaces},
                                      "by_level": {}}

    @property
    def shift_tolerance_px(self) -> int:
        """The largest shift of a copied training tile that some space of this filter is
        built to catch (the pixel space's half tile); 0 if none declares one."""
        return max((int(getattr(sp, "shift_tolerance_px", 0) or 0) for sp in self.spaces.values()), default=0)

    def index(self, space: str, level: int) -> NeighbourIndex | TwoStageIndex:
        """The resident search index of one space and level (built on first use)."""
        key = (space, int(level))
        if key not in self._indexes:
            self._indexes[key] = bank_index(self.train_features[key], self.device, self.spaces[space])
        return self._indexes[key]

    # ------------------------------------------------------------------ persistence
    @classmethod
    def build(cls, audit_dir: Path | str, spaces: dict[str, FeatureSpace],
              train_features: dict[tuple[str, int], Tensor], thresholds: dict[str, dict[int, dict[str, float]]],
              *, n: int, levels: list[float], meta: dict | None = None, device=None,
              indexes: dict[tuple[str, int], NeighbourIndex | TwoStageIndex] | None = None) -> "ReleaseFilter":
        """Write the filter's files into ``<audit_dir>/filter/`` (atomically, file by file)
        and return the filter. The learned encoder must already be saved there. ``indexes``
        (from :func:`bank_index` on the same features) are reused instead of re-uploaded."""
        folder = Path(audit_dir) / FILTER_DIR
        folder.mkdir(parents=True, exist_ok=True)
        for (space, level), feats in train_features.items():
            path = _feat_file(folder, space, level)
            tmp = path.with_name(path.name + ".tmp")
            save_file({"features": feats.detach().to(torch.float16).contiguous().cpu()}, str(tmp))
            os.replace(tmp, path)
        doc = {
            "version": 2,
            "levels": list(levels),
            "n": int(n),
            "spaces": {name: space_spec(s) for name, s in spaces.items()},
            "thresholds": {s: {str(lv): v for lv, v in per.items()} for s, per in thresholds.items()},
            "n_train": {f"{s}/L{lv}": int(f.shape[0]) for (s, lv), f in train_features.items()},
            "rule": "copy iff d1 <= tau_d and calibrated_l2 <= tau_cal, in any space",
            **(meta or {}),
        }
        feats = {k: v.detach().to(torch.float16).cpu() for k, v in train_features.items()}
        flt = cls(spaces, feats, thresholds, n=n, levels=levels, device=device, folder=folder, indexes=indexes)
        write_json(folder / FILTER_JSON, doc)
        return flt

    @classmethod
    def load(cls, audit_dir: Path | str, device=None) -> "ReleaseFilter":
        """Rebuild the filter from a finished audit folder; any missing, corrupt or
        inconsistent file is a :class:`ReleaseFilterError` naming it."""
        folder = Path(audit_dir) / FILTER_DIR
        cfg_path = folder / FILTER_JSON
        if not cfg_path.is_file():
            raise ReleaseFilterError(f"no release filter at {cfg_path}; run `synthpath audit` first")
        try:
            doc = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReleaseFilterError(f"{cfg_path}: not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise ReleaseFilterError(f"{cfg_path}: expected a JSON object")
        for key in ("levels", "n", "spaces", "thresholds", "n_train"):
            if key not in doc:
                raise ReleaseFilterError(f"{cfg_path}: missing key {key!r}; re-run `synthpath audit`")
        if not isinstance(doc["spaces"], dict) or not doc["spaces"]:
            raise ReleaseFilterError(f"{cfg_path}: 'spaces' names no feature space")
        if not isinstance(doc["levels"], list) or not doc["levels"]:
            raise ReleaseFilterError(f"{cfg_path}: 'levels' must be a non-empty list")
        if not isinstance(doc["n"], int) or isinstance(doc["n"], bool) or doc["n"] < 1:
            raise ReleaseFilterError(f"{cfg_path}: 'n' must be a positive integer, got {doc['n']!r}")
        device = resolve_device(device)
        spaces = {name: build_space(spec, folder, device) for name, spec in doc["spaces"].items()}
        feats: dict[tuple[str, int], Tensor] = {}
        for name, space in spaces.items():
            for lv in range(len(doc["levels"])):
                path = _feat_file(folder, name, lv)
                want = doc["n_train"].get(f"{name}/L{lv}") if isinstance(doc["n_train"], dict) else None
                if not isinstance(want, int) or want < 0:
                    raise ReleaseFilterError(f"{cfg_path}: n_train has no count for {name}/L{lv}")
                if not path.is_file():
                    raise ReleaseFilterError(f"release filter file {path} is missing (space {name!r}, level {lv}); "
                                             "re-run `synthpath audit`")
                try:
                    f = load_file(str(path))["features"]
                except Exception as e:  # noqa: BLE001 - any unreadable file is the same fail-closed error
                    raise ReleaseFilterError(f"release filter file {path} is corrupt: {type(e).__name__}: {e}") from None
                if f.dim() != 2 or not f.is_floating_point():
                    raise ReleaseFilterError(f"release filter file {path}: features must be a 2-D float tensor, "
                                             f"got {f.dtype} {tuple(f.shape)}")
                if f.shape[0] != want:
                    raise ReleaseFilterError(f"release filter file {path} holds {f.shape[0]} training tiles but "
                                             f"{cfg_path} says n_train[{name}/L{lv}] = {want}")
                if f.shape[0] and f.shape[1] != space.dim:
                    raise ReleaseFilterError(f"release filter file {path}: features are {f.shape[1]}-d but space "
                                             f"{name!r} makes {space.dim}-d vectors")
                if not bool(torch.isfinite(f).all()):
                    raise ReleaseFilterError(f"release filter file {path} holds non-finite features")
                feats[(name, lv)] = f
        try:
            thresholds = {s: {int(lv): v for lv, v in per.items()} for s, per in doc["thresholds"].items()}
        except (AttributeError, TypeError, ValueError) as e:
            raise ReleaseFilterError(f"{cfg_path}: malformed 'thresholds' ({e})") from None
        return cls(spaces, feats, thresholds, n=doc["n"], levels=doc["levels"], device=device, folder=folder)

    # ------------------------------------------------------------------ test
    def check(self, images: Tensor, level: int) -> dict[str, dict[str, Tensor]]:
        """Per space: ``d1``, ``cal`` (calibrated ℓ2), ``nn`` (nearest training row) and
        ``copy`` (bool), each [N] on the CPU."""
        if not 0 <= int(level) < len(self.levels):
            raise ReleaseFilterError(f"level {level} is out of range: the filter has levels 0..{len(self.levels) - 1}")
        level = int(level)
        out: dict[str, dict[str, Tensor]] = {}
        n_img = images.shape[0]
        for name, space in self.spaces.items():
            feats = self.train_features[(name, level)]
            th = self.thresholds[name][level]
            if feats.shape[0] == 0:  # no training tile at this level: nothing to copy
                out[name] = {"d1": torch.full((n_img,), float("inf")), "cal": torch.ones(n_img),
                             "nn": torch.full((n_img,), -1, dtype=torch.long),
                             "copy": torch.zeros(n_img, dtype=torch.bool)}
                continue
            nb = search_images(space, self.index(name, level), images, self.n)
            d1, cal = nb.dist[:, 0], calibrated_l2(nb, self.n)
            try:
                flags = is_copy(d1, cal, th["d1"], th["cal"])
            except ValueError as e:
                raise ReleaseFilterError(f"release filter, space {name!r}, level {level}: {e}") from None
            out[name] = {"d1": d1, "cal": cal, "nn": nb.index[:, 0], "copy": flags}
        return out

    def __call__(self, images: Tensor, level: int) -> Tensor:
        """BoolTensor [N] (CPU): True = near-copy in any space; must not be released."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ReleaseFilterError(f"release filter expects images [N,3,H,W] in [-1,1], got {tuple(images.shape)}")
        res = self.check(images, level)
        flags = torch.zeros(images.shape[0], dtype=torch.bool)
        for name, r in res.items():
            flags |= r["copy"]
            self.stats["flagged_by_space"][name] = self.stats["flagged_by_space"].get(name, 0) + int(r["copy"].sum())
        self.stats["checked"] += int(images.shape[0])
        self.stats["flagged"] += int(flags.sum())
        lvl = self.stats["by_level"].setdefault(str(int(level)), {"checked": 0, "flagged": 0})
        lvl["checked"] += int(images.shape[0])
        lvl["flagged"] += int(flags.sum())
        return flags
