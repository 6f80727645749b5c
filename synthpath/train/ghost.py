"""Per-unit gradient norms and clipped gradient sums without per-sample gradients.

DP-SGD needs, for every privacy unit u (a tile's K rows, or a patient's T*K rows), the norm
of the unit's gradient ``g_u = sum_{i in u} grad loss_i`` and then ``sum_u c_u g_u`` with
``c_u = min(1, C / ||g_u||)``. Opacus' hooks materialise ``grad loss_i`` for every row and
parameter (``grad_sample``), which costs a copy of the model per row and several passes over
it. Here nothing per-row is kept beyond what one layer needs at a time:

1. **Norms.** A forward hook keeps each parametrised layer's input ``A`` and output; one
   ``torch.autograd.grad`` of the loss with respect to those outputs gives every layer's
   output gradient ``G`` (no weight gradients are formed). For a layer whose weight gradient
   is ``sum_t G[t] A[t]^T`` (Linear; Conv2d after unfolding), the squared norm of a unit is
   ``sum_{i,j in u} <A_i A_j^T, G_i G_j^T>`` (the Gram / "ghost norm" trick, with the cross
   terms between the rows of one unit), or, where that is cheaper, the unit's gradient for
   that one layer is formed, measured and dropped ("mixed ghost clipping": a conv at high
   resolution has far more positions than weights, a small feature map the opposite).
   Conv2d per-row gradients come from one grouped weight-gradient convolution (no unfold).
2. **Clipped sum, no second backward.** Every row's output gradient scaled by its unit's
   clip factor is the output gradient of the clipped loss (rows do not interact: GroupNorm
   is per sample, attention within a sample), so each layer's clipped weight gradient is one
   ordinary weight-gradient product of ``A`` with ``c G`` (``conv2d_weight``, a matmul, an
   ``index_add``). This is the "book-keeping" form of ghost clipping: one forward, one
   activation backward, the norms, one weight-gradient pass.

Supported layers are the UNet's: ``Conv2d`` (any stride, padding, dilation, groups;
zero padding), ``Linear``, ``GroupNorm``, ``Embedding``. :func:`norm_sample` has Opacus'
norm-sampler signature and :func:`register_opacus_norm_samplers` installs the Conv2d and
GroupNorm ones into Opacus' ``GradSampleModuleFastGradientClipping``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding)


def _fold(per_row: Tensor, unit: Tensor, n_units: int) -> Tensor:
    """Sum per-row tensors [B, ...] into per-unit ones [U, ...]."""
    if n_units == per_row.shape[0] and torch.equal(unit, torch.arange(n_units, device=unit.device)):
        return per_row
    out = torch.zeros((n_units, *per_row.shape[1:]), device=per_row.device, dtype=per_row.dtype)
    return out.index_add_(0, unit, per_row)


def _sq(x: Tensor) -> Tensor:
    return x.float().pow(2).reshape(x.shape[0], -1).sum(1)


def _same_unit(unit: Tensor) -> Tensor:
    return (unit[:, None] == unit[None, :]).float()


def _pair_norm_sq(aa: Tensor, gg: Tensor, unit: Tensor, n_units: int) -> Tensor:
    """``sum_{i,j in u} aa_ij gg_ij`` per unit, for row-by-row Gram matrices [B, B]."""
    pair = aa * gg * _same_unit(unit)
    return torch.zeros(n_units, device=aa.device).index_add_(0, unit, pair.sum(1))


# --------------------------------------------------------------------------- per layer
def _linear(layer: nn.Linear, a: Tensor, g: Tensor, unit: Tensor, n: int) -> dict:
    a = a.to(g.dtype).reshape(a.shape[0], -1, a.shape[-1]).float()
    g = g.reshape(g.shape[0], -1, g.shape[-1]).float()
    out = {}
    b, t, din = a.shape
    dout = g.shape[-1]
    if layer.weight.requires_grad:
        if t == 1:  # one token per row: the Gram is B x B
            out[layer.weight] = _pair_norm_sq(a[:, 0] @ a[:, 0].T, g[:, 0] @ g[:, 0].T, unit, n)
        elif b * t * t * (din + dout) < b * t * din * dout:  # per-row Gram, cross-row terms by folding
            out[layer.weight] = _gram_units(a, g, unit, n)
        else:
            out[layer.weight] = _sq(_fold(torch.bmm(g.transpose(1, 2), a), unit, n))
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = _sq(_fold(g.sum(1), unit, n))
    return out


def _gram_units(a: Tensor, g: Tensor, unit: Tensor, n: int) -> Tensor:
    """Unit norms of ``sum_i G_i^T A_i`` by Gram matrices over the tokens of each row pair in
    a unit (only pairs in the same unit are formed)."""
    out = torch.zeros(n, device=a.device)
    rows = [torch.nonzero(unit == u).flatten() for u in range(n)]
    for u, idx in enumerate(rows):
        if idx.numel() == 0:
            continue
        au, gu = a[idx].reshape(-1, a.shape[-1]), g[idx].reshape(-1, g.shape[-1])
        out[u] = ((au @ au.T) * (gu @ gu.T)).sum()
    return out


def _conv_rows(layer: nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """Per-row weight gradients [B, cout, cin/groups, kh, kw] by one grouped weight-gradient
    convolution: the batch becomes extra groups."""
    b = a.shape[0]
    w = layer.weight
    a1 = a.reshape(1, b * a.shape[1], *a.shape[2:])
    g1 = g.reshape(1, b * g.shape[1], *g.shape[2:])
    shape = (b * w.shape[0], *w.shape[1:])
    gw = torch.nn.grad.conv2d_weight(a1, shape, g1, stride=layer.stride, padding=layer.padding,
                                     dilation=layer.dilation, groups=b * layer.groups)
    return gw.reshape(b, *w.shape)


def _conv(layer: nn.Conv2d, a: Tensor, g: Tensor, unit: Tensor, n: int) -> dict:
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise ValueError(f"ghost clipping supports zero-padded Conv2d with numeric padding, not {layer}")
    a = a.to(g.dtype)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = _sq(_fold(_conv_rows(layer, a, g), unit, n))
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = _sq(_fold(g.float().sum((2, 3)), unit, n))
    return out


def _group_norm_rows(layer: nn.GroupNorm, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    xhat = F.group_norm(a.float(), layer.num_groups, eps=layer.eps)
    dims = tuple(range(2, a.dim()))
    return (g.float() * xhat).sum(dims), g.float().sum(dims)


def _group_norm(layer: nn.GroupNorm, a: Tensor, g: Tensor, unit: Tensor, n: int) -> dict:
    gw, gb = _group_norm_rows(layer, a, g)
    out = {}
    if layer.weight is not None and layer.weight.requires_grad:
        out[layer.weight] = _sq(_fold(gw, unit, n))
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = _sq(_fold(gb, unit, n))
    return out


def _embedding_tokens(layer: nn.Embedding, idx: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    if layer.max_norm is not None or layer.sparse:
        raise ValueError("ghost clipping does not support Embedding with max_norm or sparse gradients")
    b = idx.shape[0]
    idx = idx.reshape(b, -1)
    g = g.float().reshape(b, idx.shape[1], -1)
    if layer.padding_idx is not None:
        g = g * (idx != layer.padding_idx).unsqueeze(-1)
    return idx, g


def _embedding(layer: nn.Embedding, idx: Tensor, g: Tensor, unit: Tensor, n: int) -> dict:
    if not layer.weight.requires_grad:
        return {}
    idx, g = _embedding_tokens(layer, idx, g)
    b, t = idx.shape
    tok_unit = unit.repeat_interleave(t)
    fi, fg = idx.reshape(-1), g.reshape(b * t, -1)
    same = (fi[:, None] == fi[None, :]).float()
    return {layer.weight: _pair_norm_sq(same, fg @ fg.T, tok_unit, n)}


def unit_norm_sq(layer: nn.Module, a: Tensor, g: Tensor, unit: Tensor, n_units: int) -> dict:
    """``{parameter: [n_units] squared norms}`` of the per-unit gradients of ``layer``'s
    parameters, from its input ``a`` and output gradient ``g`` (rows in dim 0)."""
    if isinstance(layer, nn.Conv2d):
        return _conv(layer, a, g, unit, n_units)
    if isinstance(layer, nn.Linear):
        return _linear(layer, a, g, unit, n_units)
    if isinstance(layer, nn.GroupNorm):
        return _group_norm(layer, a, g, unit, n_units)
    if isinstance(layer, nn.Embedding):
        return _embedding(layer, a, g, unit, n_units)
    raise TypeError(f"no ghost norm for {type(layer).__name__}")


def add_weighted_grads(layer: nn.Module, a: Tensor, g: Tensor, row_scale: Tensor) -> None:
    """Add ``sum_i row_scale_i * grad_i`` to each parameter's ``.grad`` (fp32, like the params)."""
    gs = g * row_scale.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))

    def put(p, v):
        if p is None or not p.requires_grad:
            return
        v = v.to(p.dtype).reshape(p.shape)
        p.grad = v if p.grad is None else p.grad.add_(v)

    if isinstance(layer, nn.Conv2d):
        put(layer.weight, torch.nn.grad.conv2d_weight(a.to(gs.dtype), layer.weight.shape, gs, stride=layer.stride,
                                                      padding=layer.padding, dilation=layer.dilation,
                                                      groups=layer.groups))
        put(layer.bias, gs.float().sum((0, 2, 3)))
    elif isinstance(layer, nn.Linear):
        a2 = a.to(gs.dtype).reshape(-1, a.shape[-1])
        g2 = gs.reshape(-1, gs.shape[-1])
        put(layer.weight, g2.T @ a2)
        put(layer.bias, g2.float().sum(0))
    elif isinstance(layer, nn.GroupNorm):
        gw, gb = _group_norm_rows(layer, a, gs)
        put(layer.weight, gw.sum(0))
        put(layer.bias, gb.sum(0))
    elif isinstance(layer, nn.Embedding):
        idx, tg = _embedding_tokens(layer, a, gs)
        w = torch.zeros(layer.weight.shape, device=tg.device, dtype=torch.float32)
        put(layer.weight, w.index_add_(0, idx.reshape(-1), tg.reshape(-1, tg.shape[-1])))
    else:
        raise TypeError(f"no ghost gradient for {type(layer).__name__}")


# --------------------------------------------------------------------------- Opacus
def norm_sample(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict:
    """Opacus norm-sampler signature: per-row gradient norms ``{param: [B]}``."""
    b = backprops.shape[0]
    unit = torch.arange(b, device=backprops.device)
    return {p: v.clamp(min=0).sqrt() for p, v in unit_norm_sq(layer, activations[0], backprops, unit, b).items()}


def register_opacus_norm_samplers() -> None:
    """Install :func:`norm_sample` as Opacus' norm sampler for Conv2d and GroupNorm (Opacus
    has Linear and Embedding ones of its own), so ``GradSampleModuleFastGradientClipping``
    with ghost clipping covers the whole UNet."""
    from opacus.grad_sample.utils import register_norm_sampler

    register_norm_sampler([nn.Conv2d, nn.GroupNorm])(norm_sample)


# --------------------------------------------------------------------------- the model wrapper
class GhostClipper:
    """Hooks on every parametrised layer of ``model``; :meth:`clip_and_accumulate` turns a
    chunk's per-row losses into ``sum_u min(1, C/||g_u||) g_u`` in ``p.grad``."""

    def __init__(self, model: nn.Module, max_grad_norm: float):
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.layers: list[nn.Module] = []
        bad = []
        for name, m in model.named_modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if type(m) not in SUPPORTED:
                bad.append(f"{name or '<root>'} ({type(m).__name__})")
            self.layers.append(m)
        if bad:
            raise ValueError(f"ghost clipping has no per-sample norm for these layers: {', '.join(bad)}")
        self._records: dict[nn.Module, tuple[Tensor, Tensor]] = {}
        self._capture = False
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module, inputs, output) -> None:
        if not self._capture or not torch.is_grad_enabled():
            return
        if module in self._records:
            raise RuntimeError(f"ghost clipping needs each layer called once per forward; "
                               f"{type(module).__name__} was called again")
        self._records[module] = (inputs[0].detach(), output)

    def capture(self):
        """Context: record layer inputs/outputs for the forward passes inside it."""
        clipper = self

        class _Ctx:
            def __enter__(self):
                clipper._records.clear()
                clipper._capture = True

            def __exit__(self, *exc):
                clipper._capture = False
                return False

        return _Ctx()

    def clip_and_accumulate(self, row_loss: Tensor, unit: Tensor, n_units: int) -> Tensor:
        """Backward of ``row_loss`` (already weighted per row) recorded under :meth:`capture`:
        adds the clipped per-unit gradient sum to ``p.grad``; returns the unit norms."""
        mods = [m for m in self.layers if m in self._records]
        outs = [self._records[m][1] for m in mods]
        grads = torch.autograd.grad(row_loss.sum(), outs, allow_unused=True)
        unit = unit.to(row_loss.device)
        norm_sq = torch.zeros(n_units, device=row_loss.device)
        live = []
        for m, g in zip(mods, grads):
            if g is None:
                continue
            a = self._records[m][0]
            for v in unit_norm_sq(m, a, g, unit, n_units).values():
                norm_sq += v.float()
            live.append((m, a, g))
        norms = norm_sq.clamp(min=0).sqrt()
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        row_scale = factor[unit]
        for m, a, g in live:
            add_weighted_grads(m, a, g, row_scale)
        self._records.clear()
        return norms

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
