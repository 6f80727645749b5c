"""The audit's human-readable outputs: ``report.md``, ``report.json`` and the contact sheet.

The contact sheet shows the worst synthetic tiles beside their nearest *training* tiles, so
it holds real patient images. It stays in ``audit/`` (and ``audit_failed/``), next to a
``PATIENT_IMAGES_DO_NOT_SHARE.txt`` notice, and is never part of the release: the export
neither copies nor embeds it (``synthpath.export.release`` lists what the release holds).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from synthpath.atomic import write_text

#: written next to every file that holds real patient pixels
PATIENT_NOTICE = "PATIENT_IMAGES_DO_NOT_SHARE.txt"
PATIENT_NOTICE_TEXT = (
    "This folder holds REAL PATIENT IMAGES: {files} show training tiles (real tissue of\n"
    "the patients the model was trained on) beside synthetic ones. They are for the auditor's\n"
    "eyes only. Never share, upload or publish them; they are not part of the released dataset.\n"
)


def write_patient_notice(folder: Path, files: list[str]) -> None:
    """Mark ``folder`` as holding real patient images (``files``)."""
    write_text(Path(folder) / PATIENT_NOTICE, PATIENT_NOTICE_TEXT.format(files=", ".join(files)))


def write_report(report: dict, work: Path) -> None:
    write_text(work / "report.json", json.dumps(report, indent=2, default=str))
    write_text(work / "report.md", render_markdown(report))


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
    return str(v)


def render_markdown(report: dict) -> str:
    c = report["checks"]
    lines = ["# synthpath audit report", ""]
    if report.get("allowed_failed"):
        lines += ["**The audit FAILED and the release was allowed anyway (--allow-failed-audit).**", ""]
    lines += [f"**Result: {'PASSED' if report['passed'] else 'FAILED'}**"
              + (f" (failed: {', '.join(report['failed_checks'])})" if report["failed_checks"] else ""), "",
              "| check | value | interval | threshold | passed |", "|---|---|---|---|---|"]
    for name, ch in c.items():
        iv = ch.get("interval")
        ivs = (f"[{_fmt(iv[0])}, {_fmt(iv[1])}] ({ch.get('interval_level', 0.95):.0%})" if iv else "n/a")
        lines.append(f"| {name} | {_fmt(ch['value'])} | {ivs} | {_fmt(ch['threshold'])} | {_fmt(ch['passed'])} |")
    cf = c["copy_fraction"]
    if "p_value" in cf:
        lines += ["", f"Copy test: {cf['copies']} of {cf['n_synthetic']} synthetic tiles flagged, against a rate of "
                  f"{_fmt(cf['null_rate'])} on real unseen tiles (the rule flags {cf['holdout_flagged']} of "
                  f"{cf['n_holdout']} holdout tiles); one-sided exact binomial p = {_fmt(cf['p_value'])} "
                  f"(alpha {_fmt(cf['alpha'])}; {cf['critical_copies']} copies would fail)."]
    lines += ["", f"Synthetic tiles: {report['synthetic']['n']} ({report['synthetic']['method']}); "
              f"copies in any space: {c['copy_fraction']['copies']}.", "",
              "## Memorization per level and feature space", "",
              f"Copy thresholds are the {report['thresholds']['holdout_quantile']:g} quantiles of the holdout→train "
              f"distances (d1) and of Carlini's calibrated ℓ2 (d1 / mean of {report['thresholds']['k_neighbours']} "
              "nearest); a copy is below both.", "",
              "| level | space | n syn / train / holdout | τ d1 | τ cal | copies | d1 median syn / holdout | "
              "min d1 syn | closer to train |", "|---|---|---|---|---|---|---|---|---|"]
    for k, e in report["per_level"].items():
        for s, r in e["spaces"].items():
            label = report["spaces"][s]["label"]
            lines.append(f"| L{k} ({report['levels_mpp'][int(k)]:g} µm/px) | {label} | {e['n_synthetic']} / "
                         f"{e['n_train']} / {e['n_holdout']} | {_fmt(r['tau_d1'])} | {_fmt(r['tau_calibrated'])} | "
                         f"{r['copies']} | {_fmt(r['synthetic_d1_median'])} / {_fmt(r['holdout_d1_median'])} | "
                         f"{_fmt(r['synthetic_d1_min'])} | {_fmt(r['closer_to_train'])} |")
    m = report["mia"]
    ivm = m.get("intervals", {})
    lines += ["", "## Membership inference (calibrated loss attack)", "",
              f"Denoising error at candidate t = {', '.join(f'{t:g}' for t in m['timesteps'])}, averaged over "
              f"{m.get('noise_draws', 1)} noise draws, relative to the most similar holdout tiles at the same level "
              f"(difficulty calibration); t chosen by cross-fitted power (chosen: "
              f"{', '.join(f'{t:g}' for t in m.get('chosen_timesteps', []))}). {m['n_members']} training vs "
              f"{m['n_nonmembers']} holdout-patient tiles, balanced per level.", "",
              f"- ROC AUC: **{m['auc']:.3f}**"
              + (f" [{ivm['auc'][0]:.3f}, {ivm['auc'][1]:.3f}]" if "auc" in ivm else "")
              + f" (threshold {c['mia_auc']['threshold']:g}; 0.5 = chance; uncalibrated attack "
              f"{_fmt(m.get('uncalibrated_auc'))})"]
    for key, e in m["tpr_at_fpr"].items():
        iv = ivm.get("tpr_at_fpr", {}).get(key)
        lines.append(f"- TPR at {key} FPR: {e['tpr']:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "")
                     + (f" ({e['note']})" if "note" in e else ""))
    lines.append("- per-timestep AUC: " + ", ".join(f"t={t}: {a:.3f}" for t, a in m["per_timestep_auc"].items()))
    lines += ["", "## Feature spaces", ""]
    for s, d in report["spaces"].items():
        lines.append(f"- **{d['label']}** (`{s}`, {d['dim']}-d)")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {x}" for x in report["notes"]]
    lines += ["", "Files: `report.json`, `roc.png`, `contact_sheet.png` (worst synthetic tiles beside their nearest "
              "training tiles: **real patient images, never to be shared**; see `" + PATIENT_NOTICE + "`); the "
              "release filter is in `filter/` (never exported).", ""]
    return "\n".join(lines)


def write_contact_sheet(store, synth: list[np.ndarray], tr_ids: dict[int, list[str]], worst: list[dict],
                        thresholds: dict, path: Path, rows: int = 8) -> None:
    """Worst synthetic tiles (smallest d1 relative to the copy threshold, one row per
    (tile, space)) beside their nearest training tile, labelled with space and distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen: set[tuple[int, int]] = set()
    pick = []
    for w in worst:
        key = (w["level"], w["i"])
        if key in seen or w["nn"] < 0:
            continue
        seen.add(key)
        pick.append(w)
        if len(pick) >= rows:
            break
    fig, axes = plt.subplots(max(len(pick), 1), 2, figsize=(5.2, 2.4 * max(len(pick), 1)), dpi=110, squeeze=False)
    labels = {"pixel": "pixels", "learned": "learned encoder", "efficientnet": "EfficientNet-Lite0 (ImageNet)",
              "checkpoint": "checkpoint"}
    for r, w in enumerate(pick):
        syn = synth[w["level"]][w["i"]]
        real = store.read_images([tr_ids[w["level"]][w["nn"]]])[0]
        tau = thresholds[w["space"]][w["level"]]["d1"]
        axes[r][0].imshow(syn)
        axes[r][0].set_title(f"synthetic L{w['level']} #{w['i']}" + ("  COPY" if w["copy"] else ""), fontsize=7,
                             color="red" if w["copy"] else "black")
        axes[r][1].imshow(real)
        axes[r][1].set_title(f"nearest train ({labels.get(w['space'], w['space'])})\n"
                             f"d={w['d1']:.3f} (τ={tau:.3f}), cal={w['cal']:.2f}", fontsize=7)
    if not pick:
        axes[0][0].text(0.5, 0.5, "no synthetic tiles", ha="center")
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("worst synthetic tiles vs nearest training tiles", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


