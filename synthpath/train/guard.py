"""What a resumable training state must match before :func:`~synthpath.train.trainer.train`
continues it, and the marker of a finished training.

The CLI re-runs a stage whose recipe sections changed (the fingerprint), but the library
``train()`` can be pointed at any folder. So the state records the settings it was made
with, and a resume is refused when the model, privacy or training settings differ (a
non-DP state resumed with DP would report a ledger for half the steps; a patient-level
state resumed at tile level would mix two accountants' histories) or when the accountant
history does not add up to the saved step.

``train_done.json`` is written after every final artifact and before the private state is
deleted, so a kill between the end of training and the stage's rename resumes *at the end*
(returns the recorded summary) instead of training again from step 0.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..pipeline import StageError, remove_temp_files  # noqa: F401  (re-exported for the trainer)

DONE = "train_done.json"

# train keys that do not change what is computed (where, how often to log or checkpoint)
_NEUTRAL_TRAIN_KEYS = ("device", "log_every", "sample_every", "checkpoint_every", "num_workers", "compile")


# train keys added after states were first saved, with the default that computes what older
# code did: left out of the settings at that default, so a state saved before they existed resumes
_LATER_TRAIN_DEFAULTS = {"augment": "none", "level_balance": False}


def settings_of(recipe) -> dict:
    """The settings a training state is bound to (JSON)."""
    dump = recipe.model_dump(mode="json")
    train = {k: v for k, v in dump["train"].items() if k not in _NEUTRAL_TRAIN_KEYS
             and not (k in _LATER_TRAIN_DEFAULTS and v == _LATER_TRAIN_DEFAULTS[k])}
    return {"seed": recipe.seed, "model": dump["model"], "train": train, "privacy": dump["privacy"],
            "label_proportions": dump["generate"]["label_proportions"]}


def _diff(saved, now, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now), key=str):
            out += _diff(saved.get(k, "<absent>"), now.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if saved == now else [f"{prefix[:-1]}: saved {saved!r}, now {now!r}"]


def check_resume(state_dir: Path, extra: dict, settings: dict, *, step: int, dp: bool, steps_in_history: int) -> None:
    """Raise a StageError unless the saved state may be continued with ``settings``."""
    saved = extra.get("settings")
    fix = f"delete {state_dir} to train from scratch, or train into another folder"
    if not isinstance(saved, dict):
        raise StageError(f"the training state in {state_dir} records no settings, so it cannot be checked "
                         f"against this recipe; {fix}")
    diffs = [d.replace("label_proportions", "generate.label_proportions", 1) if d.startswith("label_proportions")
             else d for d in _diff(saved, settings)]
    if diffs:
        raise StageError(f"refusing to resume the training state in {state_dir} (step {step}): it was made with "
                         f"other settings -- " + "; ".join(diffs) + f"; {fix}")
    if "history" not in extra:
        raise StageError(f"the training state in {state_dir} has no accountant history; {fix}")
    expected = step if dp else 0
    if steps_in_history != expected:
        raise StageError(f"the training state in {state_dir} is at step {step} but its accountant history "
                         f"covers {steps_in_history} step(s); the ledger would be wrong; {fix}")


def read_done(workdir: Path, settings: dict) -> dict | None:
    """The finished run's summary when ``train_done.json`` matches ``settings``; None if absent."""
    p = Path(workdir) / DONE
    if not p.is_file():
        return None
    try:
        done = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a torn marker: train again from the state
    if done.get("settings") != settings:
        diffs = _diff(done.get("settings"), settings)
        raise StageError(f"{workdir} holds a finished training made with other settings ("
                         + "; ".join(diffs[:5]) + f"); delete {p.parent} or train into another folder")
    if not (Path(workdir) / "model.safetensors").is_file():
        return None
    return done.get("summary")
