"""Start training from a public checkpoint (``train.init_from``).

The usual way to get useful data under DP (Ghalebikesabi et al. 2023; DPImageBench's leading
methods) is to pretrain on public data and fine-tune privately. ``train.init_from`` names a
synthpath train folder (``model.safetensors`` + ``config.json``) or one of its
``.safetensors`` files (``pkg://package/path`` is resolved by the recipe loader). The weights
are loaded into the freshly built model *before* any adapter is added and before Opacus wraps
it.

**Which checkpoints may start a private run (the lineage rule).** DP-SGD's epsilon covers only
the data that DP-SGD trains on. Everything that reached the initial weights reaches the release
too, by post-processing, and is covered by nothing unless it is covered already. So a DP run
accepts a checkpoint only when every run in its lineage trained on data that is

- declared public by its recipe (``data.public: true``), or
- itself protected by DP (its own ledger's epsilon, a *separate* guarantee for *that* data),

recursively through the checkpoint's own ``init_from``. A checkpoint trained without DP on
data not declared public (or one that records no declaration: older checkpoints) is refused:
it would carry its private training data into the release outside any epsilon. A run without
DP has no guarantee to protect, so it may start from any matching checkpoint (logged).

The run's own ``data.public`` declaration is written into its checkpoint, so a model trained
with privacy off on public slides becomes an acceptable init; a "public" run initialised from
a non-public, non-DP checkpoint does not launder it (the lineage is checked, not only the
last declaration).

**Matching.** The model config (architecture, size, channels, ...), ``tile_px`` and ``levels``
must equal this run's; a mismatch is a StageError naming the key on both sides. When only the
classes differ, only the label embedding is adapted: rows of classes whose names match are
copied, the null-label row is copied, the other rows keep this run's fresh initialisation;
the mapping is logged and recorded in the provenance.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..atomic import sha256_file
from ..models.checkpoint import CONFIG_FILE, EMA_FILE
from ..pipeline import StageError
from .public_init_files import display_path, read_provenance

log = logging.getLogger("synthpath.train")

KEY = "train.init_from"
LABEL_WEIGHT = "embed.label.weight"
# model-config keys that must match (num_classes is adapted through the label embedding)
_MODEL_KEYS = ("arch", "size", "channels", "mults", "num_res_blocks", "attn_max_res", "head_dim", "logsnr_shift",
               "tile_px")


def locate(path: Path | str) -> tuple[Path, Path]:
    """``(weights file, config.json)`` of a train folder or a checkpoint file; StageError otherwise."""
    p = Path(path)
    if p.is_dir():
        weights, config = p / EMA_FILE, p / CONFIG_FILE
    elif p.is_file() and p.suffix == ".safetensors":
        weights, config = p, p.parent / CONFIG_FILE
    elif p.is_file() and p.name == CONFIG_FILE:
        weights, config = p.parent / EMA_FILE, p
    else:
        raise StageError(f"{KEY}: {p} is neither a synthpath train folder nor a .safetensors checkpoint file")
    for f, what in ((weights, "weights file"), (config, "config.json (model config and provenance)")):
        if not f.is_file():
            raise StageError(f"{KEY}: the checkpoint at {p} has no {what}: {f} is missing")
    return weights, config


def read_checkpoint_config(config: Path) -> dict:
    try:
        cfg = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StageError(f"{KEY}: cannot read {config}: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise StageError(f"{KEY}: {config} has no 'model' section; is it a synthpath checkpoint?")
    return cfg


def lineage_problem(cfg: dict) -> str | None:
    """Why a checkpoint's lineage may not start a DP run (the rule in the module docstring), or None."""
    node, depth = cfg, 0
    while node is not None:
        who = "the checkpoint" if depth == 0 else f"its init_from ancestor #{depth} ({node.get('recipe_name', '?')})"
        public = node.get("data_public")
        dp = bool((node.get("privacy") or {}).get("enabled"))
        if public is None and not dp:
            return (f"{who} records no data declaration (data.public) and was trained without DP, so its training "
                    f"data may be private and would reach this release outside epsilon")
        if not public and not dp:
            return (f"{who} was trained without DP on data its recipe did not declare public (data.public: false), "
                    f"so its private training data would reach this release outside epsilon")
        node, depth = node.get("init_from"), depth + 1
    return None


def _model_mismatches(saved: dict, now: dict) -> list[str]:
    out = []
    for k in _MODEL_KEYS:
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if a != b:
            hint = " (set by ingest.tiling.tile_px)" if k == "tile_px" else " (set by model.size)"
            out.append(f"model.{k}: checkpoint {a!r}, this run {b!r}{hint}")
    return out


def _adapt_labels(state: dict, model: torch.nn.Module, old_classes: list, new_classes: list) -> dict:
    """Give ``state`` a label embedding of this model's shape; returns what was done."""
    old = state[LABEL_WEIGHT]
    fresh = model.state_dict()[LABEL_WEIGHT].detach().clone().to(old.dtype)
    if old.shape[1] != fresh.shape[1]:
        raise StageError(f"{KEY}: {LABEL_WEIGHT} width {old.shape[1]} differs from this model's {fresh.shape[1]}")
    mapped = []
    for j, name in enumerate(new_classes):
        if name in old_classes:
            fresh[j] = old[old_classes.index(name)]
            mapped.append(name)
    fresh[-1] = old[-1]  # the null label (classifier-free guidance) keeps its meaning
    state[LABEL_WEIGHT] = fresh
    reinit = [c for c in new_classes if c not in mapped]
    return {"adapted": True, "checkpoint_classes": list(old_classes), "classes": list(new_classes),
            "mapped_by_name": mapped, "reinitialised": reinit, "dropped": [c for c in old_classes if c not in new_classes],
            "null_label": "copied"}


def init_model(path: Path | str, model: torch.nn.Module, *, classes: list, levels: list, tile_px: int,
               dp: bool, relative_to: Path | str | None = None) -> dict:
    """Load the checkpoint at ``path`` into ``model`` (a plain SynthUNet, before adapters and
    Opacus); returns its provenance for the ledger, the checkpoint and the card. The path is
    recorded as :func:`display_path` shows it (``pkg://...`` or relative to ``relative_to``),
    never as an absolute path of this machine."""
    weights, config = locate(path)
    shown = display_path(path, relative_to)
    digest = sha256_file(weights)
    try:
        manifest = read_provenance(weights)
    except ValueError as e:
        raise StageError(f"{KEY}: {e}") from None
    if manifest is not None and manifest["weights_sha256"] != digest:
        raise StageError(f"{KEY}: the weights {shown} (sha256 {digest[:12]}...) are not the ones its provenance.json "
                         f"records (sha256 {manifest['weights_sha256'][:12]}...); the checkpoint was changed after "
                         f"it was exported, so its provenance no longer describes it")
    cfg = read_checkpoint_config(config)
    problems = _model_mismatches(cfg["model"], model.config)
    if "tile_px" in cfg and int(cfg["tile_px"]) != int(tile_px):
        problems.append(f"tile_px: checkpoint {cfg['tile_px']}, this run {tile_px} (ingest.tiling.tile_px)")
    saved_levels = cfg.get("levels")
    if saved_levels is None or [round(float(x), 6) for x in saved_levels] != [round(float(x), 6) for x in levels]:
        problems.append(f"levels: checkpoint {saved_levels}, this run {list(levels)} (ingest.tiling.levels, µm/px)")
    if problems:
        raise StageError(f"{KEY}: the checkpoint {weights} does not match this run -- " + "; ".join(problems))
    why = lineage_problem(cfg)
    if why and dp:
        raise StageError(f"{KEY}: refusing {weights} as the start of a DP run: {why}. Train the initial model on "
                         f"data declared public (data.public: true in its recipe) or with DP")
    if why:
        log.warning("%s: %s (allowed: this run is not DP either, so no epsilon is claimed)", KEY, why)
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises its own error types for a corrupt file
        raise StageError(f"{KEY}: cannot read the weights {weights}: {e}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise StageError(f"{KEY}: {weights} does not fit the model: missing keys {missing[:5]}, unexpected keys "
                         f"{unexpected[:5]}")
    old_classes = list(cfg.get("classes") or [])
    labels = {"adapted": False}
    if old_classes != list(classes):
        if not old_classes:
            raise StageError(f"{KEY}: {config} records no classes, so its label embedding cannot be matched to "
                             f"this run's classes {list(classes)}")
        labels = _adapt_labels(state, model, old_classes, list(classes))
        log.warning("%s: the checkpoint's classes %s differ from this run's %s; only the label embedding was "
                    "adapted (mapped by name: %s; re-initialised: %s)", KEY, old_classes, list(classes),
                    labels["mapped_by_name"] or "none", labels["reinitialised"] or "none")
    bad = [f"{k}: checkpoint {tuple(state[k].shape)}, this model {tuple(own[k].shape)}" for k in own
           if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise StageError(f"{KEY}: {weights} has tensors of other shapes -- " + "; ".join(bad[:5]))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    priv = cfg.get("privacy") or {}
    prov = {
        "path": shown,
        "weights_file": weights.name,
        "weights_sha256": digest,
        "recipe_name": cfg.get("recipe_name"),
        "recipe_hash": cfg.get("recipe_hash"),
        "recipe_full_hash": cfg.get("recipe_full_hash"),
        "data_public": cfg.get("data_public"),
        "privacy": {k: priv.get(k) for k in ("enabled", "unit", "epsilon", "delta")},
        "steps": cfg.get("steps"),
        "classes": old_classes,
        "label_embedding": labels,
        "accepted_because": _accepted_because(cfg, why),
        "init_from": cfg.get("init_from"),
    }
    if manifest is not None:  # a shipped checkpoint: its recipe file, command and data declaration
        prov["manifest"] = {k: manifest.get(k) for k in ("recipe_file", "recipe_file_sha256", "command", "data")}
    log.info("%s: started from %s (recipe %s, weights sha256 %s..., data %s)", KEY, shown,
             prov["recipe_name"], prov["weights_sha256"][:12], "declared public" if prov["data_public"] else
             "not declared public")
    return prov


def _accepted_because(cfg: dict, why: str | None) -> str:
    if why:
        return f"accepted only because this run is not DP: {why}"
    if cfg.get("data_public"):
        return "its training data was declared public (data.public: true)" + (
            "; its own init_from lineage is public or DP" if cfg.get("init_from") else "")
    return "its training data is protected by its own DP guarantee (a separate epsilon, not part of this run's)"

