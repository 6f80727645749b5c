"""One way to make a model ready for sampling, shared by production and the benchmarks.

:func:`prepare_model` is what ``generate`` (``generate/runner.py``) and
``benchmarks/bench_sampling.py`` / ``bench_generate.py`` call, so a benchmark measures the
production path: eval mode, no gradients, and on CUDA channels-last weights, cuDNN autotuning
(``cudnn.benchmark``), TF32 matmuls, and optionally ``torch.compile`` in one mode
(:data:`COMPILE_MODE`). bf16 autocast on CUDA happens inside every forward
(:func:`synthpath.models.diffusion.predict_v`), and the solvers' step loops never read a
device tensor back, so nothing in a step waits on the GPU.
"""

from __future__ import annotations

import torch

#: the one torch.compile mode used everywhere. Autotuned kernels without CUDA graphs: the
#: batch size changes between waves and levels, and re-recording graphs per size costs more
#: than it saves at the batch sizes used here.
COMPILE_MODE = "max-autotune-no-cudagraphs"


def prepare_model(model: torch.nn.Module, device: torch.device | str, *, compile: bool = False) -> torch.nn.Module:
    """``model`` on ``device`` in eval mode without gradients; on CUDA also channels-last,
    ``cudnn.benchmark`` and TF32; ``compile=True`` wraps it in ``torch.compile`` with
    :data:`COMPILE_MODE` (the wrapper keeps ``.config``/``num_classes`` reachable through
    :func:`synthpath.models.unet.unwrap`)."""
    dev = torch.device(device)
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if compile:
        model = torch.compile(model, mode=COMPILE_MODE)
    return model


__all__ = ["prepare_model", "COMPILE_MODE"]
