"""Explicit magnification units.

synthpath describes every level by its resolution in micrometres per pixel (mpp).
Objective-power aliases such as ``"20x"`` are accepted on input and converted with
the usual convention that 10x corresponds to 1.0 µm/px (so 20x ≈ 0.5, 5x ≈ 2.0,
1.25x ≈ 8.0). Internally only mpp is used.
"""

from __future__ import annotations

import math
import re

#: mpp of a 1x objective under the 10x ≈ 1.0 µm/px convention.
MPP_AT_1X = 10.0

_ALIAS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[xX]\s*$")
_MPP = re.compile(r"^\s*(?:mpp\s*)?(\d+(?:\.\d+)?)\s*(?:mpp|um|µm)?\s*$", re.IGNORECASE)


def objective_to_mpp(power: float) -> float:
    """Convert an objective power (20 for "20x") to µm per pixel."""
    if power <= 0:
        raise ValueError(f"objective power must be positive, got {power}")
    return MPP_AT_1X / float(power)


def mpp_to_objective(mpp: float) -> float:
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    return MPP_AT_1X / float(mpp)


def parse_mpp(value: float | int | str) -> float:
    """Parse ``0.5``, ``"0.5"``, ``"0.5mpp"`` or ``"20x"`` into µm per pixel."""
    if isinstance(value, bool):
        raise ValueError(f"not a resolution: {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"mpp must be a positive number, got {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _ALIAS.match(value)
        if m:
            return objective_to_mpp(float(m.group(1)))
        m = _MPP.match(value)
        if m:
            return parse_mpp(float(m.group(1)))
    raise ValueError(
        f"cannot read {value!r} as a resolution: give µm per pixel (e.g. 0.5) or an objective alias (e.g. '20x')"
    )


def level_name(mpp: float) -> str:
    """A short, lowercase name for a level, used in file keys and columns.

    Objective powers in steps of 1/8 become their usual names: ``"20x"``, ``"5x"``,
    ``"2.5x"``, ``"1.25x"`` (8 µm/px), ``"0.625x"``; anything else becomes an ``"mpp0_3"``
    style name. A name holds at most one ".", only in a fractional power.
    """
    power = mpp_to_objective(mpp)
    if abs(power - round(power)) < 1e-6:
        return f"{int(round(power))}x"
    if abs(power * 8 - round(power * 8)) < 1e-6:
        return f"{round(power * 8) / 8:g}x"
    return "mpp" + f"{mpp:g}".replace(".", "_")
