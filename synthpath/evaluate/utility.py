"""Downstream utility: does a classifier trained on the data work on *real* held-out patients?

Settings (the hyperparameters are the same in every setting; only the training data differs):

- ``tstr``: train on synthetic tiles, test on real holdout tiles;
- ``trtr``: train on real training tiles, test on the same real holdout tiles (the reference);
- ``mixed``: train on real plus synthetic tiles.

The validation split used to pick the epoch is cut from the *training* side only (by group:
patient for real tiles, synthetic slide for synthetic tiles), never from the test patients,
because choosing anything on the test patients would leak them (and break a DP guarantee).

Metrics: accuracy, balanced accuracy, macro one-vs-rest AUROC (plain AUROC for two classes),
per seed, then mean with a 95% Student-t confidence interval over seeds.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F


# --------------------------------------------------------------------------- model
class SmallCNN(nn.Module):
    """Four conv blocks (conv-GroupNorm-ReLU, stride-2 downsampling) and a linear head.

    Works for any input size (global average pooling); ~100k parameters at width 32, so it
    trains in seconds on a CPU at 64 px.
    """

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        chans = [3, width // 2, width, width * 2, width * 2]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(chans, chans[1:])):
            layers += [nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1),
                       nn.GroupNorm(min(8, b), b), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.head(h.mean(dim=(2, 3)))


def build_classifier(name: str, num_classes: int) -> nn.Module:
    """``smallcnn``, or a torchvision / timm architecture name when that library is importable."""
    if name == "smallcnn":
        return SmallCNN(num_classes)
    errors = []
    try:
        import torchvision  # noqa: F401
        from torchvision import models as tvm

        try:
            return tvm.get_model(name, weights=None, num_classes=num_classes)
        except (ValueError, KeyError) as e:
            errors.append(f"torchvision: {e}")
    except ImportError:
        errors.append("torchvision is not installed")
    try:
        import timm

        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes)
        except (RuntimeError, ValueError) as e:
            errors.append(f"timm: {e}")
    except ImportError:
        errors.append("timm is not installed")
    raise ValueError(f"evaluate.classifier: cannot build {name!r} ({'; '.join(errors)}); use 'smallcnn' "
                     f"or install torchvision/timm")


# --------------------------------------------------------------------------- data helpers
@dataclass
class Hyper:
    """Fixed classifier hyperparameters, shared by every setting."""

    classifier: str = "smallcnn"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float32 [N,3,H,W] in [-1,1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def carve_validation(labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the validation rows, taken from the training side.

    With two or more groups, whole groups go to validation (shuffled, until ``fraction`` of
    the rows is reached, leaving at least one group for training), so tiles of one patient or
    one synthetic slide are never on both sides. With a single group, rows are split per
    class. Sets of fewer than 4 rows get no validation split (the last epoch is used).
    """
    n = len(labels)
    mask = np.zeros(n, dtype=bool)
    if n < 4:
        return mask
    rng = np.random.default_rng(seed)
    target = max(1, int(round(fraction * n)))
    if groups is not None:
        uniq = np.unique(groups)
        if len(uniq) >= 2:
            for g in rng.permutation(uniq)[:-1]:
                if mask.sum() >= target:
                    break
                mask |= groups == g
            if 0 < mask.sum() < n:
                return mask
            mask[:] = False
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(fraction * len(idx)))
        if k and k < len(idx):
            mask[rng.choice(idx, k, replace=False)] = True
    if not mask.any():
        mask[rng.choice(n, target, replace=False)] = True
    return mask


# --------------------------------------------------------------------------- metrics
def auroc_binary(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney rank statistic (ties count half)."""
    y = np.asarray(y).astype(bool)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        raise ValueError("AUROC needs both positive and negative examples")
    ranks = stats.rankdata(score)
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def classification_metrics(y: np.ndarray, probs: np.ndarray, num_classes: int) -> dict:
    """Accuracy, balanced accuracy, macro AUROC and the confusion matrix.

    Balanced accuracy and AUROC average over the classes present in ``y``; AUROC is ``None``
    (with a note) when fewer than two classes are present.
    """
    y = np.asarray(y, dtype=np.int64)
    pred = probs.argmax(axis=1)
    present = np.unique(y)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    out = {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.mean([(pred[y == c] == c).mean() for c in present])),
        "confusion": cm.tolist(),
        "classes_present": present.tolist(),
    }
    if len(present) < 2:
        out["auroc"] = None
        out["auroc_note"] = "only one class among the test tiles"
    elif num_classes == 2:
        out["auroc"] = auroc_binary(y == 1, probs[:, 1])
    else:
        out["auroc"] = float(np.mean([auroc_binary(y == c, probs[:, c]) for c in present]))
    return out


def mean_ci(values: Sequence[float], level: float = 0.95, bounds: tuple[float, float] | None = (0.0, 1.0)) -> dict:
    """Mean and a Student-t confidence interval over repeated seeds (none for one seed).

    The interval is clipped to ``bounds`` (the metrics here all live in [0, 1]); with few
    seeds the t quantile is large (12.7 for two seeds), so clipping is common and honest.
    """
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "std": None, "n": 0}
    m = float(v.mean())
    if v.size < 2:
        return {"mean": m, "ci_low": None, "ci_high": None, "std": None, "n": 1}
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, v.size - 1) * sd / math.sqrt(v.size))
    lo, hi = m - half, m + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": m, "ci_low": lo, "ci_high": hi, "std": sd, "n": int(v.size)}


# --------------------------------------------------------------------------- training
def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random flips and 90° rotations: label-preserving for histology tiles."""
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(3)
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(2)
    k = int(torch.randint(0, 4, (), generator=g))
    return torch.rot90(x, k, dims=(2, 3)) if x.shape[2] == x.shape[3] else x


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, batch_size: int = 128, device="cpu") -> np.ndarray:
    """Softmax probabilities [N, C] for uint8 images [N,H,W,3]."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_tensor(images[i : i + batch_size]).to(device)
        with _autocast(device):
            logits = model(x)
        out.append(F.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def _autocast(device):
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    hp: Hyper,
    seed: int,
    *,
    groups: np.ndarray | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict]:
    """Train one classifier; the epoch with the best validation balanced accuracy is kept.

    Returns the model and a log (validation size, chosen epoch, per-epoch validation scores).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("no training images")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    val = carve_validation(labels, groups, hp.val_fraction, seed)
    tr_x, tr_y = images[~val], labels[~val]
    va_x, va_y = images[val], labels[val]

    torch.manual_seed(seed)
    model = build_classifier(hp.classifier, num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    g = torch.Generator().manual_seed(seed)
    # class-balanced loss weights so a skewed training set does not just learn the prior
    counts = np.bincount(tr_y, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
    weight = torch.tensor(w, dtype=torch.float32, device=device)

    best_state, best_score, best_epoch, history = None, -1.0, hp.epochs, []
    for epoch in range(1, hp.epochs + 1):
        model.train()
        order = torch.randperm(len(tr_y), generator=g).numpy()
        for i in range(0, len(order), hp.batch_size):
            idx = order[i : i + hp.batch_size]
            x = _augment(to_tensor(tr_x[idx]), g).to(device)
            y = torch.from_numpy(tr_y[idx]).to(device)
            with _autocast(device):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if len(va_y):
            score = classification_metrics(va_y, predict_proba(model, va_x, device=device), num_classes)["balanced_accuracy"]
            history.append(round(score, 6))
            if score > best_score:
                best_score, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    log = {"n_train": int(len(tr_y)), "n_val": int(len(va_y)), "chosen_epoch": int(best_epoch),
           "val_balanced_accuracy": history}
    return model, log


@dataclass
class Split:
    """Images [N,H,W,3] uint8 with labels and (optional) grouping ids for validation."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return int(len(self.labels))

    @staticmethod
    def concat(parts: Sequence["Split"]) -> "Split":
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("nothing to concatenate")
        groups = None
        if all(p.groups is not None for p in parts):
            groups = np.concatenate([np.asarray([f"{i}:{g}" for g in p.groups]) for i, p in enumerate(parts)])
        return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]), groups)


def run_setting(train: Split, test: Split, num_classes: int, hp: Hyper, seeds: Sequence[int],
                device: str | torch.device = "cpu") -> dict:
    """Train on ``train`` once per seed, test each on ``test``; per-seed metrics plus summaries."""
    if len(test) == 0:
        raise ValueError("no test images")
    runs = []
    for seed in seeds:
        model, log = train_classifier(train.images, train.labels, num_classes, hp, seed, groups=train.groups, device=device)
        m = classification_metrics(test.labels, predict_proba(model, test.images, device=device), num_classes)
        runs.append({"seed": int(seed), **log, **m})
    summary = {k: mean_ci([r[k] for r in runs]) for k in ("accuracy", "balanced_accuracy", "auroc")}
    confusion = np.sum([np.asarray(r["confusion"]) for r in runs], axis=0).tolist()
    return {"runs": runs, "summary": summary, "confusion_summed_over_seeds": confusion,
            "n_train_total": len(train), "n_test": len(test), "seeds": [int(s) for s in seeds]}


def ratio(a: dict, b: dict, key: str) -> float | None:
    """``a[key].mean / b[key].mean`` on two settings' summaries (None when undefined)."""
    x, y = a["summary"][key]["mean"], b["summary"][key]["mean"]
    if x is None or y is None or y == 0:
        return None
    return float(x / y)
