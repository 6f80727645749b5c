"""synthpath.models: the magnification-aware diffusion UNet, its schedule, samplers and checkpoints.

Public entry points (see docs/architecture.md §2):
``build_model``, ``SynthUNet``, ``Cond``, ``diffusion_loss``, ``drop_conditions``, ``denoise``,
``SAMPLERS`` / ``sample_ddim`` / ``sample_dpmpp_2m``, ``initial_noise``, ``zoom_start``,
``save_checkpoint``, ``load_model``, ``prepare_model`` (the one model preparation for sampling).
"""

from .checkpoint import load_config, load_model, save_checkpoint
from .conditioning import Cond
from .diffusion import denoise, diffusion_loss, drop_conditions
from .prepare import COMPILE_MODE, prepare_model
from .registry import SIZES, build_model, cost_table, model_cost
from .samplers import SAMPLERS, derive_seed, initial_noise, sample, sample_ddim, sample_dpmpp_2m, zoom_start
from .unet import SynthUNet, unwrap

__all__ = [
    "Cond",
    "SynthUNet",
    "SIZES",
    "SAMPLERS",
    "build_model",
    "cost_table",
    "model_cost",
    "diffusion_loss",
    "drop_conditions",
    "denoise",
    "sample",
    "sample_ddim",
    "sample_dpmpp_2m",
    "initial_noise",
    "zoom_start",
    "derive_seed",
    "save_checkpoint",
    "load_model",
    "load_config",
    "unwrap",
    "prepare_model",
    "COMPILE_MODE",
]
