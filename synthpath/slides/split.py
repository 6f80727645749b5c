"""Deterministic train/holdout split by patient.

Each patient gets a rank from SHA-256 of ``(seed, patient_id)``; the lowest-ranked
``round(holdout_fraction * n)`` patients are held out, clamped so that with two or more
patients each side has at least one. The split depends only on the seed and the set of
patient ids, never on slide order or worker timing, and a patient is on one side only.
"""

from __future__ import annotations

import hashlib


def patient_rank(seed: int, patient_id: str) -> str:
    return hashlib.sha256(f"{seed}\x1f{patient_id}".encode()).hexdigest()


def assign_splits(patients: list[str] | set[str], holdout_fraction: float, seed: int) -> dict[str, str]:
    """``patient_id -> "train" | "holdout"``."""
    uniq = sorted(set(patients))
    n = len(uniq)
    if n == 0:
        return {}
    if n == 1:
        return {uniq[0]: "train"}
    k = min(n - 1, max(1, int(round(holdout_fraction * n))))
    ranked = sorted(uniq, key=lambda p: patient_rank(seed, p))
    held = set(ranked[:k])
    return {p: ("holdout" if p in held else "train") for p in uniq}
