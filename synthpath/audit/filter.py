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
- ``train_<space>_L<level>.safetensors``: the training tiles' features (float16);
- ``encoder.safetensors`` / ``encoder.json``: the learned space's encoder, if used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from synthpath.features import (CheckpointSpace, EfficientNetSpace, FeatureSpace, FeatureSpaceError, PixelSpace,
                                resolve_device)

from synthpath.atomic import write_json

from .neighbours import calibrated_l2, is_copy, knn_views

FILTER_DIR = "filter"
FILTER_JSON = "filter.json"


class ReleaseFilterError(FeatureSpaceError):
    """The release filter's files are missing or do not fit the images given to it."""


def space_spec(space: FeatureSpace) -> dict:
    """What :func:`build_space` needs to rebuild ``space`` in another process."""
    if isinstance(space, PixelSpace):
        return {"name": "pixel", "tile_px": space.tile_px, "grid": space.grid, "max_shift": space.max_shift,
                "shift_step": space.shift_step, "blur_sigma": space.blur_sigma}
    if isinstance(space, EfficientNetSpace):
        return {"name": "efficientnet", "image_px": space.image_px, "l2": space.l2}
    if isinstance(space, CheckpointSpace):
        return {"name": "checkpoint", "path": str(space.path), "arch": space.arch, "l2": space.l2}
    if space.name == "learned":
        return {"name": "learned"}
    raise ReleaseFilterError(f"cannot save feature space {space.name!r} in a release filter")


def build_space(spec: dict, folder: Path, device) -> FeatureSpace:
    spec = dict(spec)
    name = spec.pop("name")
    if name == "pixel":
        return PixelSpace(spec.pop("tile_px"), device=device, **spec)
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


class ReleaseFilter:
    """Near-copy test against the training tiles, per level, in every audit feature space."""

    def __init__(self, spaces: dict[str, FeatureSpace], train_features: dict[tuple[str, int], Tensor],
                 thresholds: dict[str, dict[int, dict[str, float]]], *, n: int, levels: list[float],
                 device=None, folder: Path | None = None):
        self.spaces = spaces
        self.train_features = train_features
        self.thresholds = thresholds
        self.n = int(n)
        self.levels = list(levels)
        self.device = resolve_device(device)
        self.folder = folder
        self.stats: dict[str, Any] = {"checked": 0, "flagged": 0, "flagged_by_space": {s: 0 for s in spaces},
                                      "by_level": {}}

    # ------------------------------------------------------------------ persistence
    @classmethod
    def build(cls, audit_dir: Path | str, spaces: dict[str, FeatureSpace],
              train_features: dict[tuple[str, int], Tensor], thresholds: dict[str, dict[int, dict[str, float]]],
              *, n: int, levels: list[float], meta: dict | None = None, device=None) -> "ReleaseFilter":
        """Write the filter's files into ``<audit_dir>/filter/`` (atomically, file by file)
        and return the filter. The learned encoder must already be saved there."""
        folder = Path(audit_dir) / FILTER_DIR
        folder.mkdir(parents=True, exist_ok=True)
        for (space, level), feats in train_features.items():
            path = _feat_file(folder, space, level)
            tmp = path.with_name(path.name + ".tmp")
            save_file({"features": feats.detach().to(torch.float16).contiguous().cpu()}, str(tmp))
            os.replace(tmp, path)
        doc = {
            "version": 1,
            "levels": list(levels),
            "n": int(n),
            "spaces": {name: space_spec(s) for name, s in spaces.items()},
            "thresholds": {s: {str(lv): v for lv, v in per.items()} for s, per in thresholds.items()},
            "n_train": {f"{s}/L{lv}": int(f.shape[0]) for (s, lv), f in train_features.items()},
            "rule": "copy iff d1 <= tau_d and calibrated_l2 <= tau_cal, in any space",
            **(meta or {}),
        }
        write_json(folder / FILTER_JSON, doc)
        feats = {k: v.detach().to(torch.float16).cpu() for k, v in train_features.items()}
        return cls(spaces, feats, thresholds, n=n, levels=levels, device=device, folder=folder)

    @classmethod
    def load(cls, audit_dir: Path | str, device=None) -> "ReleaseFilter":
        """Rebuild the filter from a finished audit folder."""
        folder = Path(audit_dir) / FILTER_DIR
        cfg_path = folder / FILTER_JSON
        if not cfg_path.is_file():
            raise ReleaseFilterError(f"no release filter at {cfg_path}; run `synthpath audit` first")
        try:
            doc = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ReleaseFilterError(f"{cfg_path}: not valid JSON ({e})") from None
        for key in ("levels", "n", "spaces", "thresholds"):
            if key not in doc:
                raise ReleaseFilterError(f"{cfg_path}: missing key {key!r}")
        device = resolve_device(device)
        spaces = {name: build_space(spec, folder, device) for name, spec in doc["spaces"].items()}
        feats: dict[tuple[str, int], Tensor] = {}
        for name in spaces:
            for lv in range(len(doc["levels"])):
                path = _feat_file(folder, name, lv)
                if path.is_file():
                    feats[(name, lv)] = load_file(str(path))["features"]
        thresholds = {s: {int(lv): v for lv, v in per.items()} for s, per in doc["thresholds"].items()}
        return cls(spaces, feats, thresholds, n=doc["n"], levels=doc["levels"], device=device, folder=folder)

    # ------------------------------------------------------------------ test
    def check(self, images: Tensor, level: int) -> dict[str, dict[str, Tensor]]:
        """Per space: ``d1``, ``cal`` (calibrated ℓ2), ``nn`` (nearest training row) and
        ``copy`` (bool), each [N] on the CPU."""
        if not 0 <= int(level) < len(self.levels):
            raise ReleaseFilterError(f"level {level} is out of range: the filter has levels 0..{len(self.levels) - 1}")
        level = int(level)
        out: dict[str, dict[str, Tensor]] = {}
        for name, space in self.spaces.items():
            feats = self.train_features.get((name, level))
            n_img = images.shape[0]
            if feats is None or feats.shape[0] == 0:
                inf = torch.full((n_img,), float("inf"))
                out[name] = {"d1": inf, "cal": torch.ones(n_img), "nn": torch.full((n_img,), -1, dtype=torch.long),
                             "copy": torch.zeros(n_img, dtype=torch.bool)}
                continue
            views = space.embed_views(images)
            nb = knn_views(views, feats, self.n, device=self.device)
            d1, cal = nb.dist[:, 0], calibrated_l2(nb, self.n)
            th = self.thresholds.get(name, {}).get(level)
            if th is None:
                raise ReleaseFilterError(f"no threshold for space {name!r} at level {level} in the release filter")
            out[name] = {"d1": d1, "cal": cal, "nn": nb.index[:, 0], "copy": is_copy(d1, cal, th["d1"], th["cal"])}
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
