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

The numbers and their provenance are :mod:`synthpath.export.card_numbers`; the sections and
sample grids, :mod:`synthpath.export.card_sections`. This module renders and writes the card.
"""

from __future__ import annotations

import sys
from pathlib import Path
from string import Template

import yaml

from ..atomic import write_json, write_text
from ..pipeline import StageError
from .card_numbers import MAX_LIST, Numbers, _read_json, safetensors_params  # noqa: F401  (re-exported)
from .card_sections import (  # noqa: F401  (GRID_COLS re-exported)
    GRID_COLS,
    _audit_section,
    _chance_warning,
    _features_yaml,
    _privacy_section,
    _sample_grids,
    _size_category,
    _utility_section,
)

# The template lives in the repository's cards/ folder (used as is by an editable install);
# a wheel install carries a copy under <prefix>/share/synthpath/cards (pyproject data-files).
_TEMPLATE_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "cards" / "dataset_card.md",
    Path(sys.prefix) / "share" / "synthpath" / "cards" / "dataset_card.md",
)
TEMPLATE = next((c for c in _TEMPLATE_CANDIDATES if c.is_file()), _TEMPLATE_CANDIDATES[0])


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
