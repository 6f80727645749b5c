"""Labels: a CSV of slide-level labels and QuPath GeoJSON region annotations.

CSV: columns ``slide_id, patient_id, label`` (header required; ``label`` may be empty).

GeoJSON (QuPath "Export objects as GeoJSON"): a FeatureCollection, a bare list of
features, or one feature. Polygon and MultiPolygon geometries in level-0 pixel
coordinates carry their class in ``properties.classification.name`` (a plain string
``properties.classification`` is accepted too) and optionally a case id in
``properties.case_id`` (or ``properties.patient_id``): a region with a case id is its own
case/patient, the way tissue-microarray cores are. Geometries without area (points,
lines) are ignored. Where regions overlap, the later feature wins.

Regions are rasterised onto a grid (a class map and a case map) on which a tile's label
is the majority class by area.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .tiling import TileDecision, window_shares

log = logging.getLogger("synthpath.slides")

NO_CLASS = 255
NO_CASE = -1


class LabelError(ValueError):
    """A label file is malformed or names an unknown class."""


@dataclass
class SlideLabel:
    patient_id: str | None
    label: str | None


def read_labels_csv(path: Path, classes: list[str]) -> dict[str, SlideLabel]:
    """``slide_id -> SlideLabel`` from a labels CSV; unknown labels raise :class:`LabelError`
    naming the file, line and label."""
    path = Path(path)
    out: dict[str, SlideLabel] = {}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("slide_id", "patient_id", "label") if c not in cols]
        if missing:
            raise LabelError(f"{path}: missing column(s) {missing}; the header must be slide_id,patient_id,label")
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            sid = row["slide_id"]
            if not sid:
                raise LabelError(f"{path}, line {line}: empty slide_id")
            label = row["label"] or None
            if label is not None and label not in classes:
                raise LabelError(f"{path}, line {line}: unknown label {label!r} for slide {sid!r}; classes are {classes}")
            if sid in out:
                raise LabelError(f"{path}, line {line}: slide {sid!r} listed twice")
            out[sid] = SlideLabel(patient_id=row["patient_id"] or None, label=label)
    return out


@dataclass
class Region:
    """One annotated region: polygons as (exterior ring, [hole rings]) in level-0 pixels."""

    class_index: int | None
    case_id: str | None
    polygons: list[tuple[list[tuple[float, float]], list[list[tuple[float, float]]]]] = field(default_factory=list)


def _class_name(props: dict) -> str | None:
    cls = props.get("classification")
    if isinstance(cls, dict):
        name = cls.get("name")
    elif isinstance(cls, str):
        name = cls
    else:
        name = None
    return str(name) if name not in (None, "") else None


def _ring(coords, where: str) -> list[tuple[float, float]]:
    try:
        ring = [(float(p[0]), float(p[1])) for p in coords]
    except (TypeError, ValueError, IndexError) as e:
        raise LabelError(f"{where}: a polygon ring is not a list of [x, y] points ({e})") from None
    if len(ring) < 3:
        raise LabelError(f"{where}: a polygon ring has fewer than 3 points")
    return ring


def read_geojson(path: Path, classes: list[str]) -> list[Region]:
    """Regions of a QuPath GeoJSON file; an unknown class raises :class:`LabelError`
    naming the file, the feature and the label."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LabelError(f"{path}: not a readable GeoJSON file ({e})") from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features") or []
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, list):
        features = doc
    else:
        raise LabelError(f"{path}: expected a GeoJSON FeatureCollection, Feature or list of features")
    regions: list[Region] = []
    for i, feat in enumerate(features):
        if not isinstance(feat, dict):
            raise LabelError(f"{path}: feature {i} is not an object")
        props = feat.get("properties") or {}
        where = f"{path}: feature {i}" + (f" ({props['name']!r})" if props.get("name") else "")
        geom = feat.get("geometry") or {}
        gtype = geom.get("type")
        if gtype not in ("Polygon", "MultiPolygon"):
            log.debug("%s: geometry %s has no area; ignored", where, gtype)
            continue
        name = _class_name(props)
        if name is not None and name not in classes:
            raise LabelError(f"{where}: unknown label {name!r}; classes are {classes}")
        case = props.get("case_id", props.get("patient_id"))
        polys = geom.get("coordinates") or []
        if gtype == "Polygon":
            polys = [polys]
        region = Region(class_index=classes.index(name) if name is not None else None,
                        case_id=str(case) if case not in (None, "") else None)
        for poly in polys:
            if not poly:
                continue
            region.polygons.append((_ring(poly[0], where), [_ring(h, where) for h in poly[1:]]))
        if region.polygons:
            regions.append(region)
    return regions


@dataclass
class LabelRaster:
    """Class and case maps on a grid of ``downsample`` level-0 pixels per cell."""

    classes: np.ndarray  # uint8 [H, W], NO_CLASS where no labelled region
    cases: np.ndarray  # int32 [H, W], index into case_ids, NO_CASE where no case region
    case_ids: list[str]
    downsample: float


def rasterize(regions: list[Region], width0: int, height0: int, downsample: float) -> LabelRaster:
    """Draw regions (in order, later wins) onto grids covering the level-0 slide."""
    w = max(1, int(np.ceil(width0 / downsample)))
    h = max(1, int(np.ceil(height0 / downsample)))
    cls_img = Image.new("L", (w, h), NO_CLASS)
    case_ids: list[str] = []
    for r in regions:
        if r.case_id is not None and r.case_id not in case_ids:
            case_ids.append(r.case_id)
    case_img = Image.new("I", (w, h), NO_CASE)
    for r in regions:
        pts = np.array([p for ext, _ in r.polygons for p in ext], dtype=np.float64) / downsample
        bx0, by0 = max(0, int(np.floor(pts[:, 0].min()))), max(0, int(np.floor(pts[:, 1].min())))
        bx1, by1 = min(w, int(np.ceil(pts[:, 0].max())) + 1), min(h, int(np.ceil(pts[:, 1].max())) + 1)
        if bx1 <= bx0 or by1 <= by0:
            continue  # region entirely outside the slide
        # Draw on a mask the size of the region's bounding box only; cell i covers the
        # continuous span [i, i+1), so vertices shift by half a cell onto PIL's centre grid.
        region_mask = Image.new("1", (bx1 - bx0, by1 - by0), 0)
        draw = ImageDraw.Draw(region_mask)
        for ext, holes in r.polygons:
            draw.polygon([(x / downsample - bx0 - 0.5, y / downsample - by0 - 0.5) for x, y in ext], fill=1)
            for hole in holes:
                draw.polygon([(x / downsample - bx0 - 0.5, y / downsample - by0 - 0.5) for x, y in hole], fill=0)
        if r.class_index is not None:
            cls_img.paste(r.class_index, (bx0, by0, bx1, by1), mask=region_mask)
        if r.case_id is not None:
            case_img.paste(case_ids.index(r.case_id), (bx0, by0, bx1, by1), mask=region_mask)
    return LabelRaster(
        classes=np.asarray(cls_img, dtype=np.uint8),
        cases=np.asarray(case_img, dtype=np.int32),
        case_ids=case_ids,
        downsample=float(downsample),
    )


def region_decider(raster: LabelRaster | None, slide_label: int | None, min_label_fraction: float,
                   unlabelled: str):
    """The label rule as a function ``(x, y, size0) -> TileDecision``.

    With regions: the tile's label is its majority class by area, kept when that class
    covers at least ``min_label_fraction`` of the tile; its case is the case with the most
    area when that covers at least half the tile (else the slide's patient). Without
    regions every tile gets the slide-level label (or none). Unlabelled tiles are dropped
    or kept with label -1, as ``unlabelled`` says.
    """
    def decide(x: int, y: int, size0: int) -> TileDecision:
        case = None
        if raster is None:
            label = -1 if slide_label is None else slide_label
        else:
            shares = window_shares(raster.classes, raster.downsample, x, y, size0)
            shares.pop(NO_CLASS, None)
            label = -1
            if shares:
                best = max(shares, key=lambda k: (shares[k], -k))
                if shares[best] >= min_label_fraction and shares[best] > 0:
                    label = best
            if raster.case_ids:
                cshares = window_shares(raster.cases, raster.downsample, x, y, size0)
                cshares.pop(NO_CASE, None)
                if cshares:
                    top = max(cshares, key=lambda k: (cshares[k], -k))
                    if cshares[top] >= 0.5:
                        case = raster.case_ids[top]
        keep = label >= 0 or unlabelled == "keep"
        return TileDecision(keep=keep, label=label, case=case)

    return decide
