"""The release gate is bound to what the audit judged (issue 12): every stale-audit case
found by an attacker, through the command line (``synthpath.cli.main``, the code the
``synthpath`` script runs).

A tiny pipeline on the real demo slide is built once per session (conftest's ``tiny_release``:
ingest, train, a passing audit, generate with TIFF slides, export); each test works on its own copy. After each refused
command the release files (``generate/shards``, ``generate/slides``, ``export/hf``) are
byte-for-byte what they were, and no stage folder holds new release files. ``build``
re-audits first and then releases.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from synthpath.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from conftest import release_recipe_dict  # noqa: E402

BLOCKED = 3


def _write_recipe(out: Path) -> Path:
    # the verdict is not what these tests are about: the audit limits are ones the tiny model passes for sure
    raw = release_recipe_dict(out / "run")
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def released(tiny_release) -> Path:
    """The session's released run (built by ``synthpath build``); tests copy it."""
    return tiny_release


@pytest.fixture
def run(released, tmp_path) -> Path:
    """A private copy of the released run; returns its recipe path."""
    shutil.copytree(released / "run", tmp_path / "run")
    return _write_recipe(tmp_path)


def _release(out: Path) -> dict[str, str]:
    files = {}
    for folder in ("generate/shards", "generate/slides", "export/hf"):
        for p in sorted((out / folder).rglob("*")):
            if p.is_file():
                files[str(p.relative_to(out))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def _nothing_new(out: Path, before: dict) -> None:
    assert _release(out) == before
    for partial in ("generate.partial", "export.partial"):
        p = out / partial
        assert not p.exists() or not any(x.suffix in (".tar", ".tiff", ".parquet", ".md", ".png")
                                          for x in p.rglob("*")), f"{partial} holds release files"


def _refused(recipe: Path, capsys, *sets: str) -> str:
    """``synthpath generate`` and ``synthpath export`` both exit 3 and write nothing; returns
    their messages."""
    out = recipe.parent / "run"
    before = _release(out)
    args = [a for s in sets for a in ("--set", s)]
    errs = []
    for stage in ("generate", "export"):
        assert main([stage, str(recipe), *args]) == BLOCKED, f"`synthpath {stage}` released under a stale audit"
        err = capsys.readouterr().err
        assert "RELEASE BLOCKED" in err and "audit" in err
        errs.append(err)
    _nothing_new(out, before)
    return "\n".join(errs)


def test_fresh_release_is_bound(run):
    out = run.parent / "run"
    report = json.loads((out / "audit" / "report.json").read_text())
    flt = json.loads((out / "audit" / "filter" / "filter.json").read_text())
    assert report["passed"] is True
    b = report["binding"]
    assert flt["binding"] == b
    assert set(b["recipe"]) == {"model", "sampler", "audit", "generate_sampling", "allow_failed_audit"}
    assert len(b["weights_hash"]) == 16 and len(b["ingest_manifest"]) == 16
    # unchanged: generate and export are up to date and pass the gate
    assert main(["generate", str(run)]) == 0 and main(["export", str(run)]) == 0


def test_retrain_after_passing_audit(run, capsys):
    out = run.parent / "run"
    assert main(["train", str(run), "--set", "train.steps=6"]) == 0
    assert "retrained after the audit" in _refused(run, capsys, "train.steps=6")
    # build re-audits the new weights first, then releases
    old = json.loads((out / "audit" / "report.json").read_text())["binding"]["weights_hash"]
    assert main(["build", str(run), "--set", "train.steps=6"]) == 0
    new = json.loads((out / "audit" / "report.json").read_text())["binding"]["weights_hash"]
    assert new != old
    assert json.loads((out / "generate" / "audit_binding.json").read_text())["binding"]["weights_hash"] == new


def test_failed_reaudit_with_stricter_limits_invalidates_the_passing_one(run, capsys):
    out = run.parent / "run"
    assert main(["audit", str(run), "--set", "audit.max_closer_to_train=0.01"]) == BLOCKED
    assert "closer_to_train" in capsys.readouterr().err
    assert (out / "audit_failed" / "report.json").is_file()
    # the old passing audit/ is still on disk, and matches the original recipe: still refused
    assert json.loads((out / "audit" / "report.json").read_text())["passed"] is True
    assert "latest audit failed" in _refused(run, capsys)
    assert "latest audit failed" in _refused(run, capsys, "audit.max_closer_to_train=0.01")
    # build with the original recipe re-runs the audit (the failed one stands in its way)
    assert main(["build", str(run)]) == 0
    assert not (out / "audit_failed").exists() and not (out / "audit.partial").exists()


@pytest.mark.parametrize("change", ["sampler.guidance_scale=2.0", "audit.max_mia_auc=0.9",
                                    "audit.max_copy_fraction=0.5", "generate.layout_tiles=[2,2]",
                                    "export.allow_failed_audit=true"])
def test_changed_recipe_after_audit(run, capsys, change):
    section = {"sampler": "sampler section", "audit": "audit section", "generate": "generate's sampling keys",
               "export": "export.allow_failed_audit"}[change.split(".")[0]]
    err = _refused(run, capsys, change)
    assert section in err and "changed since the audit" in err


def test_crashed_audit_invalidates_the_passing_one(run, capsys, monkeypatch):
    import synthpath.audit.report as report

    def crash(*a, **k):
        raise RuntimeError("simulated crash in the middle of the audit")

    monkeypatch.setattr(report, "run_audit", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["audit", str(run), "--force"])
    monkeypatch.undo()
    out = run.parent / "run"
    assert (out / "audit.partial").is_dir() and (out / "audit" / "report.json").is_file()
    assert "did not finish" in _refused(run, capsys)


def test_tampered_report_or_filter_is_refused(run, capsys):
    out = run.parent / "run"
    rep = json.loads((out / "audit" / "report.json").read_text())
    rep.pop("binding")
    (out / "audit" / "report.json").write_text(json.dumps(rep))
    assert "recorded no binding" in _refused(run, capsys)
