"""Checkpoints as safetensors + JSON: loading never unpickles, so it never runs code.

A checkpoint folder holds
- ``model.safetensors``: the EMA weights (the ones sampled from);
- ``model_raw.safetensors``: the raw (optimised) weights;
- ``config.json``: ``{"model": <SynthUNet config>, ...extra}`` where ``extra`` is whatever
  the caller adds (tile_px, levels, classes, training step...).
Every file is written to a temporary name first and moved into place with ``os.replace``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .unet import SynthUNet, model_config, unwrap

EMA_FILE = "model.safetensors"
RAW_FILE = "model_raw.safetensors"
CONFIG_FILE = "config.json"


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    inner = unwrap(model)
    if not isinstance(inner, SynthUNet):
        raise TypeError(f"expected a SynthUNet (possibly wrapped), got {type(model).__name__}")
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in inner.state_dict().items()}


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def save_checkpoint(
    dir: str | Path, model: torch.nn.Module, ema_model: torch.nn.Module | None, extra: dict | None = None
) -> Path:
    """Write ``model.safetensors`` (EMA weights, or the raw ones when ``ema_model`` is None),
    ``model_raw.safetensors`` and ``config.json`` into ``dir``; returns ``dir``."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    if "model" in extra:
        raise ValueError("checkpoint extra must not use the key 'model' (it holds the model config)")
    cfg = model_config(model)
    raw = _state(model)
    ema = _state(ema_model) if ema_model is not None else raw
    if set(ema) != set(raw):
        raise ValueError("EMA model and model have different parameter names; were they built from the same config?")
    meta = {"format": "synthpath", "size": str(cfg.get("size"))}
    _atomic_save(raw, d / RAW_FILE, meta)
    _atomic_save(ema, d / EMA_FILE, meta)
    text = json.dumps({"model": cfg, **extra}, indent=2, sort_keys=True, default=str)
    tmp = d / (CONFIG_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, d / CONFIG_FILE)
    return d


def load_config(dir: str | Path) -> dict:
    """The checkpoint's ``config.json`` as a dict (raises a clear error if missing or bad)."""
    p = Path(dir) / CONFIG_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint config at {p}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ValueError(f"{p} has no 'model' section with the model config")
    return cfg


def load_model(dir: str | Path, device: torch.device | str = "cpu", ema: bool = True) -> SynthUNet:
    """Rebuild the model from ``config.json`` and load EMA (default) or raw weights; eval mode."""
    d = Path(dir)
    cfg = load_config(d)
    path = d / (EMA_FILE if ema else RAW_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    model = SynthUNet.from_config(cfg["model"])
    state = load_file(str(path), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()


__all__ = ["save_checkpoint", "load_model", "load_config", "EMA_FILE", "RAW_FILE", "CONFIG_FILE"]
