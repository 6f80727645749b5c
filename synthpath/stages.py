"""The built-in stages, registered in pipeline order.

Each stage's module is imported only when the stage runs, so ``synthpath validate``
stays fast and a missing optional dependency of one stage does not break the others.
"""

from __future__ import annotations

import importlib

from .pipeline import Stage, StageContext


def _lazy(module: str, func: str = "run"):
    def run(ctx: StageContext) -> dict:
        return getattr(importlib.import_module(module), func)(ctx)

    return run


def _precheck(stage: str):
    def check(recipe, options: dict) -> bool:
        return importlib.import_module("synthpath.audit.gate").precheck(recipe, stage, options)

    return check


def _init_weights(recipe) -> dict:
    """The content hash of ``train.init_from``'s weights (the train stage's external input).
    Hashed here without importing torch; a missing file hashes as "missing" and the stage
    itself then says what is wrong."""
    from .atomic import sha256_file
    from .train.public_init_files import weights_file

    if recipe.train.init_from is None:
        return {}
    f = weights_file(recipe.train.init_from)
    return {"init_from_sha256": sha256_file(f) if f is not None and f.is_file() else "missing"}


BUILTIN = (
    Stage("ingest", ("data", "ingest"), (), _lazy("synthpath.slides.ingest"),
               "read slides, detect tissue, tile nested levels, label, split by patient"),
    Stage("train", ("model", "train", "privacy", "generate.label_proportions"), ("ingest",), _lazy("synthpath.train.trainer"),
               "train the magnification-aware diffusion model (optionally with DP-SGD)", external=_init_weights),
    Stage("audit", ("audit", "sampler", "model", "generate.layout_tiles", "generate.label_proportions",
                    "generate.max_filter_retries", "export.allow_failed_audit"), ("ingest", "train"),
          _lazy("synthpath.audit.report"),
               "memorization and membership-inference audit; the release gate", precheck=_precheck("audit")),
    Stage("generate", ("generate", "sampler", "export.slides"), ("ingest", "train", "audit"), _lazy("synthpath.generate.runner"),
               "synthesise slides coarse to fine into WebDataset shards", precheck=_precheck("generate")),
    Stage("export", ("export",), ("ingest", "train", "audit", "generate"), _lazy("synthpath.export.hf"),
               "write the Hugging Face dataset and its card", precheck=_precheck("export")),
    Stage("evaluate", ("evaluate",), ("ingest", "export"), _lazy("synthpath.evaluate.stage"),
               "downstream utility (TSTR vs TRTR) and fidelity; adds them to the card"),
)
