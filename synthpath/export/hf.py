"""The ``export`` stage: a Hugging Face dataset (Parquet) and its dataset card.

Layout of ``export/``::

    hf/README.md                         dataset card (YAML header + body), see card.py
    hf/data/train-00000-of-0000N.parquet config "default": one row per multi-magnification stack
    hf/data/test-00000-of-0000M.parquet  (split by synthetic slide, export.test_fraction)
    hf/tiles_<level>/train-....parquet   config "tiles_<level>": one row per distinct tile at
    hf/tiles_<level>/test-....parquet    that level, with the keys of the stacks it belongs to
    hf/*.png                             contact sheet and sample grids shown in the card
    webdataset/shard-*.tar, index.json   the WebDataset shards (export.webdataset), hard links
                                         to (or copies of) generate/shards, sha256-checked

How rows relate. Stacks of one slide share their coarser tiles: two stacks under the same
coarsest tile repeat its image in ``image_<coarsest>``. A user training on one level should
take that level's ``tiles_<level>`` config, whose rows are distinct images (each with
``stack_keys``, the stacks that contain it); the finest level's tiles are distinct in the
default config too.

Rows are read from the generate stage's WebDataset shards (each shard's sha256 checked
against its done-marker first), so the HF dataset and the shards hold the same samples.
Parquet files carry the ``datasets`` feature metadata in their schema: one ``Image``
column per level (``image_<level>``), ``label`` as ``ClassLabel(names=classes)`` and the
metadata columns, so ``datasets.load_dataset(str(hf_dir))`` works offline.

The export refuses (:class:`ReleaseBlocked`) when ``audit/report.json`` says the audit
failed, unless ``--allow-failed-audit`` / ``export.allow_failed_audit`` is given; the card
then says so in bold in its first lines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ..pipeline import StageContext, StageError
from ..generate.plan import holdout_slide_ids
from ..audit.gate import require_release
from ..generate.writers import sha256_file

log = logging.getLogger("synthpath.export")

#: rows per Parquet file (a few hundred MB at 256 px and three levels)
ROWS_PER_FILE = 2000
ROW_GROUP = 256


def read_generate_index(generate_dir: Path) -> tuple[dict, dict]:
    """(plan.json, shards/index.json) of a finished generate stage, with clear errors."""
    out = []
    for rel in ("plan.json", "shards/index.json"):
        p = Path(generate_dir) / rel
        if not p.is_file():
            raise StageError(f"{p} is missing; run `synthpath generate` first")
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise StageError(f"{p} cannot be read: {e}") from None
    return out[0], out[1]


def iter_shard_samples(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) for each sample of a shard, in member order."""
    key, cur = None, {}
    with tarfile.open(tar_path, "r") as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            k, _, suffix = base.partition(".")
            data = tar.extractfile(m).read()
            if k != key:
                if key is not None:
                    yield key, cur
                key, cur = k, {}
            cur[suffix] = data
    if key is not None:
        yield key, cur


def verified_shards(generate_dir: Path) -> list[Path]:
    """The shard tars listed in ``shards/index.json``, each checked against its sha256."""
    _, index = read_generate_index(generate_dir)
    paths = []
    for entry in index["shards"]:
        p = Path(generate_dir) / "shards" / entry["file"]
        if not p.is_file():
            raise StageError(f"shard {p} listed in shards/index.json is missing")
        if sha256_file(p) != entry["sha256"]:
            raise StageError(f"shard {p} does not match its sha256 in shards/index.json (modified or corrupt)")
        paths.append(p)
    return paths


def hf_features(classes: list[str], level_names: list[str]):
    """The ``datasets.Features`` of the exported dataset."""
    import datasets

    cols = {f"image_{n}": datasets.Image() for n in level_names}
    cols["label"] = datasets.ClassLabel(names=list(classes))
    cols["key"] = datasets.Value("string")
    cols["slide_id"] = datasets.Value("string")
    cols["sample_index"] = datasets.Value("int64")
    cols["seed"] = datasets.Value("int64")
    cols["slide_seed"] = datasets.Value("int64")
    cols["attempt"] = datasets.Value("int32")
    for n in level_names:
        cols[f"mpp_{n}"] = datasets.Value("float64")
        cols[f"x_{n}"] = datasets.Value("int64")
        cols[f"y_{n}"] = datasets.Value("int64")
    cols["tile_px"] = datasets.Value("int32")
    cols["model_hash"] = datasets.Value("string")
    return datasets.Features(cols)


def sample_row(key: str, parts: dict[str, bytes], classes: list[str], level_names: list[str], where: str) -> dict:
    """One Parquet row from a shard sample; checks the label (index in range, name matches)."""
    for need in ["cls", "json", *(f"{n}.png" for n in level_names)]:
        if need not in parts:
            raise StageError(f"{where}: sample {key!r} has no {need!r} member")
    try:
        label = int(parts["cls"].decode("ascii").strip())
    except ValueError:
        raise StageError(f"{where}: sample {key!r} has a non-integer label {parts['cls']!r}") from None
    if not 0 <= label < len(classes):
        raise StageError(f"{where}: sample {key!r} has label {label}, out of range for the {len(classes)} classes {classes}")
    meta = json.loads(parts["json"])
    if meta.get("label_name") != classes[label]:
        raise StageError(f"{where}: sample {key!r} has label {label} ({classes[label]!r}) but its JSON says "
                         f"label_name {meta.get('label_name')!r}")
    pos = {p["level"]: p for p in meta["position"]}
    mpp = {lv["name"]: lv["mpp"] for lv in meta["levels"]}
    row = {f"image_{n}": {"bytes": parts[f"{n}.png"], "path": None} for n in level_names}
    row.update(label=label, key=key, slide_id=meta["slide_id"], sample_index=meta["sample_index"], seed=meta["seed"],
               slide_seed=meta["slide_seed"], attempt=meta.get("attempt", 0), tile_px=meta["tile_px"],
               model_hash=meta["model_hash"])
    for n in level_names:
        row[f"mpp_{n}"] = mpp[n]
        row[f"x_{n}"] = pos[n]["x"]
        row[f"y_{n}"] = pos[n]["y"]
    return row


class _SplitWriter:
    """Streams rows of one split into ``data/<split>-<i:05d>-of-<n:05d>.parquet`` files of
    at most ``ROWS_PER_FILE`` rows (the total is known from the plan, so names are final
    from the start); each file is written to a temp name and renamed when closed."""

    def __init__(self, out_dir: Path, split: str, total: int, features):
        self.out_dir, self.split, self.total = out_dir, split, total
        self.schema = features.arrow_schema
        self.n_files = max(1, math.ceil(total / ROWS_PER_FILE))
        self.files: list[str] = []
        self.rows = 0
        self._buf: list[dict] = []
        self._writer = None
        self._tmp = None

    def _open(self) -> None:
        name = f"{self.split}-{len(self.files):05d}-of-{self.n_files:05d}.parquet"
        self.files.append(name)
        self._tmp = self.out_dir / f".{name}.tmp{os.getpid()}"
        self._writer = pq.ParquetWriter(self._tmp, self.schema)

    def _flush(self) -> None:
        if self._buf:
            self._writer.write_table(pa.Table.from_pylist(self._buf, schema=self.schema), row_group_size=ROW_GROUP)
            self._buf = []

    def _close_file(self) -> None:
        self._flush()
        self._writer.close()
        os.replace(self._tmp, self.out_dir / self.files[-1])
        self._writer = None

    def add(self, row: dict) -> None:
        if self._writer is None:
            self._open()
        self._buf.append(row)
        self.rows += 1
        if len(self._buf) >= ROW_GROUP:
            self._flush()
        if self.rows % ROWS_PER_FILE == 0:
            self._close_file()

    def close(self) -> None:
        if self._writer is not None:
            self._close_file()
        if self.rows != self.total:
            raise StageError(f"split {self.split!r}: wrote {self.rows} rows, the plan has {self.total}")

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._tmp.unlink(missing_ok=True)


@contextmanager
def _all_or_nothing(writers: Iterable[_SplitWriter]):
    """Close every writer (final names) when the block succeeds; abort them all (no file
    left behind) when it raises, interrupts included."""
    ws = list(writers)
    try:
        yield
        for w in ws:
            w.close()
    except BaseException:
        for w in ws:
            w.abort()
        raise


def export_hf(generate_dir: Path, hf_dir: Path, *, classes: list[str], test_fraction: float) -> dict:
    """Stream the shards into the Parquet dataset; returns per-split counts and files."""
    plan, _ = read_generate_index(generate_dir)
    if list(plan["classes"]) != list(classes):
        raise StageError(f"{Path(generate_dir) / 'plan.json'}: classes {plan['classes']} differ from the recipe's {classes}")
    level_names = list(plan["level_names"])
    test_ids = holdout_slide_ids(plan["slides"], len(classes), test_fraction)
    split_of = {s["key"]: ("test" if s["slide_id"] in test_ids else "train") for s in plan["samples"]}
    totals = {sp: sum(1 for v in split_of.values() if v == sp) for sp in ("train", "test")}
    features = hf_features(classes, level_names)
    data = Path(hf_dir) / "data"
    data.mkdir(parents=True, exist_ok=True)
    for old in data.glob("*.parquet"):
        old.unlink()
    writers = {sp: _SplitWriter(data, sp, n, features) for sp, n in totals.items() if n}
    slides: dict[str, set] = {sp: set() for sp in writers}
    seen: set[str] = set()
    with _all_or_nothing(writers.values()):
        for tar_path in verified_shards(generate_dir):
            for key, parts in iter_shard_samples(tar_path):
                if key in seen:
                    raise StageError(f"{tar_path}: sample {key!r} appears twice in the shards")
                if key not in split_of:
                    raise StageError(f"{tar_path}: sample {key!r} is not in the plan")
                seen.add(key)
                row = sample_row(key, parts, classes, level_names, str(tar_path))
                writers[split_of[key]].add(row)
                slides[split_of[key]].add(row["slide_id"])
        missing = sorted(set(split_of) - seen)
        if missing:
            raise StageError(f"the shards in {generate_dir} lack {len(missing)} planned samples, e.g. {missing[:5]}")
    out = {"splits": {}, "level_names": level_names, "classes": list(classes)}
    for sp, w in writers.items():
        out["splits"][sp] = {
            "num_examples": w.rows,
            "files": [f"data/{f}" for f in w.files],
            "num_bytes": sum((data / f).stat().st_size for f in w.files),
            "slides": sorted(slides[sp]),
        }
    return out


def tile_features(classes: list[str]):
    """The ``datasets.Features`` of a ``tiles_<level>`` config (one distinct tile a row)."""
    import datasets

    return datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=list(classes)),
        "tile_key": datasets.Value("string"),
        "slide_id": datasets.Value("string"),
        "level": datasets.Value("string"),
        "mpp": datasets.Value("float64"),
        "x": datasets.Value("int64"),
        "y": datasets.Value("int64"),
        "tile_px": datasets.Value("int32"),
        "stack_keys": datasets.Sequence(datasets.Value("string")),
        "model_hash": datasets.Value("string"),
    })


def _tile_key(slide_id: str, level: str, x: int, y: int) -> str:
    return f"{slide_id}_{level}_x{x}_y{y}"


def export_level_tiles(generate_dir: Path, hf_dir: Path, *, classes: list[str], test_fraction: float) -> dict:
    """Write one ``tiles_<level>`` config per level: each distinct tile of that level once
    (stacks sharing a tile list it in ``stack_keys``). Samples of a slide are contiguous
    in the shards (slide-major order), so one slide at a time is held in memory."""
    plan, _ = read_generate_index(generate_dir)
    level_names = list(plan["level_names"])
    test_ids = holdout_slide_ids(plan["slides"], len(classes), test_fraction)
    split_of_slide = {s["slide_id"]: ("test" if s["slide_id"] in test_ids else "train") for s in plan["slides"]}
    distinct: dict[str, dict[str, set]] = {n: {"train": set(), "test": set()} for n in level_names}
    for s in plan["samples"]:
        for p in s["position"]:
            distinct[p["name"]][split_of_slide[s["slide_id"]]].add(_tile_key(s["slide_id"], p["name"], p["x"], p["y"]))
    features = tile_features(classes)
    writers: dict[tuple[str, str], _SplitWriter] = {}
    for n in level_names:
        d = Path(hf_dir) / f"tiles_{n}"
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.parquet"):
            old.unlink()
        for sp, keys in distinct[n].items():
            if keys:
                writers[(n, sp)] = _SplitWriter(d, sp, len(keys), features)

    def flush(rows: dict[str, dict], split: str) -> None:
        for key in sorted(rows, key=lambda k: (level_names.index(rows[k]["level"]), rows[k]["y"], rows[k]["x"])):
            writers[(rows[key]["level"], split)].add(rows[key])

    cur_slide, rows = None, {}
    with _all_or_nothing(writers.values()):
        for tar_path in verified_shards(generate_dir):
            for key, parts in iter_shard_samples(tar_path):
                row = sample_row(key, parts, classes, level_names, str(tar_path))
                if row["slide_id"] != cur_slide:
                    if cur_slide is not None:
                        flush(rows, split_of_slide[cur_slide])
                    cur_slide, rows = row["slide_id"], {}
                for n in level_names:
                    tk = _tile_key(row["slide_id"], n, row[f"x_{n}"], row[f"y_{n}"])
                    if tk not in rows:
                        rows[tk] = {"image": row[f"image_{n}"], "label": row["label"], "tile_key": tk,
                                    "slide_id": row["slide_id"], "level": n, "mpp": row[f"mpp_{n}"],
                                    "x": row[f"x_{n}"], "y": row[f"y_{n}"], "tile_px": row["tile_px"],
                                    "stack_keys": [], "model_hash": row["model_hash"]}
                    rows[tk]["stack_keys"].append(key)
        if cur_slide is not None:
            flush(rows, split_of_slide[cur_slide])
    return {n: {"config": f"tiles_{n}", "dir": f"tiles_{n}",
                "splits": {sp: {"num_examples": w.rows, "files": [f"tiles_{n}/{f}" for f in w.files],
                                "num_bytes": sum((Path(hf_dir) / f"tiles_{n}" / f).stat().st_size for f in w.files)}
                           for (lv, sp), w in writers.items() if lv == n}}
            for n in level_names}


def export_webdataset(generate_dir: Path, out_dir: Path) -> dict:
    """The release's WebDataset: the verified shards and their index, hard-linked from
    ``generate/shards`` (copied where the file system cannot link)."""
    import shutil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for src in [*verified_shards(generate_dir), Path(generate_dir) / "shards" / "index.json"]:
        dst = out_dir / src.name
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            tmp = out_dir / f"{src.name}.tmp{os.getpid()}"
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        files.append(dst.name)
    return {"dir": out_dir.name, "files": files}


def run(ctx: StageContext) -> dict:
    """Stage entry: check the audit gate, write ``hf/`` and its card."""
    from .card import write_card

    recipe = ctx.recipe
    passed, overridden = require_release(ctx)
    wds_info = export_webdataset(ctx.inputs["generate"], ctx.workdir / "webdataset") if recipe.export.webdataset else None
    if not recipe.export.hf:
        log.info("export.hf is false: no Hugging Face dataset is written")
        return {"hf_dir": None, "webdataset": wds_info, "audit_passed": passed, "audit_overridden": overridden}
    hf_dir = ctx.workdir / "hf"
    info = export_hf(ctx.inputs["generate"], hf_dir, classes=list(recipe.data.classes),
                     test_fraction=recipe.export.test_fraction)
    info["tile_configs"] = export_level_tiles(ctx.inputs["generate"], hf_dir, classes=list(recipe.data.classes),
                                              test_fraction=recipe.export.test_fraction)
    info["webdataset"] = wds_info
    (ctx.workdir / "export.json").write_text(json.dumps(
        {**info, "audit_passed": passed, "audit_overridden": overridden}, indent=2, sort_keys=True))
    card = write_card(ctx.workdir, recipe=recipe, ingest_dir=ctx.inputs["ingest"], train_dir=ctx.inputs["train"],
                      audit_dir=ctx.inputs["audit"], generate_dir=ctx.inputs["generate"])
    return {
        "hf_dir": str(hf_dir),
        "splits": {k: v["num_examples"] for k, v in info["splits"].items()},
        "tile_configs": {n: {sp: v["num_examples"] for sp, v in c["splits"].items()}
                         for n, c in info["tile_configs"].items()},
        "webdataset": wds_info,
        "levels": info["level_names"],
        "classes": info["classes"],
        "card": str(card),
        "audit_passed": passed,
        "audit_overridden": overridden,
    }
