"""What the release is, file by file: ``export/hf/release_manifest.json``.

The release is the Hugging Face folder (``export/hf``), the WebDataset shards
(``generate/shards``) and the synthetic slide TIFFs (``generate/slides``), card images
included. Every file there is listed with its kind, size and sha256. A kind is one of

- ``synthetic image``: Parquet rows, shard tars, TIFF slides, the card's sample grids: pixels
  drawn by the model and passed by the release filter, never a real tile, crop, thumbnail
  or mask;
- ``statistic``: JSON numbers (card provenance, shard index, evaluation);
- ``text``: the dataset card.

Anything else fails the export (fail closed), and so does a file known to hold real
pixels (the audit's contact sheet, training sample grids, evaluation pictures). Those live
in ``audit/``, ``train/``, ``evaluate/`` and ``ingest/``, which the manifest names as
*not released*.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from synthpath.atomic import sha256_file, write_json
from synthpath.pipeline import StageError

RELEASE_MANIFEST = "release_manifest.json"
KINDS = {
    ".parquet": "synthetic image", ".tar": "synthetic image", ".tiff": "synthetic image", ".tif": "synthetic image",
    ".png": "synthetic image", ".json": "statistic", ".md": "text",
}
#: names of files that hold real patient pixels; never in a release folder
REAL_PIXEL_FILES = ("contact_sheet", "real_vs_synthetic", "step_0", "thumbnail", "mask")
NOT_RELEASED = {
    "ingest/": "the real tile store (patient tiles, thumbnails, masks)",
    "train/": "weights, ledger and training sample grids (their first cells are real parent crops)",
    "audit/": "the audit report, release filter (training features) and contact sheet (real training tiles)",
    "audit_failed/": "a failed audit's report and contact sheet (real training tiles)",
    "evaluate/": "evaluation pictures that show real tiles beside synthetic ones",
}


def release_folders(export_dir: Path, generate_dir: Path) -> dict[str, Path]:
    """Logical release folder name -> its path on disk (only those that exist)."""
    out = {"export/hf": Path(export_dir) / "hf", "generate/shards": Path(generate_dir) / "shards",
           "generate/slides": Path(generate_dir) / "slides"}
    return {k: v for k, v in out.items() if v.is_dir()}


def release_files(export_dir: Path, generate_dir: Path) -> list[tuple[str, Path]]:
    """(released name, path) of every file in the release, in a stable order."""
    out = []
    for name, folder in release_folders(export_dir, generate_dir).items():
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.name != RELEASE_MANIFEST:
                out.append((f"{name}/{p.relative_to(folder).as_posix()}", p))
    return out


def classify(name: str) -> str:
    """The kind of a released file; a file the release must not hold is an error."""
    base = name.rsplit("/", 1)[-1].lower()
    if any(tag in base for tag in REAL_PIXEL_FILES):
        raise StageError(f"the release holds {name}, a kind of file that shows real patient pixels; remove it (it "
                         "belongs in audit/, train/ or evaluate/, which are never released)")
    if ".tmp" in base or base.startswith("."):
        raise StageError(f"the release holds a temporary file {name}; re-run the stage that wrote it")
    suffix = "." + base.rsplit(".", 1)[-1] if "." in base else ""
    if suffix not in KINDS:
        raise StageError(f"the release holds {name}, whose kind is unknown (not a synthetic image, statistic or "
                         "text); nothing unclassified is released")
    return KINDS[suffix]


def write_release_manifest(export_dir: Path, generate_dir: Path) -> Path:
    """Write ``<export_dir>/hf/release_manifest.json`` listing every released file."""
    entries = [{"file": name, "kind": classify(name), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
               for name, p in release_files(export_dir, generate_dir)]
    doc = {
        "about": "every file of this synthetic dataset release; none holds a real patient pixel",
        "folders": list(release_folders(export_dir, generate_dir)),
        "files": entries,
        "counts": {k: sum(1 for e in entries if e["kind"] == k) for k in sorted(set(KINDS.values()))},
        "not_released": NOT_RELEASED,
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    path = Path(export_dir) / "hf" / RELEASE_MANIFEST
    write_json(path, doc)
    return path
