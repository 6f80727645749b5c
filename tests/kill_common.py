"""What the kill-and-resume tests of ``synthpath train`` share (tests/test_train_kill.py,
tests/test_distributed_kill.py and their drivers):

- :func:`toy_dp_recipe`: a DP recipe on the toy tile store, standing for a finished ingest;
- :func:`train_with_kill_points`: a driver's body, which runs ``synthpath train`` with
  trainer/pipeline functions wrapped so that ``die()`` is called at exactly the chosen point;
- :func:`assert_resumed_like_reference`: the resumed stage is bit for bit the uninterrupted one.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Callable

import yaml

#: A temp file or folder left by an atomic write (``x.tmp``, ``x.tmp123``, ``x.tmp.png``).
TEMP = re.compile(r"\.tmp\d*(\.[A-Za-z0-9]+)?$")

def write_ingest_manifest(ingest: Path, fingerprint: str) -> None:
    """The ingest stage's manifest (the toy store itself is real; ingest is tested in test_ingest*.py)."""
    (ingest / "manifest.json").write_text(json.dumps({"stage": "ingest", "fingerprint": fingerprint,
                                                      "finished_at": "2026-01-01T00:00:00+00:00"}))


def toy_dp_recipe(root: Path, name: str, *, train: dict, privacy: dict) -> Path:
    """``root/recipe.yaml``: patient-level DP training of the tiny model on a toy store of 6
    patients (one held out) at ``root/out/ingest``, with the given train and privacy sections."""
    from synthpath.tiles.toystore import make_toy_store

    out = root / "out"
    ingest = out / "ingest"
    make_toy_store(ingest, n_patients=6, tile_px=16, n_levels=2, coarse_tiles=2, holdout_patients=1)
    write_ingest_manifest(ingest, "toy")
    recipe = {
        "name": name, "output_dir": str(out), "seed": 0,
        "data": {"slide_dir": str(root), "classes": ["stroma", "tumour"]},
        "ingest": {"tiling": {"levels": [2.0, 1.0], "tile_px": 16}},
        "model": {"size": "tiny"},
        "train": train,
        "privacy": privacy,
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def train_with_kill_points(recipe: str, die: Callable[[], None], *, grad_at: int | None, finalise: bool,
                           wrap: dict[str, Callable[[Callable], Callable]] | None = None) -> None:
    """Run ``synthpath train <recipe>`` and exit with its code, calling ``die()`` after the
    ``grad_at``-th optimiser step of this process and, when ``finalise``, once training returned
    but before the stage is finalised. ``wrap`` maps other names of ``synthpath.train.trainer``
    to a function that wraps them. Prints ``OPTIMISER_STEPS <n>`` at the end."""
    import synthpath.pipeline as pipeline
    from synthpath.train import trainer

    count = {"grad": 0}
    step_fn, clean_fn = trainer.gradient_step, pipeline.remove_temp_files

    def gradient_step(*a, **k):
        out = step_fn(*a, **k)
        count["grad"] += 1
        if count["grad"] == grad_at:
            die()
        return out

    def remove_temp_files(folder):  # run_stage: train returned, the stage is not finalised yet
        if finalise:
            die()
        return clean_fn(folder)

    trainer.gradient_step, pipeline.remove_temp_files = gradient_step, remove_temp_files
    for name, wrapper in (wrap or {}).items():
        setattr(trainer, name, wrapper(getattr(trainer, name)))
    from synthpath.cli import main

    rc = main(["train", recipe])
    print("OPTIMISER_STEPS", count["grad"], flush=True)
    sys.exit(rc)


def assert_resumed_like_reference(final: Path, reference: Path, steps: int) -> dict:
    """The finished stage ``final`` has the uninterrupted run's weights (raw and EMA), ledger and
    loss log (one row per step, none lost), no temp file and no private state; returns the ledger."""
    from safetensors.torch import load_file

    for name in ("model.safetensors", "model_raw.safetensors"):
        a, b = load_file(str(reference / name)), load_file(str(final / name))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
    led = json.loads((final / "ledger.json").read_text())
    assert led == json.loads((reference / "ledger.json").read_text())
    rows = (final / "losses.csv").read_text()
    assert rows == (reference / "losses.csv").read_text()
    assert [int(line.split(",")[0]) for line in rows.splitlines()[1:]] == list(range(1, steps + 1))  # no row lost
    stray = [str(q.relative_to(final)) for q in final.rglob("*") if TEMP.search(q.name)]
    assert not stray, f"temp files in the finished stage: {stray}"
    assert not (final / "state").exists()  # the private state (DP generator states) is not in the release
    return led
