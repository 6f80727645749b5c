"""Private fine-tuning from a public checkpoint, per ``privacy.trainable`` choice (issue 14).

Runs the real train stage (patient-level DP at the demo's settings: recipes/demo.yaml, with
the private regions demo_private_regions.geojson and ``train.init_from`` = a public
checkpoint made by recipes/demo_public.yaml) for a few steps per choice and reports, per
choice: trainable parameters d, sigma, CPU seconds per step (this process, resource.getrusage),
and the expected norm of the noise added to the mean update, sigma * C * sqrt(d) / (q n),
against the clip norm C that bounds the signal of one step.

    PYTHONPATH=$PWD python benchmarks/bench_trainable.py --public /tmp/runs/demo_public/train \
        --work /tmp/bench_trainable --steps 3 --out /tmp/bench_trainable.md
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CHOICES = ["all", "lora", ["lora", "norms"], ["conditioning", "norms"], "norms", "attention", "conditioning"]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--public", required=True, help="public checkpoint (train folder) for train.init_from")
    ap.add_argument("--work", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--choices", default=json.dumps(CHOICES), help="JSON list of privacy.trainable values")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from synthpath.pipeline import run_stage
    from synthpath.recipe import load_recipe
    from synthpath.train.trainer import train

    work = Path(args.work)
    sets = [f"output_dir={work}", "data.slides.0.geojson=demo_private_regions.geojson",
            f"train.init_from={args.public}", f"train.steps={args.steps}", "train.sample_every=100000",
            "train.checkpoint_every=100000"]
    base = load_recipe(ROOT / "recipes" / "demo.yaml", sets)
    store = work / "ingest"
    if not (store / "manifest.json").is_file():
        run_stage(base, "ingest")
    rows = []
    for choice in json.loads(args.choices):
        label = "+".join([choice] if isinstance(choice, str) else choice)
        recipe = load_recipe(ROOT / "recipes" / "demo.yaml", sets + [f"privacy.trainable={json.dumps(choice)}"])
        out = work / f"ft_{label}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = cpu_seconds()
        train(recipe, store, out, progress=False)
        cpu = cpu_seconds() - t0
        led = json.loads((out / "ledger.json").read_text())
        d = led["trainable"]["trainable_params"]
        noise = led["sigma"] * led["max_grad_norm"] * math.sqrt(d) / (led["sample_rate"] * led["n_units"])
        rows.append((label, d, led["sigma"], led["epsilon"], cpu / args.steps, noise, led["max_grad_norm"]))
        print(rows[-1], flush=True)
    lines = [f"steps per choice: {args.steps}; patient-level DP at recipes/demo.yaml settings on the private regions "
             f"(demo_private_regions.geojson); torch threads {args.threads}; CPU seconds include the stage's "
             "start-up (Opacus wrapping, accountant) and final sample grid, divided by the steps", "",
             "| privacy.trainable | trainable params d | sigma | epsilon | CPU s / step | E‖noise‖ of the mean update | C |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| `{r[0]}` | {r[1]:,} | {r[2]:.3f} | {r[3]:.2f} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:g} |" for r in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
