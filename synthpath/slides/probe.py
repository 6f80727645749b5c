"""What ``synthpath validate`` checks about the slides, as ingest would, where it is cheap:
every slide opens with OpenSlide (headers only, no pixels of a whole-slide file are read),
has a resolution (from its metadata or the recipe), and a ``data.slide_dir`` glob matches
at least one file. Each problem names the recipe key to set."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..recipe import Recipe, _line_for, _line_index
from ..recipe_checks import safe_exists
from .mpp import MppError
from .reader import SlideOpenError, open_slide

#: Most files of a ``slide_dir`` opened by ``validate`` (the rest are left to ingest).
MAX_PROBED = 500


def _probe(path: Path, override: float | None, sid: str, key: str) -> list[tuple[str, str]]:
    try:
        with open_slide(path, override, slide_id=sid):
            return []
    except MppError as e:
        return [(key, str(e))]
    except (SlideOpenError, OSError) as e:
        return [(key, str(e))]


def slide_problems(recipe: Recipe, recipe_path: Path | str | None = None) -> list[tuple[str, int | None, str]]:
    """``[(key, line, message)]`` for every slide ingest would reject."""
    d = recipe.data
    out: list[tuple[str, str]] = []
    listed = set()
    for i, s in enumerate(d.slides):
        if not safe_exists(s.path, "file"):
            continue  # reported by load_recipe already
        listed.add(Path(s.path).resolve())
        sid = s.slide_id or Path(s.path).stem
        override = s.mpp if s.mpp is not None else d.mpp_overrides.get(sid)
        out += _probe(Path(s.path), override, sid, f"data.slides.{i}.path")
    if d.slide_dir is not None and safe_exists(d.slide_dir, "dir"):
        matches = sorted(p for p in Path(d.slide_dir).glob(d.slide_glob) if p.is_file())
        if not matches:
            present = Counter(p.suffix.lower() or "(no suffix)" for p in Path(d.slide_dir).iterdir() if p.is_file())
            seen = ", ".join(f"{n} {suf}" for suf, n in present.most_common(5)) or "no files at all"
            out.append(("data.slide_glob", f"{d.slide_glob!r} matches no file in data.slide_dir {d.slide_dir} "
                        f"(it holds {seen}); set data.slide_glob, e.g. '*.tiff'"))
        for p in matches[:MAX_PROBED]:
            if p.resolve() in listed:
                continue
            sid = p.stem
            out += _probe(p, d.mpp_overrides.get(sid), sid, "data.slide_dir")
    index = {}
    if recipe_path is not None:
        try:
            index = _line_index(Path(recipe_path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            index = {}

    def loc(key: str) -> tuple:
        return tuple(int(p) if p.isdigit() else p for p in key.split("."))

    return [(k, _line_for(index, loc(k)), m) for k, m in out]


__all__ = ["slide_problems", "MAX_PROBED"]
