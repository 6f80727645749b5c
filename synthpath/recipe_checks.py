"""Checks on a recipe that the pydantic schema alone does not make.

- Reading the text and YAML safely, and ``--set``: :mod:`synthpath.recipe_yaml`
  (re-exported here).
- :func:`bool_problems`, :func:`raw_path_problems`: checks on the raw mapping before validation: booleans where a
  number is expected (``train.steps: true`` would become 1), and unusable paths (empty,
  NUL bytes, ``~user`` that does not exist, too long for the OS).
- :func:`value_problems`: checks on the validated recipe: numeric ranges, seeds, devices,
  classifier names, empty lists, tile sizes the UNet and the level nesting can use, and
  contradictions between sections.

Each check returns ``[(key path tuple, message)]``; :mod:`synthpath.recipe` turns them into
one :class:`~synthpath.recipe.RecipeError` with YAML lines.
"""

from __future__ import annotations

import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

# Re-exported: synthpath.recipe reaches the YAML reader through this module.
from .recipe_yaml import MAX_BYTES, MAX_NODES, YamlProblem, load_yaml, read_recipe_text, set_override  # noqa: F401

Problem = tuple[tuple, str]

#: Largest absolute value of an integer setting (seeds have their own range).
MAX_INT = 2**31 - 1
#: Seeds must fit every RNG the pipeline seeds (NumPy's legacy seeding takes 32 bits).
MAX_SEED = 2**32 - 1
#: Largest absolute value of a float setting without its own limit.
MAX_FLOAT = 1e9
#: Per-key upper limits (inclusive) with the reason given in the error.
FLOAT_LIMITS: dict[tuple[str, ...], tuple[float, str]] = {
    ("privacy", "target_epsilon"): (100.0, "an epsilon above 100 protects nobody; set privacy.enabled: false instead"),
    ("privacy", "max_grad_norm"): (1e4, "the per-sample clip must be a finite, moderate norm"),
    ("train", "lr"): (10.0, "a learning rate above 10 diverges"),
    ("evaluate", "lr"): (10.0, "a learning rate above 10 diverges"),
    ("train", "weight_decay"): (10.0, "weight decay above 10 erases the weights"),
    ("train", "grad_clip"): (1e6, "use a finite clip norm"),
    ("sampler", "guidance_scale"): (100.0, "guidance above 100 only saturates colours"),
}
#: Most pixels a tile's side is downsampled by in each model size's UNet
#: (2 ** (len(mults) - 1) in :data:`synthpath.models.registry.SIZES`; a test keeps them equal).
UNET_DOWNSAMPLE = {"tiny": 8, "small": 16, "base": 32}
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d{1,3})?)$")
#: Recipe keys that hold paths.
PATH_KEYS = (("output_dir",), ("data", "slide_dir"), ("data", "labels_csv"), ("data", "geojson_dir"),
             ("audit", "encoder_checkpoint"), ("evaluate", "feature_checkpoint"), ("train", "init_from"))


# --------------------------------------------------------------------------- raw mapping
def _is_numeric_annotation(ann: Any) -> bool:
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(ann)
        return bool not in args and any(_is_numeric_annotation(a) for a in args)
    return ann in (int, float)


def _bools(ann: Any, v: Any, loc: tuple) -> list[Problem]:
    if isinstance(v, bool):
        if _is_numeric_annotation(ann):
            return [(loc, f"expected a number, got the boolean {str(v).lower()}")]
        return []
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return bool_problems(ann, v, loc)
    if origin in (typing.Union, types.UnionType):
        return [p for a in args if a is not type(None) for p in _bools(a, v, loc)][:1]
    if origin is list and isinstance(v, list) and args:
        return [p for i, x in enumerate(v) for p in _bools(args[0], x, loc + (i,))]
    if origin is tuple and isinstance(v, list) and args:
        elems = [args[0]] * len(v) if (len(args) == 2 and args[1] is Ellipsis) else list(args)
        return [p for i, (a, x) in enumerate(zip(elems, v)) for p in _bools(a, x, loc + (i,))]
    if origin is dict and isinstance(v, dict) and len(args) == 2:
        return [p for k, x in v.items() for p in _bools(args[1], x, loc + (k,))]
    return []


def bool_problems(model: type[BaseModel], data: Any, loc: tuple = ()) -> list[Problem]:
    """Booleans given where the schema wants a number (pydantic would read true as 1)."""
    if not isinstance(data, dict):
        return []
    out: list[Problem] = []
    for name, f in model.model_fields.items():
        if name in data:
            out += _bools(f.annotation, data[name], loc + (name,))
    return out


def path_problem(value: Any) -> str | None:
    """Why a path string cannot be used, or None."""
    if not isinstance(value, str):
        return None
    if value == "":
        return "the path is empty"
    if "\x00" in value:
        return "the path contains a NUL byte"
    if value.startswith("~"):
        try:
            expanded = os.path.expanduser(value)
        except (RuntimeError, KeyError):
            expanded = value
        if expanded.startswith("~"):
            user = value[1:].split("/", 1)[0]
            return f"cannot expand {value.split('/', 1)[0]!r}: no user {user!r} with a home folder" if user \
                else "cannot expand '~': no home folder is known"
    name_max, path_max = 255, 4096
    try:
        name_max = os.pathconf("/", "PC_NAME_MAX")
        path_max = os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        pass
    if len(value.encode("utf-8", "surrogateescape")) >= path_max:
        return f"the path is longer than the OS allows ({path_max} bytes)"
    long = [p for p in value.split("/") if len(p.encode("utf-8", "surrogateescape")) > name_max]
    if long:
        return f"a path component is longer than the OS allows ({name_max} bytes): {long[0][:40]}..."
    return None


def raw_path_problems(data: dict) -> list[Problem]:
    out: list[Problem] = []
    for key in PATH_KEYS:
        node: Any = data
        for k in key[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and key[-1] in node:
            why = path_problem(node[key[-1]])
            if why:
                out.append((key, why))
    d = data.get("data")
    slides = d.get("slides") if isinstance(d, dict) else None
    for i, s in enumerate(slides if isinstance(slides, list) else []):
        if isinstance(s, dict):
            for k in ("path", "geojson"):
                why = path_problem(s.get(k)) if k in s else None
                if why:
                    out.append((("data", "slides", i, k), why))
    return out


def missing_file(path: Path, what: str) -> str:
    """The message for a recipe path that does not exist."""
    text = str(path)
    if text.startswith("pkg:/"):
        pkg = text[len("pkg:/"):].lstrip("/").split("/", 1)[0]
        return (f"{what} {text.replace('pkg:/', 'pkg://', 1)} names the Python package {pkg!r}, which is not "
                f"installed (pkg:// paths point into an installed package)")
    return f"{what} does not exist: {path}"


def safe_exists(p: Path, kind: str = "any") -> bool:
    """``p.exists()`` / ``is_file()`` / ``is_dir()`` that never raises (an unusable path is False)."""
    try:
        p = Path(p)
        return p.is_file() if kind == "file" else p.is_dir() if kind == "dir" else p.exists()
    except (OSError, ValueError, RuntimeError):
        return False


# --------------------------------------------------------------------------- validated recipe
def _walk_numbers(obj: Any, loc: tuple):
    if isinstance(obj, BaseModel):
        for name in type(obj).model_fields:
            yield from _walk_numbers(getattr(obj, name), loc + (name,))
    elif isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            yield from _walk_numbers(x, loc + (i,))
    elif isinstance(obj, dict):
        for k, x in obj.items():
            yield from _walk_numbers(x, loc + (k,))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield loc, obj


def number_problems(recipe: BaseModel) -> list[Problem]:
    out: list[Problem] = []
    for loc, v in _walk_numbers(recipe, ()):
        names = [p for p in loc if isinstance(p, str)]
        if names and names[-1] in ("seed", "seeds"):
            if not (isinstance(v, int) and 0 <= v <= MAX_SEED):
                out.append((loc, f"a seed must be an integer from 0 to {MAX_SEED}, got {v}"))
        elif isinstance(v, int):
            if abs(v) > MAX_INT:
                out.append((loc, f"{v} is out of range (at most {MAX_INT})"))
        elif not math.isfinite(v):
            out.append((loc, f"must be a finite number, got {v}"))
        else:
            limit, why = FLOAT_LIMITS.get(tuple(loc), (MAX_FLOAT, "out of range"))
            if abs(v) > limit:
                out.append((loc, f"{v:g} is too large (at most {limit:g}): {why}"))
    return out


def _devices(recipe: BaseModel) -> list[Problem]:
    out = []
    for sec in type(recipe).model_fields:
        section = getattr(recipe, sec)
        dev = getattr(section, "device", None) if isinstance(section, BaseModel) else None
        if isinstance(dev, str) and not DEVICE_RE.match(dev):
            out.append(((sec, "device"), f"unknown device {dev!r}; use auto, cpu, cuda or cuda:N (N = GPU index)"))
    return out


def classifier_problem(name: str) -> str | None:
    """Why ``evaluate.classifier`` cannot be built, or None (smallcnn, or a torchvision/timm name)."""
    if name == "smallcnn":
        return None
    known: list[str] = []
    libs = []
    try:
        from torchvision import models as tvm

        known += list(tvm.list_models())
        libs.append("torchvision")
    except Exception:  # torchvision missing or broken: timm may still know the name
        pass
    try:
        import timm

        known += list(timm.list_models())
        libs.append("timm")
    except Exception:
        pass
    if name in known:
        return None
    if not libs:
        return (f"unknown classifier {name!r}: the choices are 'smallcnn', or a torchvision/timm architecture "
                f"name once torchvision or timm is installed (neither is installed here)")
    import difflib

    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return (f"unknown classifier {name!r}: the choices are 'smallcnn' or a {'/'.join(libs)} architecture "
            f"name (e.g. resnet18){hint}")


def _level_factors(levels: list[float]) -> list[int]:
    return [int(round(a / b)) for a, b in zip(levels, levels[1:])]


def value_problems(r: Any) -> list[Problem]:
    """Every range, device, enum, emptiness and cross-section problem of a validated recipe."""
    out = number_problems(r) + _devices(r)
    a, g, ev, d = r.audit, r.generate, r.evaluate, r.data
    if not a.feature_spaces:
        out.append((("audit", "feature_spaces"), "an audit needs at least one feature space "
                    "(pixel, learned, efficientnet, checkpoint); with none it could only pass"))
    elif len(set(a.feature_spaces)) != len(a.feature_spaces):
        out.append((("audit", "feature_spaces"), f"a feature space is listed twice: {a.feature_spaces}"))
    if not a.mia_timesteps:
        out.append((("audit", "mia_timesteps"), "the membership attack needs at least one timestep in (0, 1)"))
    for i, t in enumerate(a.mia_timesteps):
        if not 0 < t < 1:
            out.append((("audit", "mia_timesteps", i), f"a timestep must lie strictly between 0 and 1, got {t}"))
    for i, n in enumerate(g.layout_tiles):
        if not 1 <= n <= 4096:
            out.append((("generate", "layout_tiles", i), f"tiles per side must be from 1 to 4096, got {n}"))
    if g.label_proportions is not None:
        for k, w in g.label_proportions.items():
            if w < 0:
                out.append((("generate", "label_proportions", k), f"a proportion must be >= 0, got {w}"))
        if g.label_proportions and not sum(max(0.0, w) for w in g.label_proportions.values()) > 0:
            out.append((("generate", "label_proportions"), "the proportions are all zero; give at least one "
                        "positive share (or leave the key out to use the training tiles' shares)"))
    if not ev.seeds:
        out.append((("evaluate", "seeds"), "give at least one seed (three or more for confidence intervals)"))
    elif len(set(ev.seeds)) != len(ev.seeds):
        out.append((("evaluate", "seeds"), f"a seed is listed twice: {ev.seeds}"))
    if not ev.settings:
        out.append((("evaluate", "settings"), "give at least one of tstr, trtr, mixed"))
    if ev.enabled:
        why = classifier_problem(ev.classifier)
        if why:
            out.append((("evaluate", "classifier"), why))
        if not r.export.hf:
            out.append((("evaluate", "enabled"), "evaluate reads the exported Hugging Face dataset, but export.hf "
                        "is false; set export.hf: true or evaluate.enabled: false"))
    # tile size: the UNet halves it len(mults)-1 times, and each level's tile splits into
    # factor x factor children whose parent crops are tile_px / factor pixels.
    tp, size = r.ingest.tiling.tile_px, r.model.size
    factors = _level_factors(list(r.ingest.tiling.levels))
    need = math.lcm(UNET_DOWNSAMPLE.get(size, 1), *factors) if factors else UNET_DOWNSAMPLE.get(size, 1)
    if tp % need:
        valid = [need * k for k in range(1, 4097 // need + 1) if 16 <= need * k <= 4096][:6]
        out.append((("ingest", "tiling", "tile_px"),
                    f"tile_px {tp} cannot be used: the {size!r} UNet halves a tile "
                    f"{int(math.log2(UNET_DOWNSAMPLE.get(size, 1)))} times and the levels zoom by "
                    f"{', '.join(f'{f}x' for f in factors) or 'nothing'} (a tile's children each take 1/zoom of its "
                    f"side), so it must be a multiple of {need}; valid sizes include {', '.join(map(str, valid))}"))
    n_stacks = g.layout_tiles[0] * g.layout_tiles[1] * math.prod(f * f for f in factors)
    if n_stacks > 0 and g.samples_per_slide > n_stacks:
        out.append((("generate", "samples_per_slide"),
                    f"{g.samples_per_slide} samples per slide, but a {list(g.layout_tiles)} layout with levels "
                    f"{list(r.ingest.tiling.levels)} holds only {n_stacks} distinct stacks; lower it or enlarge "
                    f"generate.layout_tiles"))
    if r.train.level_balance and r.privacy.enabled:
        out.append((("train", "level_balance"), "level-balanced sampling is for non-DP runs only: DP-SGD's accounting "
                    "assumes uniform (Poisson) sampling of units; set train.level_balance: false or privacy.enabled: false"))
    ids: dict[str, int] = {}
    for i, s in enumerate(d.slides):
        sid = s.slide_id or Path(s.path).stem
        if sid in ids:
            out.append((("data", "slides", i, "slide_id"), f"slide id {sid!r} is already used by data.slides[{ids[sid]}]; "
                        f"give each slide its own slide_id"))
        else:
            ids[sid] = i
    return out


def filesystem_extra(r: Any) -> list[Problem]:
    """Path checks beyond existence: slides that are folders, an output_dir that is a file."""
    out: list[Problem] = []
    for i, s in enumerate(r.data.slides):
        if safe_exists(s.path, "dir"):
            out.append((("data", "slides", i, "path"), f"{s.path} is a folder, not a slide file; to read every slide "
                        f"in a folder use data.slide_dir (with data.slide_glob)"))
    p = Path(r.output_dir)
    probe = p
    while not safe_exists(probe) and probe.parent != probe:
        probe = probe.parent
    if safe_exists(probe) and not safe_exists(probe, "dir"):
        where = "is" if probe == p else f"lies inside {probe}, which is"
        out.append((("output_dir",), f"{p} {where} an existing file, not a folder; choose another output_dir"))
    return out


__all__ = ["YamlProblem", "read_recipe_text", "load_yaml", "bool_problems", "raw_path_problems", "path_problem",
           "safe_exists", "set_override", "value_problems", "filesystem_extra", "classifier_problem", "UNET_DOWNSAMPLE"]
