"""The dataset card: ``hf/README.md``, written from the run's own artifacts.

The template is ``cards/dataset_card.md`` (``string.Template``; no templating dependency).
Every number shown in the card goes through :class:`Numbers`, which formats it and
records where it came from (file, JSON path, value) in ``hf/card_provenance.json``; the
tests use that to check each number against its source. Sources:

- the recipe (name, hash, sampler, model size);
- ``train/config.json`` and the ``model.safetensors`` header (parameter count);
- ``train/ledger.json`` (privacy ledger; ``{"enabled": false}`` for non-DP runs);
- ``audit/report.json`` (never the audit's contact sheet: it shows real training tiles and
  stays in ``audit/``; nothing the card shows holds a real pixel);
- ``generate/manifest.json`` (generation summary) and the shards (sample grids);
- ``export/export.json`` (split sizes of the Parquet dataset);
- ``evaluate/report.json`` when given (EVAL calls :func:`write_card` again after it runs);
  a dict given instead is saved as ``hf/evaluation.json`` and cited as that file.

If the audit did not pass (so the export was forced with ``--allow-failed-audit``), the
first lines after the YAML header say so in bold.
"""

from __future__ import annotations

import json
import math
import os
import sys
import struct
from pathlib import Path
from string import Template
from typing import Any

import numpy as np
import yaml
from PIL import Image

from ..atomic import write_json, write_text
from ..pipeline import StageError

# The template lives in the repository's cards/ folder (used as is by an editable install);
# a wheel install carries a copy under <prefix>/share/synthpath/cards (pyproject data-files).
_TEMPLATE_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "cards" / "dataset_card.md",
    Path(sys.prefix) / "share" / "synthpath" / "cards" / "dataset_card.md",
)
TEMPLATE = next((c for c in _TEMPLATE_CANDIDATES if c.is_file()), _TEMPLATE_CANDIDATES[0])
GRID_COLS = 8


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def _path(path) -> list:
    """A JSON path as a list of keys/indices; a string is split on dots (for keys that
    contain no dots)."""
    if isinstance(path, str):
        return [int(p) if p.isdigit() else p for p in path.split(".")]
    return list(path)


class Numbers:
    """Formats values for the card and remembers their source (file, JSON path as a list
    of keys and indices; a last element ``"#len"`` means the length of the list there)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def __call__(self, value: Any, source: str, path) -> str:
        text = _fmt(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self.records.append({"text": text, "value": value, "source": source, "path": _path(path)})
        return text


def _read_json(path: Path, what: str, required: bool = True) -> dict | None:
    if not path.is_file():
        if required:
            raise StageError(f"{what} {path} is missing")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StageError(f"{what} {path} cannot be read: {e}") from None


def safetensors_params(path: Path) -> int:
    """Number of parameters in a safetensors file, from its JSON header alone."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return int(sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"))


MAX_LIST = 8  # longer lists (curves, histories) are left out of card tables


def _flat(obj: Any, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path tuple, leaf) pairs of a JSON object; short lists of scalars stay whole, long
    lists are dropped."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_flat(v, prefix + (k,)))
    elif isinstance(obj, list):
        if len(obj) > MAX_LIST:
            return []
        if any(isinstance(x, (dict, list)) for x in obj):
            for i, v in enumerate(obj):
                out.extend(_flat(v, prefix + (i,)))
        else:
            out.append((prefix, obj))
    else:
        out.append((prefix, obj))
    return out


def _show(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _cell(num: Numbers, v: Any, source: str, path) -> str:
    path = _path(path)
    if isinstance(v, list):
        return ", ".join(_cell(num, x, source, path + [i]) for i, x in enumerate(v)) or "—"
    if v is None:
        return "—"
    if isinstance(v, dict):
        return "; ".join(f"{k} {_cell(num, x, source, path + [k])}" for k, x in v.items()) or "—"
    if isinstance(v, str):
        return "`" + v.replace("|", "/").replace("`", "'").replace("\n", " ") + "`"
    return num(v, source, path)


def _table(num: Numbers, pairs: list[tuple[tuple, Any]], source: str) -> str:
    rows = ["| key | value |", "|---|---|"]
    for path, v in pairs:
        rows.append(f"| `{_show(path)}` | {_cell(num, v, source, list(path))} |")
    return "\n".join(rows)


def _get(d: dict, *names: str) -> tuple[str | None, Any]:
    for n in names:
        if n in d and d[n] is not None:
            return n, d[n]
    return None, None


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


# ----------------------------------------------------------------------------- card
def render_card(*, recipe, train_dir: Path, audit_dir: Path, generate_dir: Path, export_info: dict,
                export_src: str, evaluate_report: dict | None, evaluate_src: str, images: dict) -> tuple[str, list[dict]]:
    """The card text and its number provenance (pure: reads files, writes nothing)."""
    num = Numbers()
    classes = list(export_info["classes"])
    level_names = list(export_info["level_names"])
    splits = export_info["splits"]
    ledger_p = Path(train_dir) / "ledger.json"
    ledger = _read_json(ledger_p, "the privacy ledger", required=False)
    audit = _read_json(Path(audit_dir) / "report.json", "the audit report")
    gen_m = _read_json(Path(generate_dir) / "manifest.json", "the generate manifest", required=False) or {}
    gen = gen_m.get("summary", {})
    gsrc = "generate/manifest.json"
    tcfg = _read_json(Path(train_dir) / "config.json", "the model config", required=False) or {}
    mcfg = tcfg.get("model", {})

    pretty = recipe.export.pretty_name or f"synthpath {recipe.name} (synthetic histopathology)"
    total = sum(s["num_examples"] for s in splits.values())
    header = {
        "license": recipe.export.license,
        "pretty_name": pretty,
        "task_categories": ["image-classification"],
        "tags": ["synthetic", "histopathology", "differential-privacy", "medical", "multi-magnification"],
        "size_categories": [_size_category(total)],
        "configs": [{"config_name": "default", "default": True,
                     "data_files": [{"split": sp, "path": f"data/{sp}-*.parquet"} for sp in splits]}]
                   + [{"config_name": c["config"],
                       "data_files": [{"split": sp, "path": f"{c['dir']}/{sp}-*.parquet"} for sp in c["splits"]]}
                      for c in (export_info.get("tile_configs") or {}).values()],
        "dataset_info": {
            "features": _features_yaml(classes, level_names),
            "splits": [{"name": sp, "num_bytes": s["num_bytes"], "num_examples": s["num_examples"]}
                       for sp, s in splits.items()],
        },
    }
    for sp, s in splits.items():
        num(s["num_examples"], export_src, ["splits", sp, "num_examples"])
        num(s["num_bytes"], export_src, ["splits", sp, "num_bytes"])
    yaml_header = yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=1000).rstrip()

    passed = bool(audit.get("passed"))
    banner = "" if passed else (
        "\n**WARNING: the privacy audit of this dataset FAILED. It was released anyway with "
        "`--allow-failed-audit`. Do not treat it as privacy-preserving; read the audit section.**\n")

    dp_text, dp_head = _privacy_section(num, ledger, "train/ledger.json")
    if not recipe.evaluate.publish:  # holdout figures are not DP: kept out of the card on request
        published_eval, evaluate_report = evaluate_report is not None, None
    from .coverage import coverage_section

    coverage = coverage_section(num, recipe=recipe, ledger=ledger, audit=audit, gen=gen,
                                evaluated=evaluate_report is not None)
    split_txt = ", ".join(f"{num(s['num_examples'], export_src, ['splits', sp, 'num_examples'])} in `{sp}`"
                          for sp, s in splits.items())
    n_cls = num(len(classes), export_src, ["classes", "#len"])
    summary = (f"Synthetic histopathology from the synthpath recipe `{recipe.name}`: multi-magnification tile "
               f"stacks ({', '.join(f'`{n}`' for n in level_names)}) of {n_cls} classes "
               f"({', '.join(f'`{c}`' for c in classes)}); {split_txt}. Privacy: {dp_head}. "
               f"Audit: **{'passed' if passed else 'FAILED'}**.")

    # structure
    st = ["Each row is one *stack*: a tile at each magnification, the finer tiles lying inside the coarser "
          "ones, all cut from one synthetic slide.", "",
          "| column | meaning |", "|---|---|"]
    mpps = gen.get("mpp") or []
    for i, n in enumerate(level_names):
        m = f" ({num(mpps[i], gsrc, ['summary', 'mpp', i])} µm/px)" if i < len(mpps) else ""
        st.append(f"| `image_{n}` | tile at `{n}`{m} |")
    st += ["| `label` | class (`ClassLabel`), names: " + ", ".join(f"`{c}`" for c in classes) + " |",
           "| `slide_id` | synthetic slide the stack was cut from (the train/test split is by slide) |",
           "| `seed`, `slide_seed`, `attempt` | seeds that regenerate the sample |",
           "| `x_<level>`, `y_<level>`, `mpp_<level>` | tile position in that level's slide image, and its resolution |",
           "| `model_hash` | hash of the weights that drew it |", ""]
    tcfg_info = export_info.get("tile_configs") or {}
    if tcfg_info:
        st += ["**How rows relate.** Stacks cut from one synthetic slide share their coarser tiles: stacks under "
               "the same coarsest tile repeat its image, so the columns of a coarser level hold repeated images. "
               "To train on one level, load that level's config, whose rows are *distinct* tiles "
               "(`load_dataset(path, \"tiles_<level>\")`; `stack_keys` lists the stacks holding each tile):", "",
               "| config | rows (distinct tiles) |", "|---|---|"]
        for n, c in tcfg_info.items():
            rows = ", ".join(f"{num(v['num_examples'], export_src, ['tile_configs', n, 'splits', sp, 'num_examples'])} "
                             f"in `{sp}`" for sp, v in c["splits"].items())
            st.append(f"| `{c['config']}` | {rows} |")
        st.append("")
    st += ["| split | examples | synthetic slides |", "|---|---|---|"]
    for sp, s in splits.items():
        st.append(f"| `{sp}` | {num(s['num_examples'], export_src, ['splits', sp, 'num_examples'])} | "
                  f"{num(len(s['slides']), export_src, ['splits', sp, 'slides', '#len'])} |")
    hist = gen.get("label_histogram") or {}
    if hist:
        st += ["", "Samples per class: " + ", ".join(
            f"`{k}` {num(v, gsrc, ['summary', 'label_histogram', k])}" for k, v in hist.items()) + "."]

    # how made
    s = recipe.sampler
    hm = [f"- **Recipe:** `{recipe.name}`, hash `{recipe.full_hash()}`."]
    if mcfg or (Path(train_dir) / "model.safetensors").is_file():
        params = safetensors_params(Path(train_dir) / "model.safetensors") if (Path(train_dir) / "model.safetensors").is_file() else None
        ptxt = f", {num(params, 'train/model.safetensors', ['header', 'parameters'])} parameters" if params else ""
        hm.append(f"- **Model:** one magnification-aware pixel-space diffusion UNet, size `{mcfg.get('size', recipe.model.size)}`{ptxt}, "
                  f"conditioned on resolution (log µm/px), label, parent crop and known border pixels; "
                  f"EMA weights sampled.")
    hm.append(f"- **Sampler:** `{s.name}`, {num(s.steps, 'recipe', 'sampler.steps')} steps, classifier-free guidance "
              f"{num(s.guidance_scale, 'recipe', 'sampler.guidance_scale')}; zoom-in from the noised upsampled parent at "
              f"t = {num(s.zoom_start, 'recipe', 'sampler.zoom_start')} (ZoomLDM-style), coarse to fine (URCDM-style cascade).")
    if gen:
        lt = gen.get("layout_tiles") or []
        hm.append(f"- **Generation:** {num(gen.get('n_slides'), gsrc, 'summary.n_slides')} synthetic slides of "
                  + " × ".join(num(v, gsrc, ["summary", "layout_tiles", i]) for i, v in enumerate(lt))
                  + f" coarsest tiles of {num(gen.get('tile_px'), gsrc, 'summary.tile_px')} px; label shares taken from the "
                  f"{gen.get('label_source', '?')}; every tile checked by the audit's release filter.")
    hm.append("- **Real data used:** the training split of the recipe's slides (patient-disjoint from the "
              "audit's holdout). No real image is included here.")

    audit_txt = _audit_section(num, audit, "audit/report.json")
    utility = _utility_section(num, evaluate_report, evaluate_src)
    if not recipe.evaluate.publish:
        utility = ("Not published: `evaluate.publish` is false. The evaluation runs on real holdout patients, who "
                   "are not protected by ε, so its figures are kept out of this card"
                   + (" (they are in the run's `evaluate/report.json`)." if published_eval else "."))
    grids = "\n\n".join(f"`{n}`: a row per class (" + ", ".join(f"`{c}`" for c in classes) + f")\n\n![samples at {n}]({images['grids'][n]})"
                        for n in level_names if n in images.get("grids", {})) or "No sample grid was written."
    lim = ["- Synthetic tiles can carry the biases of the training slides (sites, scanners, stains, "
           "patient mix) and can miss rare morphology altogether.",
           "- Labels are the class the model was conditioned on; whether a tile really shows it is only as good "
           "as the model (see the utility section).",
           "- Stacks are cut from synthetic slides; tiles of one slide are correlated, so the train/test split is "
           "by slide.",
           "- The empirical audit tests near-copies and membership inference with specific feature spaces and "
           "attacks; passing it is evidence, not proof, of privacy."]
    lim[:0] = _chance_warning(num, evaluate_report, evaluate_src, classes)
    if ledger and ledger.get("enabled") and ledger.get("unit") == "tile":
        lim.append("- The privacy unit is one tile, not one patient: a patient contributes many tiles, so the "
                   "guarantee per patient is much weaker than the ε above.")
    if ledger and ledger.get("warnings"):
        lim.append("- The privacy ledger carries warnings (see above).")

    load_images = "\n".join(f'row["image_{n}"]                        # PIL image at {n}' for n in level_names)
    wds_images = "\n".join(f'    sample["{n}.png"]' for n in level_names)

    tpl = Template(TEMPLATE.read_text())
    text = tpl.substitute(
        yaml_header=yaml_header, override_banner=banner, pretty_name=pretty, summary=summary, license=recipe.export.license,
        structure="\n".join(st), load_images=load_images, wds_images=wds_images, how_made="\n".join(hm),
        privacy=dp_text, coverage=coverage, audit=audit_txt, utility=utility, grids=grids, limitations="\n".join(lim),
    )
    return text, num.records


def write_card(export_dir: Path, *, recipe, ingest_dir: Path, train_dir: Path, audit_dir: Path, generate_dir: Path,
               evaluate_report: Path | dict | None = None) -> Path:
    """Write ``<export_dir>/hf/README.md`` (and its images and ``card_provenance.json``);
    return the card path. Needs ``<export_dir>/export.json`` (written by the export stage).
    ``evaluate_report`` is a path to ``evaluate/report.json`` or the dict itself."""
    export_dir, hf_dir = Path(export_dir), Path(export_dir) / "hf"
    generate_dir = Path(generate_dir)
    if not TEMPLATE.is_file():
        raise StageError("the dataset card template is missing; looked in "
                         + ", ".join(str(c) for c in _TEMPLATE_CANDIDATES)
                         + " (it ships in the repository's cards/ folder)")
    info = _read_json(export_dir / "export.json", "the export summary")
    hf_dir.mkdir(parents=True, exist_ok=True)
    images: dict = {"grids": {}}
    (hf_dir / "contact_sheet.png").unlink(missing_ok=True)  # left by an older export: real patient tiles
    for name in _sample_grids(generate_dir, hf_dir, info["classes"], info["level_names"]):
        images["grids"][name[len("samples_"):-len(".png")]] = name
    ev, ev_src = None, "evaluate/report.json"
    if not recipe.evaluate.publish:  # holdout figures stay out of the released folder too
        (hf_dir / "evaluation.json").unlink(missing_ok=True)
    elif isinstance(evaluate_report, dict):
        # a view made by the caller: kept next to the card so its numbers have a file to cite
        ev, ev_src = evaluate_report, "hf/evaluation.json"
        write_json(hf_dir / "evaluation.json", ev)
    elif evaluate_report is not None:
        ev = _read_json(Path(evaluate_report), "the evaluation report")
    text, prov = render_card(recipe=recipe, train_dir=Path(train_dir), audit_dir=Path(audit_dir),
                             generate_dir=generate_dir, export_info=info, export_src="export/export.json",
                             evaluate_report=ev, evaluate_src=ev_src, images=images)
    write_json(hf_dir / "card_provenance.json", prov)
    card = hf_dir / "README.md"
    write_text(card, text)
    from .release import write_release_manifest

    write_release_manifest(export_dir, generate_dir)
    return card
