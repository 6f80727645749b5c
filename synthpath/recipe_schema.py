"""Recipe schema: one YAML file describes a whole synthpath run.

Every section is a pydantic v2 model with ``extra="forbid"``, so a misspelt key is an
error, not a silently ignored setting. Loading a file (YAML line numbers, ``--set``
overrides, path resolution, collecting every problem into one error) is
:mod:`synthpath.recipe`, which re-exports every name defined here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    public: bool = Field(False, description="Declare these slides public data (e.g. open-access slides): a model "
                         "trained on them without DP may initialise a private run (train.init_from).")

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
    augment: Literal["none", "dihedral"] = Field(
        "none", description="Per-tile training augmentation: dihedral = one of the 8 flips/rotations per tile, applied "
        "alike to the tile, its parent crop and its known pixels (synthpath.train.augment). Off by default so existing "
        "recipes train (and resume) exactly as before.")
    level_balance: bool = Field(
        False, description="Non-DP runs only: draw each step's tiles so every level is equally likely (a coarse level "
        "has 1/4 the tiles of the next one, so uniform sampling barely trains it). Refused with privacy on: DP-SGD "
        "samples units uniformly (Poisson), which its accounting assumes.")
    init_from: Path | None = Field(None, description="Public checkpoint to start from: a synthpath train folder or "
                                   "its model.safetensors (pkg://package/path accepted). See synthpath.train.public_init.")


TrainableName = Literal["all", "lora", "conditioning", "norms", "attention"]


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
    trainable: TrainableName | list[TrainableName] = Field(
        "all", description="What training updates: all; conditioning, norms, attention (combinable as a list); "
                           "lora (low-rank adapters on every conv and linear layer, combinable with the named parts).")
    lora_rank: int = Field(4, ge=1, le=256, description="Rank of the low-rank adapters (privacy.trainable: lora).")

    @field_validator("trainable")
    @classmethod
    def _trainable_combination(cls, v: Any) -> Any:
        names = [v] if isinstance(v, str) else list(v)
        if not names:
            raise ValueError("give at least one of all, lora, conditioning, norms, attention")
        if len(set(names)) != len(names):
            raise ValueError(f"names repeat in {names}")
        if "all" in names and len(names) > 1:
            raise ValueError(f"'all' already trains everything; it cannot be combined with {names}")
        return v

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
