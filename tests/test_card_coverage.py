"""The card's "What ε covers" section (issue 13): generated from the run, it lists every way
private data reached the release, follows the ledger (DP label shares composed, public
proportions, tile-level group privacy, a test seed), and changes with ``evaluate.publish``.

The run folders are built with tests/test_export.py's helpers (the release writers on seeded
random pyramids), so the card is rendered by the real export code."""

from __future__ import annotations

import json

import pytest
from test_export import CLASSES, _NUM, _prose, _resolve, build_run, ctx_for  # noqa: F401

from synthpath.export import hf as hfmod
from synthpath.export.card import write_card

ROWS = ("| model weights", "| label shares", "| audit statistics and verdict", "| the release filter",
        "| evaluate's holdout figures")

EVALUATION = {"tstr": {"accuracy": 0.8125}, "trtr": {"accuracy": 0.9042},
              "headline": {"20x": {"tstr_balanced_accuracy": 0.7372, "tstr_balanced_accuracy_ci95": [0.7, 0.77]}}}


def _dp_ledger(unit="patient", randomness="secret: seeded from OS entropy (secrets), never saved or released"):
    led = {"enabled": True, "epsilon": 7.9634, "delta": 0.00125, "unit": unit, "n_units": 8, "accountant": "rdp",
           "sigma": 1.31, "sample_rate": 0.25, "steps": 40, "delta_rule": "auto: 1/(10 n_patients)",
           "history": [[1.31, 0.25, 40]], "composed_history": [[9.87, 1.0, 1], [1.31, 0.25, 40]],
           "epsilon_alone": {"training": 7.42, "label_shares": 0.3981},
           "label_shares": {"source": "dp", "sigma": 9.87, "noise_std": 9.87, "budget_share": 0.05,
                            "sensitivity_l2": 1.0, "history": [[9.87, 1.0, 1]], "noisy_sums": [3.2, 1.1, 0.4],
                            "shares": [0.6667, 0.2292, 0.1042]},
           "dp_randomness": randomness, "noise_source": "DP noise and unit sampling come from a torch PRNG seeded "
           "secretly from OS entropy; it is not a cryptographically secure generator and is not hardened against "
           "floating-point attacks on the Gaussian sampler", "warnings": []}
    if unit == "tile":
        led["group_privacy"] = {"group_size": 5, "zoom": 2, "epsilon": 39.817, "delta": 3.5e40,
                                "rule": "(k epsilon, k e^((k-1) epsilon) delta)", "meaningful": False}
    return led


def _render(tmp_path, ledger, *, proportions=False, publish=True, evaluation=EVALUATION):
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe, dirs = build_run(tmp_path, dp=True)  # the plan needs proportions to build the shards
    (dirs["train"] / "ledger.json").write_text(json.dumps(ledger))
    ctx = ctx_for(recipe, dirs, tmp_path)
    hfmod.run(ctx)
    r = recipe.model_copy(deep=True)
    if not proportions:
        r.generate.label_proportions = None
    r.evaluate.publish = publish
    card = write_card(ctx.workdir, recipe=r, ingest_dir=dirs["ingest"], train_dir=dirs["train"],
                      audit_dir=dirs["audit"], generate_dir=dirs["generate"], evaluate_report=evaluation)
    text = card.read_text()
    section = text.split("#### What ε covers", 1)[1].split("\n### ", 1)[0]
    return text, section, ctx.workdir


def _numbers_traced(text, hf_dir):
    prov = json.loads((hf_dir / "card_provenance.json").read_text())
    known = {r["text"] for r in prov}
    ledger_recs = [r for r in prov if r["source"] == "train/ledger.json"]
    return known, ledger_recs, [m for m in _NUM.findall(_prose(text)) if m not in known]


def test_section_lists_every_item_with_composed_label_shares(tmp_path):
    text, sec, export_dir = _render(tmp_path, _dp_ledger())
    for row in ROWS:
        assert sec.count(row) == 1, row
    assert "one total, from one accountant" in sec and "ε = 7.963" in sec
    label = next(line for line in sec.splitlines() if line.startswith("| label shares"))
    assert "**ε (composed)**" in label and "σ = 9.87" in label and "0.05" in label and "ε 0.3981 on its own" in label
    audit = next(line for line in sec.splitlines() if line.startswith("| audit statistics"))
    assert "not DP; disclosed" in audit and "(**passed**)" in audit
    assert "data-dependent resampling; disclosed" in sec
    ev = next(line for line in sec.splitlines() if line.startswith("| evaluate's holdout figures"))
    assert "not DP; published" in ev and "not protected by ε" in ev and "evaluate.publish: false" in ev
    assert "not hardened against floating-point attacks" in sec  # the PRNG is named as such
    assert "Tile level" not in sec
    # every number in the section is traced to its file, like the rest of the card
    known, ledger_recs, stray = _numbers_traced(text, export_dir / "hf")
    assert not stray, stray
    assert {tuple(r["path"]) for r in ledger_recs} >= {("epsilon",), ("label_shares", "sigma"),
                                                       ("label_shares", "budget_share"), ("epsilon_alone", "label_shares")}


def test_section_changes_with_evaluate_publish(tmp_path):
    shown, sec_on, _ = _render(tmp_path / "on", _dp_ledger(), publish=True)
    hidden, sec_off, export_dir = _render(tmp_path / "off", _dp_ledger(), publish=False)
    assert sec_on != sec_off
    ev_off = next(line for line in sec_off.splitlines() if line.startswith("| evaluate's holdout figures"))
    assert "**not published** (`evaluate.publish: false`)" in ev_off
    # the holdout figures are in the card only when published, and their file is not released
    assert "0.8125" in shown and "0.9042" in shown
    assert "0.8125" not in hidden and "0.9042" not in hidden and "0.7372" not in hidden
    utility = hidden.split("## Utility and Fidelity", 1)[1].split("\n## ", 1)[0]
    assert "Not published: `evaluate.publish` is false" in utility
    assert not (export_dir / "hf" / "evaluation.json").exists()


def test_public_proportions_tile_group_and_test_seed(tmp_path):
    led = _dp_ledger(unit="tile", randomness="test seed, not private")
    led["label_shares"] = {"source": "public", "key": "generate.label_proportions"}
    led["composed_history"] = led["history"]
    led["epsilon_alone"] = {"training": 7.9634}
    text, sec, export_dir = _render(tmp_path, led, proportions=True)
    label = next(line for line in sec.splitlines() if line.startswith("| label shares"))
    assert "**public**" in label and "no ε is spent" in label
    assert "one tile is not one unit" in sec and "a group of 5 units" in sec and "ε = 39.82" in sec
    assert "**vacuous**" in sec
    assert "injected TEST seed" in sec and "does NOT hold" in sec
    assert not _numbers_traced(text, export_dir / "hf")[2]


def test_section_without_dp_says_nothing_is_covered(tmp_path):
    text, sec, _ = _render(tmp_path, {"enabled": False, "warnings": []})
    assert "no ε covers anything below" in sec
    for row in ROWS:
        assert row in sec
    assert "**not covered**: trained without differential privacy" in sec
    assert "**not DP**: the exact label counts" in sec
