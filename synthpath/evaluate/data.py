"""Loading what evaluation compares: real tiles from the tile store, synthetic tiles from
the exported Hugging Face dataset (through ``datasets.load_dataset``, exactly as a user
would), and whole synthetic slide levels from the exported pyramidal TIFFs (OpenSlide).

Everything is returned as uint8 [N,H,W,3] arrays inside :class:`~.utility.Split` objects,
with grouping ids (patient for real tiles, synthetic slide for synthetic tiles) so that
validation splits never cut through a patient or a slide.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from ..units import level_name
from .utility import Split

#: metadata columns that identify a synthetic slide, in order of preference
SLIDE_COLUMNS = ("slide_id", "synthetic_slide_id", "slide")


class EvaluateDataError(ValueError):
    """An input of the evaluation is missing or does not have the expected layout."""


def image_column(mpp: float) -> str:
    """The HF dataset column of a level (``image_20x``)."""
    return f"image_{level_name(mpp)}"


# --------------------------------------------------------------------------- real
def real_split(store, split: str, level: int, *, max_n: int | None = None, seed: int = 0) -> Split:
    """Labelled tiles of one split (``train``/``holdout``) and level from a TileStore;
    ``max_n`` draws a seeded random subset (stratification is not needed: the draw is
    uniform over tiles, so class shares are kept on average)."""
    idx = store.index
    mask = pc.and_(pc.and_(pc.equal(idx["split"], split), pc.equal(idx["level"], level)),
                   pc.greater_equal(idx["label"], 0))
    sub = idx.filter(mask)
    ids = np.asarray(sub["tile_id"].to_pylist(), dtype=object)
    labels = sub["label"].to_numpy().astype(np.int64)
    groups = np.asarray(sub["patient_id"].to_pylist(), dtype=object)
    if max_n is not None and len(ids) > max_n:
        keep = np.sort(np.random.default_rng(seed).choice(len(ids), max_n, replace=False))
        ids, labels, groups = ids[keep], labels[keep], groups[keep]
    images = store.read_images(list(ids)) if len(ids) else np.zeros((0, store.tile_px, store.tile_px, 3), np.uint8)
    return Split(images, labels, groups)


# --------------------------------------------------------------------------- synthetic (HF)
class SyntheticDataset:
    """The exported HF dataset, loaded with ``datasets.load_dataset(<export>/hf)``.

    All splits are used for training the TSTR classifier (all of it is synthetic; the
    classifier's validation split is carved from it by synthetic slide). The Arrow cache
    ``datasets`` builds goes to ``cache_dir`` (default: a new temporary folder) and is
    removed by :meth:`close`, so no copy of the data is left behind.
    """

    def __init__(self, hf_dir: Path | str, *, cache_dir: Path | str | None = None):
        import datasets

        self.hf_dir = Path(hf_dir)
        if not self.hf_dir.is_dir():
            raise EvaluateDataError(f"exported dataset not found: {self.hf_dir}; run `synthpath export` first")
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="synthpath-eval-hf-"))
        try:
            dd = datasets.load_dataset(str(self.hf_dir), cache_dir=str(self.cache_dir))
        except Exception as e:  # datasets raises many types; name the folder either way
            raise EvaluateDataError(f"{self.hf_dir}: datasets.load_dataset failed: {e}") from e
        self.splits = {name: ds for name, ds in dd.items()}
        if not self.splits:
            raise EvaluateDataError(f"{self.hf_dir}: the dataset has no splits")
        first = next(iter(self.splits.values()))
        if "label" not in first.column_names:
            raise EvaluateDataError(f"{self.hf_dir}: no 'label' column (columns: {first.column_names})")
        feat = first.features["label"]
        self.classes: list[str] = list(getattr(feat, "names", []) or [])
        self.columns = list(first.column_names)
        self.group_column = next((c for c in SLIDE_COLUMNS if c in self.columns), None)

    def __len__(self) -> int:
        return sum(len(d) for d in self.splits.values())

    def level(self, column: str, *, max_n: int | None = None, seed: int = 0) -> Split:
        """All synthetic images of one level column, with labels and slide groups."""
        if column not in self.columns:
            img_cols = [c for c in self.columns if c.startswith("image_")]
            raise EvaluateDataError(f"{self.hf_dir}: no column {column!r}; image columns are {img_cols}")
        imgs, labels, groups = [], [], []
        for name, ds in self.splits.items():
            cols = [column, "label"] + ([self.group_column] if self.group_column else [])
            part = ds.select_columns(cols)
            for row in part:
                imgs.append(np.asarray(row[column].convert("RGB"), dtype=np.uint8))
                labels.append(int(row["label"]))
                groups.append(f"{name}/{row[self.group_column]}" if self.group_column else name)
        if not imgs:
            raise EvaluateDataError(f"{self.hf_dir}: column {column!r} is empty")
        shapes = {im.shape for im in imgs}
        if len(shapes) != 1:
            raise EvaluateDataError(f"{self.hf_dir}: column {column!r} mixes image sizes {sorted(shapes)}")
        out = Split(np.stack(imgs), np.asarray(labels, dtype=np.int64),
                    np.asarray(groups, dtype=object) if self.group_column else None)
        if max_n is not None and len(out) > max_n:
            keep = np.sort(np.random.default_rng(seed).choice(len(out), max_n, replace=False))
            out = Split(out.images[keep], out.labels[keep], None if out.groups is None else out.groups[keep])
        return out

    def close(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)


# --------------------------------------------------------------------------- synthetic slides
def find_slide_files(*folders: Path) -> list[Path]:
    """Pyramidal TIFFs of the synthetic slides, searched (recursively) in the given folders."""
    out: list[Path] = []
    for f in folders:
        if f is not None and Path(f).is_dir():
            out += sorted(p for p in Path(f).rglob("*") if p.suffix.lower() in (".tif", ".tiff") and p.is_file())
    return out


def read_slide_levels(path: Path, levels: list[float], *, rel_tol: float = 0.05) -> dict[int, np.ndarray]:
    """Whole levels of a synthetic slide TIFF opened with OpenSlide: recipe level index ->
    uint8 [H,W,3]. Levels are matched by resolution: OpenSlide's level mpp is
    ``mpp-x × downsample`` (or, when the file has no mpp, the finest recipe level is taken as
    OpenSlide level 0 and the downsamples decide the rest)."""
    import openslide

    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as e:
        raise EvaluateDataError(f"{path}: OpenSlide cannot open the synthetic slide: {e}") from e
    try:
        mpp0 = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        base = float(mpp0) if mpp0 else float(levels[-1])
        out: dict[int, np.ndarray] = {}
        for li, mpp in enumerate(levels):
            match = None
            for ol, ds in enumerate(slide.level_downsamples):
                if abs(base * ds - mpp) <= rel_tol * mpp:
                    match = ol
                    break
            if match is None:
                continue
            w, h = slide.level_dimensions[match]
            region = slide.read_region((0, 0), match, (w, h)).convert("RGB")
            out[li] = np.asarray(region, dtype=np.uint8)
        return out
    finally:
        slide.close()
