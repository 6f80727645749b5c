"""A pixel-space, magnification-aware diffusion UNet that Opacus can privatise.

Only layers with Opacus per-sample-gradient support carry parameters: ``Conv2d``,
``Linear``, ``GroupNorm`` and ``Embedding``. Attention is ``Linear`` q/k/v/out
projections around ``F.scaled_dot_product_attention`` (which has no parameters). There is
no BatchNorm, no registered buffer, and no in-place op on activations, so
``ModuleValidator.validate(model, strict=True)`` is empty and Opacus' hooks see every
activation they need.

Inputs (10 channels): the noisy tile ``x_t`` (3), the parent crop (3, multiplied by the
``has_parent`` flag), known pixels (3, multiplied by the mask) and the mask (1). The
timestep, level (log-mpp), label (with a null entry) and has-parent flag are embedded,
summed into one vector, and applied in every residual block as a GroupNorm scale/shift
(ADM's adaptive group norm). That is ZoomLDM's "one network for all magnifications"
with URCDM's parent-conditioned cascade folded into the input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conditioning import Cond

IN_CHANNELS = 10  # x_t 3 + parent 3 + known 3 + mask 1


def _groups(ch: int) -> int:
    """The largest group count <= 32 that divides ``ch`` with at least 4 channels a group."""
    g = 32
    while g > 1 and (ch % g or ch // g < 4):
        g //= 2
    return g


def sinusoidal(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of a [B] float tensor, computed on the fly (no buffers)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the condition vector as scale/shift of the second norm."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (ADM)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return (x if self.skip is None else self.skip(x)) + h


class Attention(nn.Module):
    """Multi-head self-attention over pixels from Linear projections and SDPA."""

    def __init__(self, ch: int, head_dim: int = 64):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = nn.Linear(ch, ch)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.qkv(tokens).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, d]
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CondEmbedding(nn.Module):
    """Timestep + level + label + has-parent -> one conditioning vector."""

    def __init__(self, ch: int, emb_dim: int, num_classes: int):
        super().__init__()
        self.ch = ch
        self.time = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.level = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(num_classes + 1, emb_dim)  # index num_classes = null label
        self.parent = nn.Embedding(2, emb_dim)

    def forward(self, t: Tensor, cond: Cond) -> Tensor:
        # t in [0,1] -> 0..1000 so the sinusoid spans the usual range; log-mpp (about -3..4)
        # is scaled so neighbouring 2x levels (ln 2 apart) differ clearly.
        e = self.time(sinusoidal(t * 1000.0, self.ch))
        e = e + self.level(sinusoidal(cond.log_mpp * 100.0, self.ch))
        e = e + self.label(cond.label) + self.parent(cond.has_parent.long())
        return F.silu(e)


class SynthUNet(nn.Module):
    """The UNet. ``model(x_t, t, cond)`` returns the v-prediction [B,3,H,W]."""

    def __init__(
        self,
        *,
        num_classes: int,
        tile_px: int,
        channels: int = 32,
        mults: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        attn_max_res: int = 16,
        head_dim: int = 64,
        size: str = "custom",
        logsnr_shift: float | None = None,
    ):
        super().__init__()
        mults = tuple(int(m) for m in mults)
        factor = 2 ** (len(mults) - 1)
        if tile_px % factor:
            raise ValueError(f"tile_px {tile_px} must be a multiple of 2**(len(mults)-1) = {factor} for model size {size!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if logsnr_shift is None:
            # simple diffusion (Hoogeboom et al. 2023): larger images need more noise for the
            # same perceived corruption; shift log-SNR by 2 ln(64 / px) relative to 64 px.
            logsnr_shift = 2.0 * math.log(64.0 / tile_px)
        self.config = {
            "arch": "SynthUNet",
            "size": size,
            "num_classes": int(num_classes),
            "tile_px": int(tile_px),
            "channels": int(channels),
            "mults": list(mults),
            "num_res_blocks": int(num_res_blocks),
            "attn_max_res": int(attn_max_res),
            "head_dim": int(head_dim),
            "logsnr_shift": float(logsnr_shift),
        }
        self.num_classes = num_classes
        self.tile_px = tile_px
        emb_dim = 4 * channels
        self.embed = CondEmbedding(channels, emb_dim, num_classes)
        self.in_conv = nn.Conv2d(IN_CHANNELS, channels, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [channels]
        cur, res = channels, tile_px
        for i, m in enumerate(mults):
            for _ in range(num_res_blocks):
                blk = nn.ModuleList([ResBlock(cur, channels * m, emb_dim)])
                cur = channels * m
                if res <= attn_max_res:
                    blk.append(Attention(cur, head_dim))
                self.down.append(blk)
                skips.append(cur)
            if i < len(mults) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skips.append(cur)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim)])
        if res <= attn_max_res:
            self.mid.append(Attention(cur, head_dim))
        self.mid.append(ResBlock(cur, cur, emb_dim))

        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            for j in range(num_res_blocks + 1):
                blk = nn.ModuleList([ResBlock(cur + skips.pop(), channels * m, emb_dim)])
                cur = channels * m
                if res <= attn_max_res:
                    blk.append(Attention(cur, head_dim))
                if i > 0 and j == num_res_blocks:
                    blk.append(Upsample(cur))
                    res *= 2
                self.up.append(blk)

        self.out_norm = nn.GroupNorm(_groups(cur), cur)
        self.out_conv = nn.Conv2d(cur, 3, 3, padding=1)

    @classmethod
    def from_config(cls, cfg: dict) -> "SynthUNet":
        if cfg.get("arch", "SynthUNet") != "SynthUNet":
            raise ValueError(f"model config names architecture {cfg.get('arch')!r}, expected 'SynthUNet'")
        keys = ("num_classes", "tile_px", "channels", "mults", "num_res_blocks", "attn_max_res", "head_dim", "size", "logsnr_shift")
        missing = [k for k in keys[:2] if k not in cfg]
        if missing:
            raise ValueError(f"model config is missing {missing}")
        return cls(**{k: (tuple(cfg[k]) if k == "mults" else cfg[k]) for k in keys if k in cfg})

    @staticmethod
    def _run(blk: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for layer in blk:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        b, _, hgt, wid = x_t.shape
        if hgt != wid or hgt % (2 ** (len(self.config["mults"]) - 1)):
            raise ValueError(f"input tile must be square with side a multiple of {2 ** (len(self.config['mults']) - 1)}, got {hgt}x{wid}")
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        if t.dim() == 0:
            t = t.expand(b)
        hp = cond.has_parent.to(x_t.dtype)[:, None, None, None]
        mask = cond.mask.to(x_t.dtype)
        inp = torch.cat([x_t, cond.parent.to(x_t.dtype) * hp, cond.known.to(x_t.dtype) * mask, mask], dim=1)
        emb = self.embed(t, cond)
        h = self.in_conv(inp)
        hs = [h]
        for blk in self.down:
            h = self._run(blk, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for blk in self.up:
            h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(blk, h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside Opacus' GradSampleModule, torch.compile or DataParallel wrappers
    (and ``torch.optim.swa_utils.AveragedModel``)."""
    seen = 0
    while not isinstance(model, SynthUNet) and seen < 8:
        for attr in ("_module", "_orig_mod", "module"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            break
        seen += 1
    return model


def model_config(model: nn.Module) -> dict:
    m = unwrap(model)
    cfg = getattr(m, "config", None)
    if not isinstance(cfg, dict):
        raise TypeError(f"{type(model).__name__} is not a SynthUNet (no .config dict)")
    return cfg
