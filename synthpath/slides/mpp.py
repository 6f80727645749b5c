"""Resolving a slide's level-0 resolution (µm per pixel).

Sources are tried in this order, and the first one that gives a usable value wins:

1. an explicit per-slide override in the recipe (``SlideEntry.mpp`` or
   ``data.mpp_overrides[slide_id]``);
2. ``openslide.mpp-x``;
3. the TIFF resolution tags (``tiff.XResolution`` + ``tiff.ResolutionUnit``);
4. the objective power (``openslide.objective-power``, 10x = 1.0 µm/px).

Choice: the issue lists the override last, as a fallback for slides without metadata. We
let an explicit override win instead, because a person writes one only when they know
better than the file (a scanner that stamps a wrong or missing calibration is the common
case). When metadata exists and disagrees with the override by more than 5 % the ingest
logs a warning, and the store records which source was used for every slide.

If no source gives a value, :class:`MppError` names the slide file and what was tried.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping

from ..units import objective_to_mpp

log = logging.getLogger("synthpath.slides")

#: µm per unit of the TIFF ResolutionUnit tag.
_UM_PER_UNIT = {"inch": 25400.0, "centimeter": 10000.0, "cm": 10000.0, "millimeter": 1000.0, "mm": 1000.0,
                "micrometer": 1.0, "um": 1.0, "2": 25400.0, "3": 10000.0}


class MppError(ValueError):
    """No resolution could be found for a slide."""


def _positive(value: object) -> float | None:
    try:
        v = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def mpp_from_openslide(props: Mapping[str, str]) -> float | None:
    """``openslide.mpp-x`` (and ``-y`` when x is missing)."""
    return _positive(props.get("openslide.mpp-x")) or _positive(props.get("openslide.mpp-y"))


def mpp_from_tiff_tags(props: Mapping[str, str], path: Path | None = None) -> float | None:
    """µm per pixel from XResolution (pixels per unit) and ResolutionUnit.

    OpenSlide exposes the tags as ``tiff.XResolution``/``tiff.ResolutionUnit`` for TIFF-based
    formats; for other readers (the plain-image fallback) the tags are read with tifffile.
    A missing unit or unit "none" (TIFF's default is inch, but scanners that write no unit
    usually mean nothing physical) gives ``None``.
    """
    xres = _positive(props.get("tiff.XResolution"))
    unit = props.get("tiff.ResolutionUnit")
    if (xres is None or unit is None) and path is not None and Path(path).suffix.lower() in (".tif", ".tiff"):
        xres, unit = _tifffile_resolution(Path(path))
    if xres is None or unit is None:
        return None
    per_unit = _UM_PER_UNIT.get(str(unit).strip().lower())
    if per_unit is None:
        return None
    return per_unit / xres


def _tifffile_raw(path: Path) -> tuple[float | None, str | None]:
    """XResolution (as a number) and ResolutionUnit (lower-case name) of page 0, unfiltered."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            tags = tf.pages[0].tags
            xr, ru = tags.get("XResolution"), tags.get("ResolutionUnit")
            xres = None
            if xr is not None:
                num, den = xr.value if isinstance(xr.value, tuple) else (xr.value, 1)
                xres = num / den if den else None
            unit = getattr(ru.value, "name", str(ru.value)).lower() if ru is not None else None
            return xres, unit
    except Exception:
        return None, None


def _tifffile_resolution(path: Path) -> tuple[float | None, str | None]:
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            tags = tf.pages[0].tags
            xr = tags.get("XResolution")
            ru = tags.get("ResolutionUnit")
            if xr is None or ru is None:
                return None, None
            num, den = xr.value if isinstance(xr.value, tuple) else (xr.value, 1)
            xres = _positive(num / den) if den else None
            unit = getattr(ru.value, "name", str(ru.value)).lower()
            return xres, unit
    except Exception as e:  # a file tifffile cannot parse simply has no tags for us
        log.debug("tifffile could not read resolution tags of %s: %s", path, e)
        return None, None


def mpp_from_objective(props: Mapping[str, str]) -> float | None:
    power = _positive(props.get("openslide.objective-power"))
    return objective_to_mpp(power) if power else None


def resolve_mpp(props: Mapping[str, str], path: Path, override: float | None = None, *,
                slide_id: str | None = None) -> tuple[float, str]:
    """Return ``(mpp, source)`` for a slide; ``source`` is one of ``override``,
    ``openslide.mpp-x``, ``tiff-resolution``, ``objective-power``.

    Raises :class:`MppError` naming ``path`` when nothing gives a value.
    """
    found = [
        ("openslide.mpp-x", mpp_from_openslide(props)),
        ("tiff-resolution", mpp_from_tiff_tags(props, path)),
        ("objective-power", mpp_from_objective(props)),
    ]
    meta = next(((src, v) for src, v in found if v is not None), None)
    if override is not None:
        if not override > 0:
            raise MppError(f"{path}: the recipe's mpp override must be positive, got {override}")
        if meta is not None and abs(meta[1] - override) / override > 0.05:
            log.warning("%s: recipe mpp override %.4g wins over %s = %.4g", path, override, meta[0], meta[1])
        return float(override), "override"
    if meta is not None:
        return float(meta[1]), meta[0]
    from .diagnose import resolution_facts

    sid = slide_id or Path(path).stem
    raise MppError(
        f"{path}: cannot tell the slide's resolution: the file has {resolution_facts(props, path)}. "
        f"Give it in the recipe: data.mpp_overrides: {{{sid}: <µm per pixel>}} (e.g. 0.25 for 40x, 0.5 for 20x), "
        f"or mpp: under this slide's entry in data.slides"
    )
