"""The card's "What ε covers" section: every way private data reached the release, and how
each is covered, generated from the run's own files (ledger, audit report, generate
summary, the recipe's ``evaluate`` settings).

Every number goes through the card's ``Numbers`` (``num(value, source, path)``) so it is
traced in ``card_provenance.json`` like every other number of the card.
"""

from __future__ import annotations

from typing import Any, Callable

LEDGER = "train/ledger.json"


def _label_row(num: Callable, ledger: dict | None, recipe) -> str:
    block = (ledger or {}).get("label_shares") or {}
    dp = bool(ledger and ledger.get("enabled"))
    if recipe.generate.label_proportions or block.get("source") == "public":
        return ("**public**: `generate.label_proportions` from the recipe, used as public knowledge (not computed "
                "from the training data); no ε is spent on them")
    if dp and block.get("source") == "dp":
        parts = (ledger.get("epsilon_alone") or {})
        alone = (f" (ε {num(parts['label_shares'], LEDGER, ['epsilon_alone', 'label_shares'])} on its own)"
                 if isinstance(parts.get("label_shares"), (int, float)) else "")
        return (f"**ε (composed)**: a Gaussian mechanism, noise σ = "
                f"{num(block['sigma'], LEDGER, ['label_shares', 'sigma'])} on the sum of per-{ledger.get('unit')} "
                f"label-share vectors bounded to unit L2 norm, from a "
                f"{num(block['budget_share'], LEDGER, ['label_shares', 'budget_share'])} share of the budget"
                f"{alone}; composed with training in one accountant, so the ε above includes it")
    if dp:
        return "**not covered**: the ledger records no DP label shares"
    return "**not DP**: the exact label counts of the training tiles (the model was trained without DP)"


def _weights_row(num: Callable, ledger: dict | None) -> str:
    if not (ledger and ledger.get("enabled")):
        return "**not covered**: trained without differential privacy"
    return (f"**ε**: DP-SGD (Opacus) at the {ledger.get('unit')} level, ε = "
            f"{num(ledger['epsilon'], LEDGER, ['epsilon'])}, δ = {num(ledger['delta'], LEDGER, ['delta'])} "
            f"(δ rule: `{ledger.get('delta_rule', '?')}`); every synthetic tile is drawn from these weights, which is "
            "post-processing")


def _init_row(num: Callable, init: dict) -> str:
    """How the public checkpoint the run started from (``train.init_from``) is covered."""
    priv = init.get("privacy") or {}
    who = (f"recipe `{init.get('recipe_name')}` (hash `{init.get('recipe_hash')}`), weights sha256 "
           f"`{init.get('weights_sha256')}`")
    if init.get("data_public"):
        how = ("**public by declaration, not covered by ε**: its recipe declares its training data public "
               "(`data.public: true`)")
    elif priv.get("enabled"):
        how = (f"**its own, separate DP guarantee, not this ε**: it was trained with DP at the {priv.get('unit')} "
               f"level, ε = {num(priv.get('epsilon'), LEDGER, ['init_from', 'privacy', 'epsilon'])}, δ = "
               f"{num(priv.get('delta'), LEDGER, ['init_from', 'privacy', 'delta'])}, on its own data")
    else:
        how = "**not covered**: neither declared public nor trained with DP (accepted only because this run is not DP)"
    lab = init.get("label_embedding") or {}
    if lab.get("adapted"):
        how += (f"; classes differed, so only the label embedding was adapted (mapped by name: "
                f"{', '.join(lab.get('mapped_by_name') or []) or 'none'}; re-initialised: "
                f"{', '.join(lab.get('reinitialised') or []) or 'none'})")
    return f"{how}; {who}"


def _declared_data(init: dict, dp: bool) -> str:
    """Which data the public checkpoint was trained on, from its provenance manifest."""
    data = (init.get("manifest") or {}).get("data") or {}
    slides = data.get("slides") or []
    if not slides:
        return ""
    parts = []
    for s in slides:
        cases = s.get("train_cases") or []
        parts.append(f"slide `{s.get('slide_id')}` (`{s.get('path')}`), regions `{s.get('geojson')}`"
                     + (f", cases {', '.join(cases)}" if cases else ""))
    return ("The public checkpoint's training data, declared public by its recipe `"
            f"{(init.get('manifest') or {}).get('recipe_file') or init.get('recipe_name')}`: " + "; ".join(parts)
            + "." + (" This run's own (private) regions, the recipe's `data` section, are what ε covers." if dp else ""))


def _evaluate_row(recipe, evaluated: bool) -> str:
    if not recipe.evaluate.enabled:
        return "nothing: `evaluate.enabled` is false"
    if not recipe.evaluate.publish:
        return ("**not published** (`evaluate.publish: false`): the TSTR/TRTR and fidelity figures are computed on "
                "the holdout patients, are not DP, and are kept out of this card")
    where = "in the Utility section below" if evaluated else "in the Utility section once `synthpath evaluate` runs"
    return ("**not DP; published** " + where + ": TSTR/TRTR accuracies and fidelity (FID, KID, precision/recall) "
            "are computed on real holdout patients, who are **not protected by ε** (they were never trained on, "
            "and no noise covers them); `evaluate.publish: false` keeps these figures out of the card")


def coverage_section(num: Callable, *, recipe, ledger: dict | None, audit: dict, gen: dict,
                     evaluated: bool) -> str:
    """Markdown of the section (without its heading)."""
    dp = bool(ledger and ledger.get("enabled"))
    lines = []
    if dp:
        lines.append(f"The ε above (ε = {num(ledger['epsilon'], LEDGER, ['epsilon'])}, "
                     f"δ = {num(ledger['delta'], LEDGER, ['delta'])}) is one total, from one accountant, of "
                     "everything private marked ε below; the rest reached this release outside it and is listed "
                     "so that nothing is left unstated.")
        if ledger.get("dp_randomness") == "test seed, not private":
            lines += ["", "**WARNING: this run's DP noise was seeded with an injected TEST seed. Anyone who knows "
                          "it can remove the noise: the ε above does NOT hold. Do not release it.**"]
        elif ledger.get("noise_source"):
            lines += ["", f"Noise and unit sampling: {ledger['noise_source']}. The seed is never written "
                          "anywhere; the generator states needed to resume were kept only in the train stage's "
                          "private `state/` folder and deleted when training finished."]
    else:
        lines.append("The model was trained without differential privacy: no ε covers anything below.")
    init = (ledger or {}).get("init_from")
    if init:
        lines += ["", f"Training started from the public checkpoint `{init.get('path')}` (`train.init_from`)."
                      + (" **ε covers the private fine-tuning data only**: not the data the initial checkpoint was "
                         "trained on, which reached these weights before DP-SGD started." if dp else "")]
        declared = _declared_data(init, dp)
        if declared:
            lines += ["", declared]
    audit_verdict = "passed" if audit.get("passed") else "FAILED"
    lines += ["", "| what reached the release | how it is covered |", "|---|---|",
              f"| model weights (every synthetic tile is sampled from them) | {_weights_row(num, ledger)} |",
              *([f"| initial weights (`train.init_from`) | {_init_row(num, init)} |"] if init else []),
              f"| label shares (the class mix of the synthetic slides; label source: "
              f"{gen.get('label_source', 'not generated yet')}) | {_label_row(num, ledger, recipe)} |",
              f"| audit statistics and verdict (**{audit_verdict}**) | **not DP; disclosed**: the near-copy "
              "fractions, distance thresholds and membership-inference AUC/TPR in the audit section are computed "
              "from training and holdout patients' real tiles; they reveal aggregate distances between synthetic, "
              "training and holdout tiles, how well the model tells members from non-members, and whether the "
              "release passed |",
              "| the release filter | **data-dependent resampling; disclosed**: every synthetic tile was kept only "
              "if it was not a near-copy of a training tile (threshold calibrated on holdout-to-train distances), "
              "else redrawn; which tiles were redrawn depends on the training tiles and is not covered by ε |",
              f"| evaluate's holdout figures | {_evaluate_row(recipe, evaluated)} |"]
    if dp and ledger.get("unit") == "tile":
        gp: dict[str, Any] = ledger.get("group_privacy") or {}
        if gp:
            k = num(gp["group_size"], LEDGER, ["group_privacy", "group_size"])
            r = num(gp["zoom"], LEDGER, ["group_privacy", "zoom"])
            lines += ["", f"**Tile level: one tile is not one unit.** A coarse tile is also the parent crop that "
                          f"conditions its r² children one level finer (zoom r = {r}), so one coarse tile's family "
                          f"(the tile and its children) touches a group of {k} units. Neighbouring datasets that differ in such a family are covered only "
                          f"through group privacy: ε = {num(gp['epsilon'], LEDGER, ['group_privacy', 'epsilon'])}, "
                          f"δ = {num(gp['delta'], LEDGER, ['group_privacy', 'delta'])} (`{gp.get('rule')}`)"
                          + ("." if gp.get("meaningful") else "; with this δ the group bound is **vacuous**: "
                             "no meaningful guarantee holds for a coarse tile's family.")]
    return "\n".join(lines)
