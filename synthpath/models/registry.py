"""Named model sizes and their cost (parameters, GFLOPs per forward).

- ``tiny``: CPU tests and the demo (1.2M parameters, 0.83 GFLOPs per 64-px forward;
  16 channels at full resolution because CPU time goes there, 64 at 16x16 and 8x8).
- ``small``: a quick GPU model (27M parameters, 98 GFLOPs per 256-px forward).
- ``base``: real runs at 256 px (109M parameters, 174 GFLOPs per 256-px forward).
  Designed for H100 throughput: 64 channels at the two finest resolutions (where FLOPs are
  spent), then widening 2x per level so each level costs about the same; channel counts
  are multiples of 64; attention only at <= 32x32 where the sequence is short; most
  parameters live in the cheap 16x16 and 8x8 levels. A ~124M plain UNet of the usual
  128-channel shape costs about 500 GFLOPs at 256 px, so ``base`` needs about a third of
  the compute per image-step for a similar parameter count.
"""

from __future__ import annotations

import torch

from .conditioning import Cond
from .unet import SynthUNet

SIZES: dict[str, dict] = {
    "tiny": dict(channels=16, mults=(1, 2, 4, 4), num_res_blocks=1, attn_max_res=16, head_dim=32),
    "small": dict(channels=32, mults=(1, 2, 4, 8, 8), num_res_blocks=2, attn_max_res=32, head_dim=64),
    "base": dict(channels=64, mults=(1, 1, 2, 4, 8, 8), num_res_blocks=2, attn_max_res=32, head_dim=64),
}


def build_model(size: str, num_classes: int, tile_px: int) -> SynthUNet:
    """A fresh model of a named size for ``num_classes`` labels and ``tile_px`` tiles."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; sizes are {', '.join(SIZES)}")
    return SynthUNet(num_classes=num_classes, tile_px=tile_px, size=size, **SIZES[size])


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: SynthUNet, tile_px: int | None = None, batch: int = 1) -> float:
    """FLOPs of one forward pass (multiply-add = 2 FLOPs) per image, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` on the meta device where possible."""
    from torch.utils.flop_counter import FlopCounterMode

    px = tile_px or model.tile_px
    dev = next(model.parameters()).device
    x = torch.zeros(batch, 3, px, px, device=dev)
    cond = Cond.unconditional(batch, px, model.num_classes, 0.0, device=dev)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, torch.full((batch,), 0.5, device=dev), cond)
    return counter.get_total_flops() / batch


def model_cost(size: str, tile_px: int, num_classes: int = 2) -> dict:
    """``{"size", "tile_px", "params", "gflops"}`` for a named size; gflops per image forward."""
    with torch.device("meta"):
        model = build_model(size, num_classes, tile_px)
    return {
        "size": size,
        "tile_px": tile_px,
        "params": count_params(model),
        "gflops": forward_flops(model, tile_px) / 1e9,
    }


TRAIN_FLOPS_PER_FORWARD = 3.0
"""A training row costs a forward and a backward; the backward is two forwards' worth
(activation and weight gradients), so 3x the forward FLOPs."""

DP_STEP_OVERHEAD = {"hooks": 2.5, "ghost": 1.5}
"""DP step time / non-DP step time assumed for planning, per ``privacy.clipping``. hooks:
the middle of the 2.0-3.0x measured with Opacus hooks on one H100 (../shared/DESIGN.md);
ghost: the ceiling the ghost-clipping step is built for (one extra activation backward and a
weight-gradient pass: 4/3 in FLOPs; benchmarks/bench_dp.py measures it)."""


def train_flops_per_row(size: str, tile_px: int, num_classes: int = 2) -> float:
    """FLOPs to train on one row (one tile, one noise draw) without DP: 3x a forward."""
    return TRAIN_FLOPS_PER_FORWARD * model_cost(size, tile_px, num_classes)["gflops"] * 1e9


def cost_table(tile_px: int = 256, num_classes: int = 2) -> list[dict]:
    """:func:`model_cost` for every registered size."""
    return [model_cost(s, tile_px, num_classes) for s in SIZES]


if __name__ == "__main__":
    import sys

    px = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    print(f"{'size':<6} {'tile_px':>7} {'params (M)':>11} {'GFLOPs/fwd':>11}")
    for row in cost_table(px):
        print(f"{row['size']:<6} {row['tile_px']:>7} {row['params'] / 1e6:>11.2f} {row['gflops']:>11.1f}")
