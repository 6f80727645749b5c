"""The release gate, bound to exactly what the audit judged.

An audit's verdict says something only about the weights it sampled from, the recipe
sections that shaped its samples and limits, and the tiles it compared against. So the
audit records a *binding* in ``report.json`` and in ``filter/filter.json``:

- ``weights_hash``: content hash of ``train/model.safetensors``;
- ``recipe``: hashes of ``model``, ``sampler``, ``audit`` (feature spaces, limits, sizes),
  generate's sampling keys (:data:`GENERATE_SAMPLING_KEYS`) and ``export.allow_failed_audit``;
- ``ingest_manifest``: the manifest hash of the tile store it was calibrated on;
- ``allow_failed_audit``: whether the failed-audit override was in force for the audit.

:func:`require_release` (called by ``generate`` and ``export``, alone or through ``build``)
recomputes the binding from the current weights, recipe and tile store and refuses with
:class:`~synthpath.pipeline.ReleaseBlocked` unless the audit folder is complete, matches on
every field, and passed (or failed with the override in force both then and now). An audit
that was started and did not finish (``audit.partial/`` left by a crash or a failed gate)
or that failed (``audit_failed/``) invalidates any earlier passing audit.

``generate`` records the audit it was made under (:data:`GENERATE_BINDING`, the
``report.json`` digest); ``export`` refuses shards made under another audit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from synthpath.atomic import write_json
from synthpath.pipeline import MANIFEST, ReleaseBlocked, StageError, manifest_hash, read_manifest

#: generate's recipe keys that change what a sample looks like (slide layout and so the
#: seams, the label mix, how often a flagged tile is redrawn)
GENERATE_SAMPLING_KEYS = ("generate.layout_tiles", "generate.label_proportions", "generate.max_filter_retries")
#: recipe sections hashed into the binding, by the name the binding gives them
BOUND_SECTIONS = {
    "model": ("model",),
    "sampler": ("sampler",),
    "audit": ("audit",),
    "generate_sampling": GENERATE_SAMPLING_KEYS,
    "allow_failed_audit": ("export.allow_failed_audit",),
}
#: the file generate writes into its folder: the audit digest the shards were made under
GENERATE_BINDING = "audit_binding.json"
FAILED_DIR = "audit_failed"

_WHAT = {
    "weights_hash": "the trained weights (train/model.safetensors; retrained after the audit?)",
    "ingest_manifest": "the tile store (ingest/ was re-run after the audit)",
    "recipe.model": "the recipe's model section",
    "recipe.sampler": "the recipe's sampler section (steps, guidance_scale, zoom_start)",
    "recipe.audit": "the recipe's audit section (limits, feature spaces, sample sizes)",
    "recipe.generate_sampling": "generate's sampling keys (" + ", ".join(GENERATE_SAMPLING_KEYS) + ")",
    "recipe.allow_failed_audit": "export.allow_failed_audit",
}


def recipe_hashes(recipe) -> dict[str, str]:
    return {name: recipe.section_hash(*keys) for name, keys in BOUND_SECTIONS.items()}


def allow_failed(recipe, options: dict | None) -> bool:
    """The failed-audit override in force: ``--allow-failed-audit`` or ``export.allow_failed_audit``."""
    return bool((options or {}).get("allow_failed_audit")) or bool(recipe.export.allow_failed_audit)


def ingest_hash(ingest_dir: Path) -> str:
    m = read_manifest(Path(ingest_dir))
    if m is None:
        raise StageError(f"{Path(ingest_dir) / MANIFEST} is missing or unreadable, so the audit cannot be bound to the "
                         "tile store; run `synthpath ingest` (or `synthpath build`)")
    return manifest_hash(m)


def model_weights_hash(train_dir: Path) -> str:
    from synthpath.generate.runner import weights_hash  # lazy: runner imports this module

    weights = Path(train_dir) / "model.safetensors"
    if not weights.is_file():
        raise StageError(f"the trained model {weights} is missing; run `synthpath train` first")
    return weights_hash(weights)


def current_binding(recipe, train_dir: Path, ingest_dir: Path, options: dict | None = None) -> dict[str, Any]:
    """The binding an audit of the current weights, recipe and tile store would record."""
    return {
        "weights_hash": model_weights_hash(train_dir),
        "recipe": recipe_hashes(recipe),
        "ingest_manifest": ingest_hash(ingest_dir),
        "allow_failed_audit": allow_failed(recipe, options),
    }


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _mismatches(recorded: Any, current: dict) -> list[str]:
    if not isinstance(recorded, dict):
        return ["everything (the audit recorded no binding: it predates binding or its report was altered)"]
    out = []
    if recorded.get("weights_hash") != current["weights_hash"]:
        out.append(f"{_WHAT['weights_hash']}: audited {recorded.get('weights_hash')}, now {current['weights_hash']}")
    if recorded.get("ingest_manifest") != current["ingest_manifest"]:
        out.append(f"{_WHAT['ingest_manifest']}: audited {recorded.get('ingest_manifest')}, "
                   f"now {current['ingest_manifest']}")
    rec = recorded.get("recipe") if isinstance(recorded.get("recipe"), dict) else {}
    for name, h in current["recipe"].items():
        if rec.get(name) != h:
            out.append(f"{_WHAT['recipe.' + name]} changed since the audit")
    return out


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ReleaseBlocked(f"{what} {path} is missing; run `synthpath audit` (or `synthpath build`) first. "
                             "Nothing unaudited is released.")
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReleaseBlocked(f"{what} {path} cannot be read ({e}); re-run `synthpath audit`") from None
    if not isinstance(doc, dict):
        raise ReleaseBlocked(f"{what} {path} is not a JSON object; re-run `synthpath audit`")
    return doc


def check_audit(recipe, audit_dir: Path, train_dir: Path, ingest_dir: Path, options: dict | None = None) -> dict:
    """Raise :class:`ReleaseBlocked` unless ``audit_dir`` holds a finished audit of the
    current weights, recipe and tile store that passed (or failed with the override in
    force both at the audit and now). Returns ``{"passed", "overridden", "digest", "binding"}``."""
    audit_dir = Path(audit_dir)
    out = recipe.output_dir
    rerun = "Re-run `synthpath audit` (or `synthpath build`, which re-audits); nothing unaudited is released."
    if (out / FAILED_DIR).exists():
        raise ReleaseBlocked(f"the latest audit failed (its report is in {out / FAILED_DIR}/report.md), so the earlier "
                             f"audit in {audit_dir} no longer counts. {rerun}")
    if (out / "audit.partial").exists():
        raise ReleaseBlocked(f"an audit was started in {out / 'audit.partial'} and did not finish (it crashed or was "
                             f"interrupted), so the earlier audit in {audit_dir} no longer counts. {rerun}")
    if read_manifest(audit_dir) is None:
        raise ReleaseBlocked(f"{audit_dir} is not a finished audit (no {MANIFEST}). {rerun}")
    report = _read_json(audit_dir / "report.json", "the audit report")
    if not isinstance(report.get("passed"), bool):
        raise ReleaseBlocked(f"the audit report {audit_dir / 'report.json'} has no boolean 'passed' key. {rerun}")
    current = current_binding(recipe, train_dir, ingest_dir, options)
    bad = _mismatches(report.get("binding"), current)
    if bad:
        raise ReleaseBlocked(f"the audit in {audit_dir} does not cover what would be released: "
                             + "; ".join(bad) + f". {rerun}")
    flt = _read_json(audit_dir / "filter" / "filter.json", "the release filter")
    if flt.get("binding") != report["binding"]:
        raise ReleaseBlocked(f"the release filter {audit_dir / 'filter' / 'filter.json'} was not made by the audit in "
                             f"{audit_dir / 'report.json'} (their bindings differ). {rerun}")
    passed = report["passed"]
    overridden = False
    if not passed:
        failed = report.get("failed_checks") or [k for k, v in (report.get("checks") or {}).items()
                                                 if isinstance(v, dict) and v.get("passed") is False]
        if not (current["allow_failed_audit"] and report.get("allowed_failed") is True):
            raise ReleaseBlocked(
                f"the audit in {audit_dir / 'report.json'} failed (checks: {', '.join(failed) or 'see report.md'}); "
                "nothing is released. Fix the model (more privacy, more data) or audit and release with "
                "--allow-failed-audit (the dataset card then says so first)")
        overridden = True
    return {"passed": passed, "overridden": overridden, "digest": file_digest(audit_dir / "report.json"),
            "binding": report["binding"]}


def require_release(ctx) -> tuple[bool, bool]:
    """The gate of ``generate`` and ``export``: (audit passed, override used); raises
    :class:`ReleaseBlocked` otherwise. In ``generate`` it records the audit digest in
    ``<workdir>/audit_binding.json``; in ``export`` it also checks that the shards were made
    under this very audit."""
    inputs = ctx.inputs
    res = check_audit(ctx.recipe, inputs["audit"], inputs["train"], inputs["ingest"], ctx.options)
    if ctx.name == "generate":
        write_json(Path(ctx.workdir) / GENERATE_BINDING, {"audit_digest": res["digest"], "binding": res["binding"]})
    elif "generate" in inputs:
        check_generate(Path(inputs["generate"]), res["digest"])
    return res["passed"], res["overridden"]


def check_generate(generate_dir: Path, audit_digest: str) -> None:
    """Refuse shards that were not made under the audit whose report has ``audit_digest``."""
    gen = Path(generate_dir) / GENERATE_BINDING
    doc = _read_json(gen, "the generate stage's audit binding") if gen.is_file() else None
    if doc is None or doc.get("audit_digest") != audit_digest:
        raise ReleaseBlocked(f"the shards in {generate_dir} were not made under the current audit; re-run "
                             "`synthpath generate` (or `synthpath build`)")


def precheck(recipe, stage: str, options: dict) -> bool:
    """The pipeline's check before it skips an up-to-date stage. ``audit``: re-run it when
    a later audit crashed or failed (its ``audit.partial/`` or ``audit_failed/`` is there).
    ``generate`` / ``export``: the release gate, so an output made under an audit that no
    longer holds is never reported as done."""
    out = recipe.output_dir
    if stage == "audit":
        return (out / "audit.partial").exists() or (out / FAILED_DIR).exists()
    res = check_audit(recipe, out / "audit", out / "train", out / "ingest", options)
    if stage == "export":
        check_generate(out / "generate", res["digest"])
    return False
