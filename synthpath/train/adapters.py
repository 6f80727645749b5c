"""What training updates (``privacy.trainable``), and low-rank adapters that Opacus can privatise.

Choices (a name, or a list of names):

- ``all``: every parameter (the default);
- ``conditioning``: the condition embedding (timestep, level, label, has-parent) and every
  residual block's projection of it into GroupNorm scale/shift (``ResBlock.emb``);
- ``norms``: every GroupNorm's scale and shift;
- ``attention``: the attention blocks (their norm and the q/k/v and output projections);
- ``lora``: a rank-``privacy.lora_rank`` adapter beside every ``Conv2d`` and ``Linear`` layer;
  the base weights are frozen. Combinable with the named parts (those train in full).

Everything not chosen gets ``requires_grad=False`` *before* Opacus wraps the model, so Opacus
computes, clips and noises only the chosen parameters: with fewer parameters the noise vector
(one Gaussian per coordinate, same sigma) has a smaller total norm against the same clipped
signal.

Adapters are plain ``nn.Conv2d``/``nn.Linear`` submodules (``down``: the base layer's kernel,
stride and padding onto ``r`` channels; ``up``: a 1x1 conv / linear back, zero-initialised so
training starts at the base model), so Opacus' own conv and linear grad samplers compute their
per-sample gradients and ``ModuleValidator.validate(strict=True)`` passes. ``peft`` was not used:
it is not installed here and pulls in transformers and accelerate for two small layers.

Checkpoints hold merged weights (:func:`merged`): ``W + (alpha / r) up @ down`` folded into
each base layer, so generate and audit load an ordinary model.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn

from ..pipeline import StageError

log = logging.getLogger("synthpath.train")

NAMED = ("conditioning", "norms", "attention")
LORA_ALPHA_PER_RANK = 1.0  # scale alpha / r with alpha = r: the adapter's update is up @ down


class LoRAConv2d(nn.Module):
    """``base(x) + scale * up(down(x))``; ``base`` frozen."""

    def __init__(self, base: nn.Conv2d, rank: int):
        super().__init__()
        if base.groups != 1:
            raise ValueError("LoRA needs an ungrouped convolution")
        self.base = base
        r = min(rank, base.in_channels * base.kernel_size[0] * base.kernel_size[1], base.out_channels)
        self.down = nn.Conv2d(base.in_channels, r, base.kernel_size, stride=base.stride, padding=base.padding,
                              dilation=base.dilation, bias=False, padding_mode=base.padding_mode)
        self.up = nn.Conv2d(r, base.out_channels, 1, bias=False)
        nn.init.zeros_(self.up.weight)
        self.scale = LORA_ALPHA_PER_RANK
        self.to(device=base.weight.device, dtype=base.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.up(self.down(x)) * self.scale

    def delta(self) -> Tensor:
        return torch.einsum("or,rikl->oikl", self.up.weight[:, :, 0, 0], self.down.weight) * self.scale


class LoRALinear(nn.Module):
    """``base(x) + scale * up(down(x))``; ``base`` frozen."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        r = min(rank, base.in_features, base.out_features)
        self.down = nn.Linear(base.in_features, r, bias=False)
        self.up = nn.Linear(r, base.out_features, bias=False)
        nn.init.zeros_(self.up.weight)
        self.scale = LORA_ALPHA_PER_RANK
        self.to(device=base.weight.device, dtype=base.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.up(self.down(x)) * self.scale

    def delta(self) -> Tensor:
        return (self.up.weight @ self.down.weight) * self.scale


ADAPTERS = (LoRAConv2d, LoRALinear)


def add_lora(model: nn.Module, rank: int) -> list[str]:
    """Replace every Conv2d/Linear in ``model`` by its adapter wrapper (in place); returns their names."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, ADAPTERS)]
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoRAConv2d(m, rank) if isinstance(m, nn.Conv2d) else LoRALinear(m, rank)
        setattr(parent, attr, wrapped)
    return [n for n, _ in targets]


def names_of(choice) -> list[str]:
    return [choice] if isinstance(choice, str) else list(choice)


def _named_parts(model: nn.Module, name: str) -> list[nn.Module]:
    from ..models.unet import Attention, CondEmbedding, ResBlock

    if name == "conditioning":
        return ([m for m in model.modules() if isinstance(m, CondEmbedding)]
                + [m.emb for m in model.modules() if isinstance(m, ResBlock)])
    if name == "norms":
        return [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    if name == "attention":
        return [m for m in model.modules() if isinstance(m, Attention)]
    raise StageError(f"privacy.trainable: unknown part {name!r}; choose all, lora, {', '.join(NAMED)}")


def apply_trainable(model: nn.Module, choice, lora_rank: int) -> dict:
    """Freeze what ``choice`` does not name (adding adapters for ``lora``); returns a summary
    (names, trainable and total parameter counts) for the ledger and the checkpoint."""
    names = names_of(choice)
    total = sum(p.numel() for p in model.parameters())
    summary = {"choice": names, "total_params": total}
    if names == ["all"]:
        for p in model.parameters():
            p.requires_grad_(True)
        summary["trainable_params"] = total
        return summary
    parts = [m for n in names if n != "lora" for m in _named_parts(model, n)]
    for p in model.parameters():
        p.requires_grad_(False)
    for m in parts:  # before the adapters: the named parts' base weights train in full
        for p in m.parameters():
            p.requires_grad_(True)
    if "lora" in names:
        wrapped = add_lora(model, lora_rank)
        for m in model.modules():
            if isinstance(m, ADAPTERS):
                m.down.weight.requires_grad_(True)
                m.up.weight.requires_grad_(True)
        summary["lora_rank"] = int(lora_rank)
        summary["lora_layers"] = len(wrapped)
        summary["adapter_params"] = sum(m.down.weight.numel() + m.up.weight.numel() for m in model.modules()
                                        if isinstance(m, ADAPTERS))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise StageError(f"privacy.trainable={choice!r} selects no parameter of this model")
    summary["trainable_params"] = n
    log.info("privacy.trainable=%s: %d of %d parameters train", names, n, total)
    return summary


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, ADAPTERS) for m in model.modules())


@torch.no_grad()
def merged(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no adapters; else a copy with every adapter folded into its
    base layer (``W + scale up @ down``) and replaced by it: an ordinary model."""
    if not has_adapters(model):
        return model
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, ADAPTERS):
            base = m.base
            base.weight.add_(m.delta().to(base.weight.dtype))
            parent_name, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, attr, base)
    for p in out.parameters():
        p.requires_grad_(False)
    return out
