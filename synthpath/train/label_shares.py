"""Label shares under differential privacy.

The generate stage draws each synthetic slide's label from label shares. Taken as the exact
counts of the training tiles' labels, those shares would be a private statistic released
outside epsilon. Under DP they are released instead through a Gaussian mechanism, composed
with training in one accountant (one epsilon in the ledger and the card):

- Each privacy unit contributes a bounded vector. A patient (``unit: patient``) contributes
  the *shares* of its labelled coarsest-level training tiles (a vector summing to 1, so of L2
  norm at most 1), however many tiles it has; a tile (``unit: tile``) contributes the
  one-hot vector of its label (coarsest-level labelled tiles) or nothing. Adding or removing
  one unit changes the sum by at most 1 in L2: the sensitivity is 1.
- The sum gets Gaussian noise of standard deviation ``sigma_L`` from the private noise
  stream (:mod:`synthpath.train.dprandom`). ``sigma_L`` makes this one mechanism spend
  ``privacy.label_share_budget`` x ``privacy.target_epsilon`` on its own; the training's
  sigma is then calibrated so that both *composed* spend exactly ``target_epsilon``.
- Post-processing (free): negative noisy sums become 0 and the rest are normalised; if none
  is positive the shares are uniform.

With ``generate.label_proportions`` set, the recipe's proportions are used as public
knowledge and no budget is spent on labels (the ledger and the card say so).
"""

from __future__ import annotations

import numpy as np
import torch

from . import privacy as P

PUBLIC_NOTE = ("label shares are generate.label_proportions from the recipe, used as public knowledge "
               "(not computed from the training data); they cost no epsilon")


def unit_label_vectors(dataset, unit: str, n_classes: int) -> np.ndarray:
    """``[n_units, n_classes]``: each unit's bounded contribution (see the module doc)."""
    levels = np.asarray(dataset.item_levels)
    labels = np.asarray(dataset.labels)
    use = (levels == 0) & (labels >= 0) & (labels < n_classes)
    if unit == "tile":
        out = np.zeros((len(labels), n_classes))
        idx = np.flatnonzero(use)
        out[idx, labels[idx]] = 1.0
        return out
    groups = dataset.patient_groups()
    out = np.zeros((len(dataset.patients), n_classes))
    for p, items in groups.items():
        items = np.asarray(items, dtype=np.int64)
        mine = items[use[items]] if items.size else items
        if mine.size:
            out[p] = np.bincount(labels[mine], minlength=n_classes)[:n_classes] / mine.size
    return out


def plan_label_shares(pcfg, delta: float) -> dict:
    """The mechanism's parameters (drawn nothing yet): sigma for its share of the budget."""
    eps_l = float(pcfg.label_share_budget) * float(pcfg.target_epsilon)
    sigma = P.gaussian_sigma(epsilon=eps_l, delta=delta, accountant=pcfg.accountant)
    return {"source": "dp", "mechanism": "Gaussian, per-unit contributions bounded to L2 norm 1",
            "budget_share": float(pcfg.label_share_budget), "sensitivity_l2": 1.0, "sigma": sigma,
            "noise_std": sigma, "history": [[sigma, 1.0, 1]]}


def release_label_shares(block: dict, vectors: np.ndarray, noise_gen: torch.Generator) -> dict:
    """Draw the noise (from the private stream) and return ``block`` with the released
    ``noisy_sums`` and ``shares``. The exact sums are not kept."""
    n_classes = vectors.shape[1]
    exact = torch.as_tensor(vectors.sum(axis=0), dtype=torch.float64)
    noise = torch.randn(n_classes, generator=noise_gen, device=noise_gen.device, dtype=torch.float64).cpu()
    noisy = exact + block["noise_std"] * noise
    pos = noisy.clamp(min=0.0)
    shares = (pos / pos.sum()).tolist() if float(pos.sum()) > 0 else [1.0 / n_classes] * n_classes
    return {**block, "noisy_sums": [float(v) for v in noisy], "shares": [float(v) for v in shares],
            "post_processing": "negative noisy sums set to 0, then normalised (uniform if none is positive)"}


def public_label_shares(proportions: dict) -> dict:
    return {"source": "public", "key": "generate.label_proportions", "proportions": dict(proportions),
            "note": PUBLIC_NOTE}
