"""Slide quality of a trained checkpoint against the same architecture untrained, and the
seam methods against each other: ``overwrite`` (no known pixels: each tile overwrites the
overlap), ``inpaint`` (known pixels, hard replacement) and ``feather`` (known pixels,
replacement cross-faded over ``--feather-px`` px; the default in synthesis).

Synthesises ``--slides`` pyramids with each model (same seeds, labels and sampler), and
reports the cross-level consistency (PSNR/SSIM of each level box-downsampled against the
level above) and the seam score per level (1.0 = seamless). Saves a PNG
of each model's first slide (all levels side by side) and appends a section to
``benchmarks/RESULTS.md``.

    python benchmarks/bench_quality.py runs/demo/train --slides 2 --layout 2 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthpath.generate.quality import consistency, pyramid_seams
from synthpath.generate.synthesis import synthesize_slides
from synthpath.models import SynthUNet, load_config, load_model
from synthpath.recipe import SamplerConfig

RESULTS = Path(__file__).with_name("RESULTS.md")


def _summary(pyrs) -> dict:
    cons = [consistency(p) for p in pyrs]
    seams = [pyramid_seams(p) for p in pyrs]
    n_lv = len(pyrs[0].levels)
    out = {"psnr": {}, "ssim": {}, "seam": {}}
    for k in range(1, n_lv):
        out["psnr"][k] = float(np.mean([c[k - 1]["psnr"] for c in cons]))
        out["ssim"][k] = float(np.mean([c[k - 1]["ssim"] for c in cons]))
    for k in range(n_lv):
        vals = [d["seam"] for s in seams for d in s if d["level"] == k]
        if vals:
            out["seam"][k] = float(np.mean(vals))
    return out


def _strip(pyr) -> Image.Image:
    """All levels of a pyramid side by side, each upsampled to the finest level's height."""
    h = pyr.levels[-1].shape[0]
    ims = [Image.fromarray(np.asarray(a)).resize((a.shape[1] * h // a.shape[0], h), Image.NEAREST) for a in pyr.levels]
    out = Image.new("RGB", (sum(i.width for i in ims) + 8 * (len(ims) - 1), h), "white")
    x = 0
    for im in ims:
        out.paste(im, (x, 0))
        x += im.width + 8
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train_dir", type=Path, help="a train/ folder (model.safetensors + config.json)")
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--layout", type=int, nargs=2, default=(2, 2))
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--zoom-start", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--feather-px", type=int, default=None, help="default: overlap // 2")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("quality"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    cfg = load_config(args.train_dir)
    levels = cfg.get("levels")
    if not levels:
        raise SystemExit(f"{args.train_dir}/config.json has no 'levels'")
    trained = load_model(args.train_dir, "cpu")
    torch.manual_seed(0)
    untrained = SynthUNet.from_config(cfg["model"]).eval()
    sampler = SamplerConfig(name=args.sampler, steps=args.steps, guidance_scale=args.guidance, zoom_start=args.zoom_start)
    n_cls = trained.num_classes
    labels = [i % n_cls for i in range(args.slides)]
    seeds = [1000 + i for i in range(args.slides)]
    args.out.mkdir(parents=True, exist_ok=True)
    res = {}
    # "overwrite" is the seam ablation: the same model and seeds, but each tile ignores its
    # finished neighbours (no known pixels) and overwrites the overlap.
    runs = (("untrained", untrained, "feather"), ("trained, overwrite (no seam inpainting)", trained, "overwrite"),
            ("trained, inpaint (hard replacement)", trained, "inpaint"), ("trained, feather", trained, "feather"))
    for name, model, method in runs:
        t0 = time.time()
        pyrs = synthesize_slides(model, labels, tuple(args.layout), levels, seeds, sampler=sampler, batch_size=args.batch,
                                 seams=method, feather_px=args.feather_px)
        res[name] = _summary(pyrs) | {"seconds": round(time.time() - t0, 1)}
        fname = name.split(" (")[0].replace(", ", "_").replace(" ", "_")
        _strip(pyrs[0]).save(args.out / f"{fname}_slide0.png")
    print(json.dumps(res, indent=1))
    if not args.no_write:
        lines = [f"\n## Slide quality and seam methods (issue 15, bench_quality.py), {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n",
                 f"\ncheckpoint `{args.train_dir}` ({cfg['model'].get('size')}, {cfg['model']['tile_px']} px, levels {levels}, "
                 f"{cfg.get('steps', '?')} training steps, DP {'on' if (cfg.get('privacy') or {}).get('enabled') else 'off'}); {args.slides} slides of {args.layout[0]}x{args.layout[1]} coarsest tiles; "
                 f"{args.sampler} {args.steps} steps, guidance {args.guidance}, zoom from t={args.zoom_start}.\n\n",
                 "| model | " + " | ".join(f"PSNR L{k}" for k in res['trained, feather']['psnr']) + " | "
                 + " | ".join(f"SSIM L{k}" for k in res['trained, feather']['ssim']) + " | "
                 + " | ".join(f"seam L{k}" for k in res['trained, feather']['seam']) + " |\n",
                 "|---" * (1 + len(res['trained, feather']['psnr']) * 2 + len(res['trained, feather']['seam'])) + "|\n"]
        for name, r in res.items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in r["psnr"].values()) + " | "
                         + " | ".join(f"{v:.3f}" for v in r["ssim"].values()) + " | "
                         + " | ".join(f"{v:.2f}" for v in r["seam"].values()) + " |\n")
        ow, fe = res["trained, overwrite (no seam inpainting)"]["seam"], res["trained, feather"]["seam"]
        beats = all(fe[k] < ow[k] for k in ow)
        lines.append(f"\nSeams (1.0 = as smooth as the interior), feathered seam inpainting against overwriting: "
                     + ", ".join(f"L{k} {fe[k]:.2f} vs {ow[k]:.2f}" for k in ow)
                     + f" -> feather {'beats' if beats else 'does NOT beat'} overwriting at every level. "
                     f"Feathered seams are scored over the whole cross-fade band (every line from the band's start "
                     f"to the first line of the tile's own pixels), hard ones at the line where new pixels begin.\n")
        with RESULTS.open("a") as fh:
            fh.writelines(lines)
    return res


if __name__ == "__main__":
    main()
