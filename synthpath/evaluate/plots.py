"""Figures of the evaluation report. Each figure states its feature space, sample counts and
seeds in its title, and is written atomically (temp file + ``os.replace``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SETTING_NAMES = {"tstr": "TSTR (synthetic)", "trtr": "TRTR (real)", "mixed": "real + synthetic"}


def _save(fig, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def confusion_plot(cm: Sequence[Sequence[int]], classes: Sequence[str], title: str, path: Path) -> None:
    """Confusion matrix (rows = true class, columns = predicted), counts summed over seeds."""
    cm = np.asarray(cm)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(2.2 + 0.6 * n, 2.0 + 0.6 * n))
    ax.imshow(cm, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(n), classes, rotation=30, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (real holdout)")
    ax.set_title(title, fontsize=8)
    _save(fig, path)


def metrics_plot(report: dict, path: Path) -> None:
    """Bars per level: balanced accuracy per setting (mean ± 95% CI over seeds), and FID /
    patch-FID per level in the report's feature space."""
    levels = list(report["levels"])
    settings = [s for s in ("trtr", "tstr", "mixed")
                if any(s in (report["levels"][lv].get("utility") or {}) for lv in levels)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / max(len(settings), 1)
    x = np.arange(len(levels))
    for k, s in enumerate(settings):
        means, lo, hi = [], [], []
        for lv in levels:
            summ = ((report["levels"][lv].get("utility") or {}).get(s) or {}).get("summary", {}).get("balanced_accuracy")
            m = summ["mean"] if summ and summ["mean"] is not None else np.nan
            means.append(m)
            lo.append(m - summ["ci_low"] if summ and summ.get("ci_low") is not None else 0.0)
            hi.append(summ["ci_high"] - m if summ and summ.get("ci_high") is not None else 0.0)
        ax1.bar(x + (k - (len(settings) - 1) / 2) * width, means, width, yerr=[lo, hi], capsize=3,
                label=SETTING_NAMES.get(s, s))
    ax1.axhline(1.0 / max(len(report.get("classes", [])), 1), color="grey", ls="--", lw=0.8, label="chance")
    ax1.set_xticks(x, levels)
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("balanced accuracy on real holdout")
    ax1.legend(fontsize=7)
    seeds = report.get("seeds", [])
    ax1.set_title(f"utility: mean ± 95% t-CI over seeds {seeds}", fontsize=8)

    fids = [(report["levels"][lv].get("fidelity") or {}).get("fid", np.nan) for lv in levels]
    pfids = [(report["levels"][lv].get("pfid") or {}).get("pfid", np.nan) for lv in levels]
    ax2.bar(x - 0.2, [np.nan if v is None else v for v in fids], 0.4, label="FID (tiles)")
    ax2.bar(x + 0.2, [np.nan if v is None else v for v in pfids], 0.4, label="pFID (slide crops)")
    ax2.set_xticks(x, levels)
    ax2.set_ylabel("Fréchet distance (lower is closer)")
    ax2.legend(fontsize=7)
    counts = ", ".join(
        f"{lv}: {(report['levels'][lv].get('fidelity') or {}).get('n_synthetic', 0)} syn / "
        f"{(report['levels'][lv].get('fidelity') or {}).get('n_real', 0)} real" for lv in levels)
    pf = [(lv, report["levels"][lv].get("pfid") or {}) for lv in levels]
    pf_txt = ", ".join(f"{lv}: {p['n_crops']}x{p['crop_px']}px" for lv, p in pf if "n_crops" in p)
    space = report["feature_space"].get("label") or report["feature_space"]["name"]
    ax2.set_title(f"fidelity in {space} space\nFID tiles: {counts}" + (f"\npFID crops per side: {pf_txt}" if pf_txt else ""),
                  fontsize=8)
    _save(fig, path)


def sample_grid(real: np.ndarray, synthetic: np.ndarray, title: str, path: Path, n: int = 8, *,
                real_labels: Sequence[int] | None = None, synthetic_labels: Sequence[int] | None = None,
                classes: Sequence[str] | None = None) -> None:
    """Two rows of tiles: real holdout on top, synthetic below, each tile captioned with its
    class when labels are given."""
    n = max(1, min(n, max(len(real), len(synthetic))))
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 3.0), squeeze=False)
    rows = ((real, real_labels, "real holdout"), (synthetic, synthetic_labels, "synthetic"))
    for row, (imgs, labels, name) in enumerate(rows):
        for j in range(n):
            ax = axes[row, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if j < len(imgs):
                ax.imshow(imgs[j])
                if labels is not None and classes is not None:
                    ax.set_xlabel(str(classes[int(labels[j])]), fontsize=6)
        axes[row, 0].set_title(name, fontsize=7, loc="left")
    fig.suptitle(title, fontsize=8)
    _save(fig, path)
