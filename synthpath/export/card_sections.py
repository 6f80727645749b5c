"""The dataset card's sections and figures, each built from one of the run's reports: the
privacy ledger, the audit, the evaluation (utility tables, the chance warning), the sample
grids drawn from the shards, and the YAML header's size category and features.

Every number goes through the card's :class:`~synthpath.export.card_numbers.Numbers`;
:mod:`synthpath.export.card` puts the sections into the template.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .card_numbers import Numbers, _cell, _flat, _get, _read_json, _show, _table

GRID_COLS = 8


# ----------------------------------------------------------------------------- sections
def _quote(lines: list[str]) -> list[str]:
    """Verbatim text from a report (warnings, notes) as blockquote lines."""
    out = []
    for x in lines:
        out += ["> " + str(x).replace("\n", " "), ">"]
    return out[:-1]


def _privacy_section(num: Numbers, ledger: dict | None, src: str) -> tuple[str, str]:
    """(body text, one-line headline)."""
    if ledger is None:
        return ("No privacy ledger was found (`train/ledger.json`); no formal privacy guarantee is claimed.",
                "no formal privacy guarantee (no ledger)")
    warnings = [str(w) for w in (ledger.get("warnings") or [])]
    table = [(k, v) for k, v in _flat({k: v for k, v in ledger.items() if k not in ("warnings", "history")})]
    lines = []
    if not ledger.get("enabled", False):
        lines.append("The model was trained **without differential privacy**: there is no formal privacy "
                     "guarantee. Only the empirical audit below speaks to memorization.")
        head = "trained without differential privacy"
    else:
        ke, eps = _get(ledger, "epsilon", "eps")
        kd, delta = _get(ledger, "delta")
        unit = ledger.get("unit") or "unit"
        e_txt = num(eps, src, [ke]) if ke else "?"
        d_txt = num(delta, src, [kd]) if kd else "?"
        lines.append(f"The model was trained with **DP-SGD** (Opacus): **(ε = {e_txt}, δ = {d_txt})-differential "
                     f"privacy, where neighbouring datasets differ in one {unit}**.")
        if "n_units" in ledger and isinstance(ledger["n_units"], int):
            lines[-1] += f" The training set had {num(ledger['n_units'], src, ['n_units'])} such units."
        head = f"DP-SGD, ε = {e_txt}, δ = {d_txt}, unit: {unit}"
    lines += ["", "Privacy ledger (`train/ledger.json`; the accountant's step history is in the file):", "",
              _table(num, table, src)]
    if warnings:
        lines += ["", "Warnings recorded in the ledger:", ""] + _quote(warnings)
    return "\n".join(lines), head


def _audit_section(num: Numbers, report: dict, src: str) -> str:
    passed = report.get("passed")
    lines = [f"Audit verdict: **{'PASSED' if passed else 'FAILED'}** (`audit/report.json`).", ""]
    checks = report.get("checks") or {}
    if checks:
        lines += ["| check | value | interval | threshold | passed | details |", "|---|---|---|---|---|---|"]
        for name, c in checks.items():
            if not isinstance(c, dict):
                lines.append(f"| `{name}` | {_cell(num, c, src, ['checks', name])} | — | — | — | — |")
                continue
            p = c.get("passed")
            skip = ("value", "threshold", "passed", "interval", "interval_level")
            extra = [(k, v) for k, v in _flat({k: v for k, v in c.items() if k not in skip})
                     if not (isinstance(v, str) and len(v) > 60)]
            details = "; ".join(f"`{_show(k)}` {_cell(num, v, src, ['checks', name, *k])}" for k, v in extra) or "—"
            iv = c.get("interval")
            ivs = (f"[{_cell(num, iv[0], src, ['checks', name, 'interval', 0])}, "
                   f"{_cell(num, iv[1], src, ['checks', name, 'interval', 1])}] "
                   f"({_cell(num, c.get('interval_level'), src, ['checks', name, 'interval_level'])} level)"
                   if isinstance(iv, list) and len(iv) == 2 else "—")
            lines.append(
                f"| `{name}` | {_cell(num, c.get('value'), src, ['checks', name, 'value'])} | {ivs} | "
                f"{_cell(num, c.get('threshold'), src, ['checks', name, 'threshold'])} | "
                f"{'yes' if p else ('no' if p is False else '—')} | {details} |")
        lines.append("")
    mia = report.get("mia")
    if isinstance(mia, dict):
        lines.append("Membership inference (a loss-based attack, each tile's loss calibrated against similar "
                     "held-out tiles: can the model tell its training patients' tiles from held-out patients' "
                     "tiles?). Intervals are percentile bootstrap intervals:")
        lines.append("")
        ivs = mia.get("intervals") if isinstance(mia.get("intervals"), dict) else {}

        def _iv(path: list, v) -> str:
            if not (isinstance(v, list) and len(v) == 2):
                return ""
            return (f" (bootstrap interval {_cell(num, v[0], src, path + [0])} to {_cell(num, v[1], src, path + [1])})")

        if "auc" in mia:
            lines.append(f"- ROC AUC: {num(mia['auc'], src, ['mia', 'auc'])}"
                         f"{_iv(['mia', 'intervals', 'auc'], ivs.get('auc'))} (0.5 = chance)")
        tp = mia.get("tpr_at_fpr")
        if isinstance(tp, dict):
            for k, e in tp.items():
                if isinstance(e, dict) and "tpr" in e and "fpr" in e:
                    lines.append(f"- TPR at FPR {num(e['fpr'], src, ['mia', 'tpr_at_fpr', k, 'fpr'])}: "
                                 f"{num(e['tpr'], src, ['mia', 'tpr_at_fpr', k, 'tpr'])}"
                                 + _iv(['mia', 'intervals', 'tpr_at_fpr', k], (ivs.get('tpr_at_fpr') or {}).get(k)))
        for k in ("n_members", "n_nonmembers"):
            if isinstance(mia.get(k), int):
                lines.append(f"- {k.replace('_', ' ')}: {num(mia[k], src, ['mia', k])}")
        notes = [e["note"] for e in (tp or {}).values() if isinstance(e, dict) and e.get("note")] if isinstance(tp, dict) else []
        if notes:
            lines += [""] + _quote(notes)
        lines.append("")
    syn = report.get("synthetic")
    th = report.get("thresholds")
    if isinstance(syn, dict) and isinstance(syn.get("n"), int):
        lines.append(f"The audit drew {num(syn['n'], src, ['synthetic', 'n'])} synthetic tiles"
                     + (f"; copy thresholds are the {num(th['holdout_quantile'], src, ['thresholds', 'holdout_quantile'])} "
                        f"quantile of holdout-to-train distances, calibrated with "
                        f"{num(th['k_neighbours'], src, ['thresholds', 'k_neighbours'])} neighbours"
                        if isinstance(th, dict) and "holdout_quantile" in th and "k_neighbours" in th else "")
                     + ". The same near-copy test filtered every released tile.")
        lines.append("")
    if report.get("notes"):
        lines += ["Notes of the audit:", ""] + _quote([str(x) for x in report["notes"]]) + [""]
    lines += ["The audit's contact sheet (worst synthetic tiles beside their nearest training tiles) shows real "
              "patient tissue, so it is not part of this release; it stays with the data controller in `audit/`.", ""]
    return "\n".join(lines)


def _pivot(num: Numbers, block: dict, src: str, root: list) -> str | None:
    """A dict of per-level (or per-setting) dicts as one table: a row per metric, a
    column per key of ``block``; None if ``block`` is not shaped like that."""
    if len(block) < 1 or not all(isinstance(v, dict) for v in block.values()):
        return None
    cols = list(block)
    metrics: list[str] = []
    for v in block.values():
        for k, x in v.items():
            if k not in metrics and not isinstance(x, dict):
                metrics.append(k)
    if not metrics:
        return None
    rows = ["| metric | " + " | ".join(f"`{c}`" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in metrics:
        cells = [_cell(num, block[c].get(m), src, root + [c, m]) if m in block[c] else "—" for c in cols]
        rows.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _utility_section(num: Numbers, report: dict | None, src: str) -> str:
    if report is None:
        return "Not evaluated yet: run `synthpath evaluate` (it fills this section)."
    parts = [("Downstream utility (train on synthetic, test on real: TSTR, against train on real: TRTR) and "
              f"fidelity (FID, KID, precision/recall), from `{src}`:")]
    rest = {}
    for k, v in report.items():
        table = _pivot(num, v, src, [k]) if isinstance(v, dict) else None
        if table:
            parts += [f"`{k}`:", table]
        else:
            rest[k] = v
    pairs = [(k, v) for k, v in _flat(rest) if not isinstance(v, str) or len(v) < 200]
    if pairs:
        parts.append(_table(num, pairs, src))
    return "\n\n".join(parts)


def _chance_warning(num: Numbers, report: dict | None, src: str, classes: list[str]) -> list[str]:
    """A first limitation when synthetic-trained classifiers cannot be told from chance on the
    real holdout patients (the 95% interval of TSTR balanced accuracy reaches chance, or,
    with one seed, the value is at or below it)."""
    head = (report or {}).get("headline") or {}
    chance = 1.0 / max(len(classes), 1)
    hits, levels = [], 0
    for lv, h in head.items():
        if not isinstance(h, dict) or not isinstance(h.get("tstr_balanced_accuracy"), (int, float)):
            continue
        levels += 1
        ci = h.get("tstr_balanced_accuracy_ci95")
        low = ci[0] if isinstance(ci, (list, tuple)) and len(ci) == 2 and ci[0] is not None else h["tstr_balanced_accuracy"]
        if low <= chance + 1e-9:
            hits.append(f"`{lv}` {num(h['tstr_balanced_accuracy'], src, ['headline', lv, 'tstr_balanced_accuracy'])}")
    if not hits:
        return []
    n = num(len(classes), "recipe", ["data", "classes", "#len"])
    if len(hits) < levels:  # some magnifications do better than chance: name only the others
        return [f"- **At {', '.join(h.split(' ')[0] for h in hits)}, a classifier trained on this synthetic data does no "
                "better than chance on real held-out patients** "
                f"(TSTR balanced accuracy {', '.join(hits)}; chance is one in {n} classes, and the confidence interval "
                "reaches it); at the other magnifications its interval lies above chance (see Evaluation). Do not "
                "train or benchmark models on the listed magnifications of this release."]
    return [f"- **A classifier trained on this synthetic data does no better than chance on real held-out patients** "
            f"(TSTR balanced accuracy {', '.join(hits)}; chance is one in {n} classes, and the confidence interval reaches "
            "it). The model did not learn what tells the classes apart, at this privacy budget and training "
            "length: use this release to test pipelines, not to train or benchmark models."]


def _sample_grids(generate_dir: Path, hf_dir: Path, classes: list[str], level_names: list[str]) -> list[str]:
    """One PNG per level: a row per class, up to GRID_COLS samples each, from the shards."""
    from .hf import iter_shard_samples

    index = _read_json(generate_dir / "shards" / "index.json", "the shard index")
    picked: dict[int, list[dict]] = {c: [] for c in range(len(classes))}
    for entry in index["shards"]:
        for _, parts in iter_shard_samples(generate_dir / "shards" / entry["file"]):
            c = int(parts["cls"])
            if 0 <= c < len(classes) and len(picked[c]) < GRID_COLS:
                picked[c].append(parts)
        if all(len(v) >= GRID_COLS for v in picked.values()):
            break
    import io

    names = []
    rows_used = [c for c in range(len(classes)) if picked[c]]
    for n in level_names:
        tiles = {c: [np.asarray(Image.open(io.BytesIO(p[f"{n}.png"])).convert("RGB")) for p in picked[c]]
                 for c in rows_used}
        if not rows_used:
            continue
        px = next(iter(tiles.values()))[0].shape[0]
        grid = np.full((len(rows_used) * px, GRID_COLS * px, 3), 255, np.uint8)
        for r, c in enumerate(rows_used):
            for j, t in enumerate(tiles[c]):
                grid[r * px:(r + 1) * px, j * px:(j + 1) * px] = t
        name = f"samples_{n}.png"
        tmp = hf_dir / f".{name}.tmp"
        Image.fromarray(grid).save(tmp, format="PNG")
        os.replace(tmp, hf_dir / name)
        names.append(name)
    return names


def _size_category(n: int) -> str:
    for lim, lab in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < lim:
            return lab
    return "1M<n<10M"


def _features_yaml(classes: list[str], level_names: list[str]) -> list[dict]:
    from .hf import hf_features

    out = []
    for name, f in hf_features(classes, level_names).items():
        t = type(f).__name__
        if t == "Image":
            out.append({"name": name, "dtype": "image"})
        elif t == "ClassLabel":
            out.append({"name": name, "dtype": {"class_label": {"names": {str(i): c for i, c in enumerate(classes)}}}})
        else:
            out.append({"name": name, "dtype": f.dtype})
    return out
