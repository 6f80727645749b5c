"""What a training run shows: the loss log (CSV + PNG) and per-level sample grids.

Sample grids are diagnostics of the training stage, not releasable data: each row is one
level, and for every class the first cell is the *real* parent crop the samples are
conditioned on (blank at the coarsest level), followed by samples from the EMA model with
a fast few-step sampler. The samplers draw from per-cell seeds, so grids consume none of
the training randomness (resume stays exact) and the same cell is comparable across steps.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..models import Cond, derive_seed, initial_noise, sample_dpmpp_2m

GRID_STEPS = 10
GRID_SAMPLES = 2


def write_losses(path: Path, rows: list[dict]) -> None:
    """``step,loss,units`` rows, written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "loss", "units"])
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in ("step", "loss", "units")})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def read_losses(path: Path, upto: int) -> list[dict]:
    """The loss log up to and including step ``upto`` (used on resume)."""
    if not path.is_file():
        return []
    with path.open() as f:
        return [{"step": int(r["step"]), "loss": float(r["loss"]), "units": int(r["units"])}
                for r in csv.DictReader(f) if int(r["step"]) <= upto]


def plot_losses(path: Path, rows: list[dict], title: str) -> None:
    """Loss per step and its running mean, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in rows], dtype=float)
    loss = np.array([r["loss"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ok = np.isfinite(loss)
    ax.plot(steps[ok], loss[ok], lw=0.6, alpha=0.5, label="step loss")
    if ok.sum() >= 5:
        k = max(1, int(ok.sum()) // 20)
        smooth = np.convolve(loss[ok], np.ones(k) / k, mode="valid")
        ax.plot(steps[ok][k - 1:], smooth, lw=1.6, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("v-prediction MSE")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def grid_conditions(dataset, num_classes: int) -> list[list[int | None]]:
    """For each level, for each class, one training tile (its index) whose parent crop and
    label condition that grid cell; the first matching tile in store order, or None."""
    levels = dataset.item_levels
    labels = dataset.labels
    out = []
    for lv in range(len(dataset.levels)):
        row = []
        for c in range(num_classes):
            hit = np.flatnonzero((levels == lv) & (labels == c))
            if hit.size == 0:
                hit = np.flatnonzero(levels == lv)
            row.append(int(hit[0]) if hit.size else None)
        out.append(row)
    return out


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def sample_grid(model: torch.nn.Module, dataset, picks: list[list[int | None]], num_classes: int,
                device: torch.device, path: Path, step: int) -> None:
    """Rows = levels; per class: real parent crop, then ``GRID_SAMPLES`` samples. All cells
    are sampled in one batch (one sampler call)."""
    from PIL import Image

    px = dataset.tile_px
    blank = np.full((px, px, 3), 255, dtype=np.uint8)
    conds, seeds, where = [], [], []
    for lv, row in enumerate(picks):
        for c, idx in enumerate(row):
            if idx is None:
                continue
            item = dataset[idx]
            batch = {k: item[k][None] for k in ("image", "parent", "has_parent", "log_mpp")}
            batch["label"] = torch.tensor([c])
            cond = Cond.from_batch(batch, num_classes)
            conds.append(cond.replace(known=torch.zeros_like(cond.known)).repeat(GRID_SAMPLES))
            seeds += [derive_seed("train-grid", lv, c, s) for s in range(GRID_SAMPLES)]
            where.append((lv, c, _to_uint8(item["parent"]) if bool(item["has_parent"]) else blank))
    was_training = model.training
    model.eval()
    out = []
    if conds:
        cond = Cond.cat(conds).to(device)
        x = initial_noise((len(seeds), 3, px, px), seeds, device)
        out = sample_dpmpp_2m(model, x, cond, steps=GRID_STEPS, guidance=1.0)
    if was_training:
        model.train()
    ncls = max((len(r) for r in picks), default=0)
    cells = [[blank] * (ncls * (1 + GRID_SAMPLES)) for _ in picks]
    for i, (lv, c, ref) in enumerate(where):
        col = c * (1 + GRID_SAMPLES)
        cells[lv][col] = ref
        for s in range(GRID_SAMPLES):
            cells[lv][col + 1 + s] = _to_uint8(out[i * GRID_SAMPLES + s])
    pad = 2
    ncol = max(len(r) for r in cells)
    canvas = np.full((len(cells) * (px + pad) + pad, ncol * (px + pad) + pad, 3), 255, dtype=np.uint8)
    for i, line in enumerate(cells):
        for j, img in enumerate(line):
            y, x = pad + i * (px + pad), pad + j * (px + pad)
            canvas[y:y + px, x:x + px] = img
    scale = max(1, math.ceil(128 / px))
    img = Image.fromarray(canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    img.save(tmp)
    os.replace(tmp, path)
