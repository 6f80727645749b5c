"""Differential privacy for training: budget planning, the Opacus privacy wrappers, the ledger.

Both privacy units go through the same Opacus pieces -- ``GradSampleModule`` (per-row
gradients by hooks), ``DPOptimizer`` (per-unit clipping, Gaussian noise, scaling) and an
Opacus accountant -- and through the same training step (:mod:`synthpath.train.engine`).
What differs is what a *unit* is and who builds the pieces:

- ``unit: tile``: Opacus' own ``PrivacyEngine.make_private_with_epsilon`` (Poisson sampling
  over tiles, sample rate ``1 / ceil(N / batch_size)`` as Opacus defines it).
- ``unit: patient``: Opacus has no notion of a patient, so the pieces are assembled here:
  patients are Poisson-sampled with rate ``q = batch_size / n_patients``, ``tiles_per_patient``
  tiles are drawn from each, and their per-tile gradients (times ``noise_multiplicity``
  draws of (t, noise)) are averaged into one gradient per patient before ``DPOptimizer``
  clips it. sigma comes from ``opacus.accountants.utils.get_noise_multiplier``.

Per-row gradients use Opacus' hooks (``GradSampleModule``) rather than ``torch.func.vmap``:
the model is an ordinary ``nn.Module`` with a dataclass of conditions, the hooks need no
functional rewrite of it, compute each layer's per-sample gradient from activations
layer by layer (less peak memory), and measured faster than functorch on UNets (the
reference runs in ../shared/DESIGN.md: 2.7x vs 4.8x overhead).

Rows are folded into units *before* clipping (:func:`fold_grad_samples`), which is how
both DPDM's noise multiplicity (K rows per tile) and patient-level DP (T*K rows per
patient) keep one unit's total contribution to a step at most ``max_grad_norm``.

Normalisation (Opacus issue #819): the hooks see ``loss_reduction="sum"`` (raw per-row
gradients), and the noised sum is divided by the *expected* number of units ``q * n``, a
public constant, never by the realised Poisson batch size.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..pipeline import StageError

AUTO_DELTA_FACTOR = 10
"""``delta: auto`` is ``1 / (AUTO_DELTA_FACTOR * n_units)``: an order of magnitude below 1/n."""

MIN_UNITS = 50
"""Fewer privacy units than this gives a guarantee too weak to mean much: warn and record."""

SIGMA_CAP = 1000.0
"""A target epsilon that needs more noise than this is refused as unreachable."""

NO_GUARANTEE = ("privacy.enabled is false: the model was trained without differential privacy, so no "
                "formal privacy guarantee holds for it or for data generated from it")


def opacus_version() -> str:
    import opacus

    return str(opacus.__version__)


# --------------------------------------------------------------------------- budget
def resolve_delta(delta: float | str, n_units: int) -> float:
    """The delta to use: ``"auto"`` -> ``1 / (10 n_units)``; a number is checked against 1/n."""
    if n_units < 1:
        raise StageError("privacy: there are no training units (patients or tiles) to train on")
    if delta == "auto":
        return 1.0 / (AUTO_DELTA_FACTOR * n_units)
    d = float(delta)
    if not 0 < d < 1:
        raise StageError(f"privacy.delta must be in (0, 1), got {delta}")
    if d >= 1.0 / n_units:
        raise StageError(f"privacy.delta={delta} is not below 1/n = 1/{n_units} = {1.0 / n_units:.4g} (n = {n_units} "
                         f"training units): a delta that large allows releasing a whole unit's data outright; set "
                         f"privacy.delta below {1.0 / n_units:.4g}, or 'auto' (1/(10 n) = "
                         f"{1.0 / (AUTO_DELTA_FACTOR * n_units):.4g})")
    return d


def delta_rule(delta: float | str, unit: str) -> str:
    """How delta was chosen, as the ledger states it."""
    return f"auto: 1/({AUTO_DELTA_FACTOR} n_{unit}s)" if delta == "auto" else f"given; checked below 1/n_{unit}s"


def epsilon_of(history: list, delta: float, accountant: str) -> float:
    """epsilon spent by an Opacus accountant history ``[(sigma, q, steps), ...]`` at ``delta``."""
    return _epsilon(tuple(tuple(float(v) for v in h) for h in history), float(delta), accountant)


@functools.lru_cache(maxsize=256)
def _epsilon(history: tuple, delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(h[0], h[1], int(h[2])) for h in history]
    with warnings.catch_warnings(), np_errstate():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # RDP bound note
        warnings.filterwarnings("ignore", category=RuntimeWarning)  # PRV at q = 1 takes log(0) harmlessly
        return float(acc.get_epsilon(delta=delta))


def np_errstate():
    import numpy as np

    return np.errstate(divide="ignore", invalid="ignore")


@functools.lru_cache(maxsize=64)
def calibrate_sigma(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str, n_units: int, unit: str, prior: tuple = ()) -> float:
    """The noise multiplier that spends exactly ``target_epsilon`` over ``steps`` steps,
    (memoised: a pure function of its arguments, and the search is slow) or a StageError naming the recipe knob to change when that cannot be reached.

    ``prior``: accountant entries ``(sigma, q, steps)`` of mechanisms composed with training in
    the same accountant (the DP label shares); sigma is then searched so that the *composed*
    epsilon meets the target."""
    knobs = ("lower train.steps or train.batch_size, or raise privacy.target_epsilon "
             f"(now steps={steps}, q={sample_rate:.4g} over {n_units} {unit}s, target epsilon={target_epsilon})")
    if prior:
        knobs += ("; part of the budget goes to the DP label shares: lower privacy.label_share_budget or set "
                  "generate.label_proportions")
    if not 0 < sample_rate < 1:
        raise StageError(
            f"privacy: the sampling rate q = train.batch_size / number of {unit}s = {sample_rate:.4g} must be below 1 "
            f"for subsampled DP-SGD; lower train.batch_size below the {n_units} training {unit}s")
    base = [tuple(float(v) for v in p) for p in prior]

    def eps(sig: float) -> float:
        return epsilon_of(base + [(sig, sample_rate, steps)], delta, accountant)

    try:
        sigma = _solve_sigma(eps, target_epsilon, tol=0.995)
    except (ValueError, RuntimeError, OverflowError, FloatingPointError) as e:
        raise StageError(f"privacy accounting failed ({e}); {knobs}") from None
    if sigma is None:
        floor = eps(SIGMA_CAP)
        raise StageError(f"privacy.target_epsilon={target_epsilon} cannot be reached: even noise multiplier "
                         f"{SIGMA_CAP:g} spends epsilon={floor:.3g} at delta={delta:.3g}; {knobs}")
    return sigma


def _solve_sigma(eps, target: float, *, tol: float) -> float | None:
    """The noise multiplier s with ``tol * target <= eps(s) <= target`` (eps decreasing in s),
    by bracketing and the Illinois method on log s: a handful of accountant calls, where
    plain bisection needs dozens (each is slow). None when even ``SIGMA_CAP`` spends more."""
    lo, f_lo = None, None
    hi = 1.0
    f_hi = eps(hi) - target
    while f_hi > 0:  # too little noise: go up
        lo, f_lo = hi, f_hi
        if hi >= SIGMA_CAP:
            return None
        hi = min(hi * 4, SIGMA_CAP)
        f_hi = eps(hi) - target
    while lo is None:  # enough noise already: go down until it is too little
        cand = hi / 4
        if cand < 1e-3:
            return float(hi)
        f = eps(cand) - target
        if f > 0:
            lo, f_lo = cand, f
        else:
            hi, f_hi = cand, f
    a, fa, b, fb = math.log(lo), f_lo, math.log(hi), f_hi  # fa > 0 >= fb
    side = 0
    for _ in range(60):
        if fb >= -(1 - tol) * target:
            break
        c = b - fb * (b - a) / (fb - fa)
        if not a < c < b:
            c = 0.5 * (a + b)
        fc = eps(math.exp(c)) - target
        if fc > 0:
            a, fa = c, fc
            if side == -1:
                fb /= 2
            side = -1
        else:
            b, fb = c, fc
            if side == 1:
                fa /= 2
            side = 1
        if b - a < 1e-9:
            break
    return float(math.exp(b))


def gaussian_sigma(*, epsilon: float, delta: float, accountant: str) -> float:
    """Noise multiplier of one Gaussian mechanism (sensitivity 1, no subsampling) that spends
    ``epsilon`` at ``delta`` under ``accountant`` (never above, within 0.1%)."""
    sigma = _solve_sigma(lambda s: epsilon_of([(s, 1.0, 1)], delta, accountant), epsilon, tol=0.999)
    if sigma is None:
        raise StageError(f"a Gaussian mechanism cannot reach epsilon={epsilon:.3g} at delta={delta:.3g}")
    return sigma


@dataclass
class PrivacyPlan:
    """Everything the ledger states about a private run, decided before training starts."""

    unit: str
    n_units: int
    sample_rate: float
    expected_units: float
    sigma: float
    delta: float
    target_epsilon: float
    steps: int
    max_grad_norm: float
    noise_multiplicity: int
    tiles_per_patient: int | None
    accountant: str
    secure_mode: bool
    delta_rule: str
    warnings: list[str] = field(default_factory=list)
    prior: list = field(default_factory=list)  # label shares' accountant entries, composed with training


def unit_warnings(unit: str, n_units: int) -> list[str]:
    """Warnings a ledger must carry for this unit and count."""
    out = []
    if unit == "patient" and n_units < MIN_UNITS:
        out.append(f"only {n_units} training patients (< {MIN_UNITS}): a patient-level guarantee over so few "
                   f"patients is weak; each patient is a large share of the data")
    if unit == "tile":
        out.append("privacy unit is the tile: a patient contributes many tiles (and each tile's parent crop "
                   "conditions its children), so the guarantee per patient is much weaker than epsilon; "
                   "use privacy.unit: patient to protect patients")
        if n_units < MIN_UNITS:
            out.append(f"only {n_units} training tiles (< {MIN_UNITS})")
    return out


def plan_patient_privacy(pcfg, *, n_patients: int, batch_size: int, steps: int,
                         prior: list | tuple = ()) -> PrivacyPlan:
    """Plan patient-level DP: q = batch_size / n_patients, sigma for the target epsilon
    (composed with ``prior`` accountant entries, when given)."""
    delta = resolve_delta(pcfg.delta, n_patients)
    q = batch_size / n_patients
    sigma = calibrate_sigma(target_epsilon=pcfg.target_epsilon, delta=delta, sample_rate=q, steps=steps,
                            accountant=pcfg.accountant, n_units=n_patients, unit="patient",
                            prior=tuple(tuple(p) for p in prior))
    return PrivacyPlan(
        unit="patient", n_units=n_patients, sample_rate=q, expected_units=q * n_patients, sigma=sigma,
        delta=delta, target_epsilon=pcfg.target_epsilon, steps=steps, max_grad_norm=pcfg.max_grad_norm,
        noise_multiplicity=pcfg.noise_multiplicity, tiles_per_patient=pcfg.tiles_per_patient,
        accountant=pcfg.accountant, secure_mode=pcfg.secure_mode,
        delta_rule=delta_rule(pcfg.delta, "patient"),
        warnings=unit_warnings("patient", n_patients), prior=[list(p) for p in prior],
    )


# --------------------------------------------------------------------------- checks
def check_supported(model: nn.Module) -> None:
    """Opacus' strict validation; a StageError names every module it rejects."""
    from opacus.validators import ModuleValidator

    try:
        ModuleValidator.validate(model, strict=True)
    except Exception as e:  # opacus raises UnsupportedModuleError listing the problems, not the paths
        names = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
                 if name and not list(m.children()) and ModuleValidator.validate(m, strict=False)]
        raise StageError(f"the model has layers Opacus cannot privatise: {', '.join(names) or type(model).__name__}; "
                         f"{e}") from None


def secure_generator() -> torch.Generator:
    """A cryptographically secure generator (torchcsprng), as Opacus' secure_mode uses."""
    try:
        import torchcsprng as csprng  # noqa: F401
    except ImportError:
        raise StageError("privacy.secure_mode: true needs the torchcsprng package for cryptographically secure "
                         "noise, and it is not installed; install torchcsprng, or set privacy.secure_mode: false "
                         "(not for a real release)") from None
    return csprng.create_random_device_generator("/dev/urandom")


# --------------------------------------------------------------------------- mechanism
def fold_grad_samples(params: list[nn.Parameter], unit_of_row: torch.Tensor, n_units: int) -> None:
    """Replace each ``p.grad_sample`` [rows, ...] by per-unit sums [n_units, ...].

    Rows carry weights 1/rows_per_unit in the loss, so the sum is the unit's mean gradient
    over its tiles and noise draws. Opacus' DPOptimizer then clips each unit once.
    """
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is None:  # a parameter this chunk did not touch
            p.grad_sample = torch.zeros((n_units, *p.shape), device=p.device, dtype=p.dtype)
            continue
        if isinstance(gs, list):
            gs = torch.cat(gs, dim=0)
        if gs.shape[0] != unit_of_row.shape[0]:
            raise RuntimeError(f"per-sample gradient has {gs.shape[0]} rows, expected {unit_of_row.shape[0]}")
        out = torch.zeros((n_units, *gs.shape[1:]), device=gs.device, dtype=gs.dtype)
        p.grad_sample = out.index_add_(0, unit_of_row.to(gs.device), gs)


def empty_grad_samples(params: list[nn.Parameter]) -> None:
    """Zero-row per-sample gradients: a Poisson draw with no units still steps (noise only)."""
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)


def clip_sum_units(unit_grads: list[torch.Tensor], max_grad_norm: float) -> list[torch.Tensor]:
    """Reference of the per-unit mechanism (what DPOptimizer does to folded grads): clip each
    unit's flat gradient to ``max_grad_norm`` and sum over units. Used by tests and benches."""
    norms = torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in unit_grads], dim=1).norm(dim=1)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("u,u...->...", factor.to(g.dtype), g) for g in unit_grads]


# --------------------------------------------------------------------------- ledger
def ledger_private(plan: PrivacyPlan, history: list, steps_done: int, extra_warnings: list[str],
                   extra: dict | None = None) -> dict:
    """The privacy ledger of a DP run, with epsilon recomputed from the accountant history.

    ``epsilon`` is the ONE total of everything private that is released: the training
    history composed with ``plan.prior`` (the DP label shares) in one accountant. ``extra``
    (label shares, randomness, group privacy) is merged in as is."""
    prior = [tuple(p) for p in plan.prior]
    eps = epsilon_of(prior + [tuple(h) for h in history], plan.delta, plan.accountant)
    d = asdict(plan)
    planned = d.pop("steps")
    d.pop("prior")
    warns = list(dict.fromkeys(d.pop("warnings") + list(extra_warnings)))
    parts = {"training": epsilon_of(history, plan.delta, plan.accountant)}
    if prior:
        parts["label_shares"] = epsilon_of(prior, plan.delta, plan.accountant)
    return {
        "enabled": True,
        "epsilon": eps,
        **d,
        "steps": steps_done,
        "planned_steps": planned,
        "history": [list(h) for h in history],
        "composed_history": [list(h) for h in prior] + [list(h) for h in history],
        "epsilon_alone": parts,
        **(extra or {}),
        "opacus_version": opacus_version(),
        "normalisation": "sum of clipped unit gradients plus noise, divided by the expected units q*n",
        "warnings": warns,
    }


def ledger_public(unit_count: int, extra_warnings: list[str] | None = None) -> dict:
    """The ledger of a run without DP: no epsilon, and a warning that says so."""
    return {
        "enabled": False,
        "epsilon": None,
        "delta": None,
        "unit": None,
        "n_units": unit_count,
        "opacus_version": opacus_version(),
        "warnings": [NO_GUARANTEE] + list(extra_warnings or []),
    }



def group_privacy(epsilon: float, delta: float, levels: list[float]) -> dict:
    """Group privacy for one coarse tile's family at ``unit: tile``.

    A coarse tile is also the parent crop that conditions its ``r^2`` children one level
    finer (``r`` = the zoom between the two coarsest levels), so it touches ``1 + r^2`` units.
    For a group of ``k`` units, (epsilon, delta)-DP gives (k epsilon, k e^((k-1) epsilon) delta)-DP."""
    r = int(round(levels[0] / levels[1])) if len(levels) > 1 else 0
    k = 1 + r * r
    d = k * math.exp(min((k - 1) * epsilon, 700.0)) * delta
    return {"group_size": k, "zoom": r, "epsilon": k * epsilon, "delta": d,
            "rule": "(k epsilon, k e^((k-1) epsilon) delta) for a group of k = 1 + r^2 units",
            "meaningful": bool(d < 1.0)}
